"""Sharded and tensor-parallel training through the strategy equals one process, accumulation
sends no gradient traffic, and a sharded checkpoint resumes under another plan.

One spawn of 4 gloo processes trains every plan below through `Trainer(strategy=AttnHybridStrategy)`
(fp32, 2 micro-batches per step, 3 steps) and records, per micro-batch, the data-parallel gradient
collectives it sent (reduce-scatters of FSDP2, all-reduces of HSDP and of the GradientReducer).
Lightning's own ModelParallelStrategy (FSDP2 applied in `configure_model`) runs on the same ranks
for comparison: it has no way to hold back FSDP2's reduce-scatter on accumulating micro-batches.
The same spawn trains tp=2 x dp_shard=2 for 6 steps without stopping, and for 2 steps followed by
`trainer.save_checkpoint` (a sharded folder). Then the world shrinks: ranks 2 and 3 leave, and
ranks 0 and 1 form a new 2-process world (new process group, as after a restart) that resumes
that folder under dp_shard=2 and under replicated data parallelism (which must load the folder itself, since
Lightning's own restore finds no optimizer states in it) to step 4; the replicated run saves a
single file, which dp_shard=2 resumes to step 6 (numbered optimizer states sharded by name). Every
resumed run starts from exactly the saved parameters and continues with the uninterrupted run's
losses, so model, optimizer and LR schedule all came back.
"""
from __future__ import annotations

import os

import lightning as L
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import fully_shard

from dist_utils import assert_close, free_port, run_distributed
from lightning_utils import FixedTokens, LossRecorder, loader, params_of, quiet_trainer

import lightning_attn_parallel as lap
from lightning_attn_parallel.models import ModelConfig

TINY_LLAMA = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                  max_seq_len=32)
MICRO_BATCH = 2  # rows per data-parallel rank and micro-batch
ACCUMULATE = 2
STEPS = 3
WORLD = 4

CASES = {
    # name: plan kwargs (dp_replicate=-1 fills the rest of the world)
    "tp2_dp2": dict(tp=2),
    "tp2_dp2_sequence_parallel": dict(tp=2, sequence_parallel=True),
    "fsdp4": dict(dp_shard=4),
    "hsdp_2x2": dict(dp_replicate=2, dp_shard=2),
    "fsdp2_tp2": dict(dp_shard=2, tp=2),
    "cp2_fsdp2": dict(dp_shard=2, cp=2),
}

# Resharding: tp=2 x dp_shard=2 on 4 ranks saves a folder after 2 steps; on 2 ranks, dp_shard=2
# and replicated data parallelism resume it to step 4 (the replicated run then saves one file),
# and dp_shard=2 resumes that file to step 6. Each must continue the uninterrupted 6-step run.
RESHARD_SAVE = dict(dp_shard=2, tp=2)
FSDP2 = dict(dp_shard=2)
REPLICATED = dict()
# Every checkpoint sits on an epoch boundary: FixedTokens' loader cannot skip the batches of a
# partly trained epoch (test_resume.py covers mid-epoch resumes with LMDataModule's sampler).
STEPS_PER_EPOCH = 2
SAVE_STEP, RESUME_STEP, FINAL_STEP = 2, 4, 6
RESUME_WORLD = 2


def data_parallel_layout(plan_kwargs: dict, world: int, rank: int) -> tuple[int, int]:
    """(dp, dp_rank) on the dense mesh (dp_replicate, dp_shard, cp, tp), tp innermost: the ranks
    of one tp x cp block share a data-parallel rank."""
    inner = plan_kwargs.get("cp", 1) * plan_kwargs.get("tp", 1)
    return world // inner, rank // inner


def make_module() -> lap.CausalLMModule:
    L.seed_everything(0, verbose=False)
    module = lap.CausalLMModule(ModelConfig(**TINY_LLAMA), lr=1e-2, warmup_steps=1,
                                total_steps=FINAL_STEP)
    module.configure_model()
    return module


class GradientTraffic(L.Callback):
    """Per micro-batch, the data-parallel gradient collectives sent from the start of the batch
    to the end of its optimizer step: reduce-scatters (FSDP2) and all-reduces (HSDP's replica
    reduction, the GradientReducer). Collectives on the context-parallel group (attention's KV
    exchange) and on the tensor-parallel group (the vocabulary-parallel loss's softmax
    statistics) are not gradient traffic and are left out."""

    GROUP_ARG = {"reduce_scatter_tensor": 3, "reduce_scatter_single": 3, "all_reduce": 2}

    def __init__(self) -> None:
        self.per_batch: list[int] = []
        self._count = 0
        self._originals: dict = {}
        self._excluded: set = set()

    def _wrap(self, name: str):
        original, position = self._originals[name], self.GROUP_ARG[name]

        def counting(*args, **kwargs):
            group = kwargs.get("group", args[position] if len(args) > position else None)
            if group is None or tuple(dist.get_process_group_ranks(group)) not in self._excluded:
                self._count += 1
            return original(*args, **kwargs)

        return counting

    def on_train_start(self, trainer, pl_module) -> None:
        meshes = getattr(trainer.strategy, "meshes", None)
        for dim in ("cp", "tp"):
            if meshes is not None and getattr(meshes.plan, dim) > 1:
                self._excluded.add(tuple(dist.get_process_group_ranks(meshes.group(dim))))
        for name in self.GROUP_ARG:
            if hasattr(dist, name):
                self._originals[name] = getattr(dist, name)
                setattr(dist, name, self._wrap(name))

    def on_train_end(self, trainer, pl_module) -> None:
        for name, original in self._originals.items():
            setattr(dist, name, original)
        self._originals.clear()

    def on_train_batch_start(self, *args) -> None:
        self._count = 0

    def on_train_batch_end(self, *args) -> None:
        self.per_batch.append(self._count)


def train(plan_kwargs: dict, world: int, rank: int) -> dict:
    module = make_module()
    traffic = GradientTraffic()
    dp, dp_rank = data_parallel_layout(plan_kwargs, world, rank)
    trainer = quiet_trainer(strategy=lap.AttnHybridStrategy(plan=lap.ParallelPlan(**plan_kwargs)),
                            devices=world, max_steps=STEPS, accumulate_grad_batches=ACCUMULATE,
                            callbacks=[traffic])
    trainer.fit(module, loader(FixedTokens(), MICRO_BATCH, replicas=dp, rank=dp_rank))
    return {"params": params_of(module), "traffic": traffic.per_batch}


# --------------------------------------------------------------------------- Lightning's FSDP2
class LightningFSDPModule(L.LightningModule):
    """The same model for ModelParallelStrategy, which asks the module to shard itself."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = make_module()

    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        for block in self.inner.model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(self.inner.model, mesh=mesh, reshard_after_forward=False)

    def training_step(self, batch, batch_idx):
        return self.inner._loss(batch)[0]

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def lightning_model_parallel_traffic(world: int, rank: int) -> list[int]:
    traffic = GradientTraffic()
    strategy = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1)
    trainer = quiet_trainer(strategy=strategy, devices=world, max_steps=STEPS,
                            accumulate_grad_batches=ACCUMULATE, callbacks=[traffic])
    trainer.fit(LightningFSDPModule(), loader(FixedTokens(), MICRO_BATCH, replicas=world, rank=rank))
    return traffic.per_batch


# --------------------------------------------------------------------------- resharding
def fit_recorded(plan_kwargs: dict, world: int, rank: int, max_steps: int, ckpt_path=None,
                 save_path=None) -> dict:
    module = make_module()
    recorder = LossRecorder()
    dp, dp_rank = data_parallel_layout(plan_kwargs, world, rank)
    trainer = quiet_trainer(strategy=lap.AttnHybridStrategy(plan=lap.ParallelPlan(**plan_kwargs)),
                            devices=world, max_steps=max_steps, accumulate_grad_batches=ACCUMULATE,
                            limit_train_batches=STEPS_PER_EPOCH * ACCUMULATE, callbacks=[recorder])
    trainer.fit(module, loader(FixedTokens(), MICRO_BATCH, replicas=dp, rank=dp_rank),
                ckpt_path=ckpt_path)
    if save_path is not None:
        trainer.save_checkpoint(save_path)
    return {"losses": recorder.losses, "start_params": recorder.start_params,
            "params": params_of(module), "global_step": trainer.global_step}


def _worker(rank: int, world: int, root: str, resume_port: int) -> dict:
    results = {name: train(plan_kwargs, world, rank) for name, plan_kwargs in CASES.items()}
    results["lightning_model_parallel"] = lightning_model_parallel_traffic(world, rank)
    results["uninterrupted"] = fit_recorded(RESHARD_SAVE, world, rank, FINAL_STEP)
    results["saved"] = fit_recorded(RESHARD_SAVE, world, rank, SAVE_STEP, save_path=f"{root}/folder")
    # A fresh, smaller world on the same processes: cheaper than spawning 2 new ones.
    dist.barrier()
    dist.destroy_process_group()
    if rank < RESUME_WORLD:
        os.environ.update(MASTER_PORT=str(resume_port), WORLD_SIZE=str(RESUME_WORLD))
        dist.init_process_group("gloo", rank=rank, world_size=RESUME_WORLD)
        results["resumed"] = resume(RESUME_WORLD, rank, root)
    return results


def resume(world: int, rank: int, root: str) -> dict:
    folder, file = f"{root}/folder", f"{root}/replicated.ckpt"
    return {
        "fsdp2_from_folder": fit_recorded(FSDP2, world, rank, RESUME_STEP, ckpt_path=folder),
        "replicated_from_folder": fit_recorded(REPLICATED, world, rank, RESUME_STEP, ckpt_path=folder,
                                               save_path=file),
        "fsdp2_from_file": fit_recorded(FSDP2, world, rank, FINAL_STEP, ckpt_path=file),
    }


@pytest.fixture(scope="module")
def checkpoint_root(tmp_path_factory):
    return tmp_path_factory.mktemp("sharded_ckpt")


@pytest.fixture(scope="module")
def results(checkpoint_root):
    return run_distributed(_worker, WORLD, str(checkpoint_root), free_port())


# --------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", list(CASES))
def test_sharded_training_equals_one_process(results, name):
    dp, _ = data_parallel_layout(CASES[name], WORLD, 0)
    module = make_module()
    trainer = quiet_trainer(devices=1, max_steps=STEPS, accumulate_grad_batches=ACCUMULATE)
    trainer.fit(module, loader(FixedTokens(), MICRO_BATCH * dp))
    reference = params_of(module)
    for rank, result in enumerate(results):
        for key, expected in reference.items():
            assert_close(result[name]["params"][key], expected, name=f"{name} rank{rank} {key}")


def test_accumulating_micro_batches_send_no_gradient_traffic(results):
    """Every plan: nothing on the micro-batch that only accumulates, and the data-parallel
    reduction on the last one (a reduce-scatter per FSDP unit; HSDP adds an all-reduce per unit
    across replicas; the GradientReducer one all-reduce per bucket)."""
    units = 1 + TINY_LLAMA["n_layers"]  # one FSDP2 unit per block plus the root
    expected_sync = {"fsdp4": units, "hsdp_2x2": 2 * units, "fsdp2_tp2": units, "cp2_fsdp2": units}
    for name in CASES:
        for rank, result in enumerate(results):
            traffic = result[name]["traffic"]
            assert len(traffic) == STEPS * ACCUMULATE
            assert traffic[0::2] == [0] * STEPS, f"{name} rank{rank}: accumulating micro-batches sent {traffic}"
            sync = expected_sync.get(name)
            assert all(n == sync if sync else n >= 1 for n in traffic[1::2]), f"{name} rank{rank}: {traffic}"


def test_lightning_model_parallel_strategy_reduce_scatters_every_micro_batch(results):
    """The contrast: Lightning's ModelParallelStrategy (FSDP2 through configure_model, here on
    CPU/gloo) sends the reduce-scatters on every micro-batch, accumulating ones included; ours
    (fsdp4, the same sharding) sends them only on the last micro-batch of each step."""
    units = 1 + TINY_LLAMA["n_layers"]
    for result in results:
        assert result["lightning_model_parallel"] == [units] * (STEPS * ACCUMULATE)
        assert sum(result["fsdp4"]["traffic"]) == units * STEPS


def test_sharded_checkpoint_resumes_under_other_plans(results, checkpoint_root):
    """Folder saved by tp=2 x dp_shard=2 on 4 ranks: dp_shard=2 and replicated data parallelism on
    2 ranks start from exactly the saved parameters and continue with the uninterrupted run's
    losses; the replicated run's single-file checkpoint resumes under dp_shard=2 just as well,
    optimizer and LR schedule included, up to the uninterrupted run's final parameters."""
    assert (checkpoint_root / "folder").is_dir() and (checkpoint_root / "replicated.ckpt").is_file()
    for rank in range(RESUME_WORLD):
        run = results[rank]["resumed"]
        # the 4-rank runs' rank 2r has the same data-parallel rank as rank r here (tp innermost)
        full, saved = results[2 * rank]["uninterrupted"], results[2 * rank]["saved"]
        assert saved["global_step"] == SAVE_STEP
        chain = {  # resumed run: (its first step, its last step, parameters it must start from)
            "fsdp2_from_folder": (SAVE_STEP, RESUME_STEP, saved["params"]),
            "replicated_from_folder": (SAVE_STEP, RESUME_STEP, saved["params"]),
            "fsdp2_from_file": (RESUME_STEP, FINAL_STEP, run["replicated_from_folder"]["params"]),
        }
        for name, (since, until, start) in chain.items():
            result = run[name]
            assert result["global_step"] == until
            for key, value in start.items():
                assert torch.equal(result["start_params"][key], value), f"{name}: {key} not restored"
            expected = torch.tensor(full["losses"][since * ACCUMULATE: until * ACCUMULATE])
            assert_close(torch.tensor(result["losses"]), expected, name=f"{name} rank{rank} losses")
        for key, value in full["params"].items():
            assert_close(run["fsdp2_from_file"]["params"][key], value, name=f"final {key} rank{rank}")
