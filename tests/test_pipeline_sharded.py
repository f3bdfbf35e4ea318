"""Pipeline stages sharded with FSDP2 equal one process on the same global batch, gather their
parameters once per step, reduce-scatter once per optimizer step, and save checkpoints that
load without pipelining.

One spawn of 4 gloo processes trains pp=2 x dp_shard=2 (fp64, gradient clipping on, 3 optimizer
steps) under 1F1B with 2 batches accumulated per step ("defer_all": one reduce-scatter per unit
and optimizer step), GPipe with activation checkpointing, activation offload and accumulation
"reduce_scatter_each" (one reduce-scatter per unit and batch), and interleaved 1F1B with 2
batches accumulated ("defer_all"); every batch's all-gathers and reduce-scatters are counted.
pp=2 x dp_shard=2 also trains in bf16-mixed. Then pp=2 x dp_shard=2 validates and saves a
checkpoint folder after 2 steps, and rank 0 alone (a new one-process world, no pipeline, no
sharding) resumes it to step 4. Losses and parameters (full tensors from the project's
state-dict path) are compared with one process (relative error below 1e-10 in fp64). HSDP
(pp=2 x dp_replicate=2 x dp_shard=2) needs 8 processes, about 90 s on 2 cores, and compiled
stages compile for a minute or more: both run with LAP_SLOW_TESTS=1.
"""
from __future__ import annotations

import os

import lightning as L
import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from dist_utils import assert_close, free_port, run_distributed
from lightning_utils import fp64_causal_lm, FixedTokens, LossRecorder, loader, quiet_trainer

import lightning_attn_parallel as lap
from lightning_attn_parallel.models import ModelConfig
from lightning_attn_parallel.parallel.apply import check_plan
from lightning_attn_parallel.parallel.state_dict import model_state
from lightning_attn_parallel.plan import ParallelPlan, PlanError

TINY_LLAMA = dict(vocab_size=64, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=64,
                  max_seq_len=32)
WORLD = 4
ROWS = 4  # sequences per data-parallel rank and batch
STEPS = 3
CLIP = 0.05  # small enough to clip every step: the norm must span the stages and the shards
SHARDED = dict(pp=2, dp_shard=2, pp_microbatches=2)
CASES = {
    # name: (plan kwargs, accumulate_grad_batches)
    "1f1b_defer_all": (dict(SHARDED, pp_schedule="1f1b", accumulation="defer_all"), 2),
    "gpipe_reduce_each_checkpointed_offloaded": (
        dict(SHARDED, pp_schedule="gpipe", accumulation="reduce_scatter_each", activation_checkpointing="block",
             offload_activations=True), 2),
    "interleaved_defer_all": (dict(SHARDED, pp_schedule="interleaved_1f1b", accumulation="defer_all"), 2),
}
STEPS_PER_EPOCH, SAVE_STEP, FINAL_STEP = 2, 2, 4
BF16_STEPS = 2
# HSDP: 8 ranks = pp 2 x dp_replicate 2 x dp_shard 2, a spawn of its own with one case
HSDP_WORLD = 8
HSDP = (dict(pp=2, dp_replicate=2, dp_shard=2, pp_microbatches=2, accumulation="defer_all"), 2)



def make_module() -> lap.CausalLMModule:
    return fp64_causal_lm(TINY_LLAMA, FINAL_STEP)


def full_parameters(module) -> dict[str, torch.Tensor]:
    """The module's parameters as the project's state-dict path names them, each gathered whole
    (this rank's stage only, under pipelining)."""
    return {name: (value.full_tensor() if isinstance(value, DTensor) else value).detach().cpu().clone()
            for name, value in model_state(module, full=False).items()}


class GatherScatterCounter(L.Callback):
    """Per batch, the all-gathers and reduce-scatters FSDP2 sent (torch's names for them differ
    between versions; each is counted once, at the public function called)."""

    NAMES = {"gather": ("all_gather_single", "all_gather_into_tensor"),
             "scatter": ("reduce_scatter_single", "reduce_scatter_tensor")}

    def __init__(self) -> None:
        self.per_batch: list[tuple[int, int]] = []
        self._counts = {"gather": 0, "scatter": 0}
        self._originals: dict = {}

    def _wrap(self, kind: str, original):
        def counting(*args, **kwargs):
            self._counts[kind] += 1
            return original(*args, **kwargs)
        return counting

    def on_train_start(self, trainer, pl_module) -> None:
        for kind, names in self.NAMES.items():
            for name in names:
                if hasattr(dist, name):
                    self._originals[name] = getattr(dist, name)
                    setattr(dist, name, self._wrap(kind, self._originals[name]))

    def on_train_end(self, trainer, pl_module) -> None:
        for name, original in self._originals.items():
            setattr(dist, name, original)

    def on_train_batch_start(self, *args) -> None:
        self._counts = {"gather": 0, "scatter": 0}

    def on_train_batch_end(self, *args) -> None:
        self.per_batch.append((self._counts["gather"], self._counts["scatter"]))


class OffloadProbe(L.Callback):
    """Per batch, whether the training step ran inside activation offload (save_on_cpu)."""

    def __init__(self) -> None:
        self.per_batch: list[bool] = []
        self._entered = False

    def on_train_start(self, trainer, pl_module) -> None:
        original = torch.autograd.graph.saved_tensors_hooks.__enter__

        def entering(hooks):
            self._entered = True
            return original(hooks)

        torch.autograd.graph.save_on_cpu.__enter__ = entering

    def on_train_end(self, trainer, pl_module) -> None:
        del torch.autograd.graph.save_on_cpu.__enter__

    def on_train_batch_start(self, *args) -> None:
        self._entered = False

    def on_train_batch_end(self, *args) -> None:
        self.per_batch.append(self._entered)


def sharded_units(strategy) -> int:
    """FSDP2 units holding parameters on this rank: each block, and each stage's root where it
    holds the embedding or the final norm and head."""
    units = 0
    for _, stage in strategy.pipeline._modules:
        units += len(stage.blocks)
        units += any(not name.startswith("blocks.") for name, _ in stage.named_parameters())
    return units


def fit(plan_kwargs: dict, world: int, rank: int, max_steps: int, accumulate: int = 1, ckpt_path=None,
        save_path=None, limit=None, precision: str = "64-true", validate: bool = False) -> dict:
    module, recorder, counter = make_module(), LossRecorder(average_over_ranks=True), GatherScatterCounter()
    offload = OffloadProbe()
    if precision != "64-true":
        module.float()
    pp = plan_kwargs.get("pp", 1)
    trainer = quiet_trainer(strategy=lap.AttnHybridStrategy(plan=lap.ParallelPlan(**plan_kwargs)),
                            devices=world, max_steps=max_steps, accumulate_grad_batches=accumulate,
                            precision=precision,
                            gradient_clip_val=CLIP, callbacks=[recorder, counter, offload], limit_train_batches=limit,
                            limit_val_batches=1 if validate else 0)
    # the mesh is (pp, dp_replicate, dp_shard): the stages of a data-parallel rank see its samples
    dp, dp_rank = world // pp, rank % (world // pp)
    val = loader(FixedTokens(seed=1), ROWS, replicas=dp, rank=dp_rank) if validate else None
    trainer.fit(module, loader(FixedTokens(), ROWS, replicas=dp, rank=dp_rank), val, ckpt_path=ckpt_path)
    if save_path is not None:
        trainer.save_checkpoint(save_path)
    sharded = all(isinstance(p, DTensor) for p in module.parameters())
    return {"losses": recorder.losses, "params": full_parameters(module), "sharded": sharded,
            "traffic": counter.per_batch, "offloaded": offload.per_batch,
            "units": sharded_units(trainer.strategy) if pp > 1 else 0, "start_params": recorder.start_params,
            "val": float(trainer.callback_metrics["val/loss"]) if validate else None}


def _worker(rank: int, world: int, root: str, resume_port: int) -> dict:
    results = {name: fit(plan, world, rank, STEPS, accumulate) for name, (plan, accumulate) in CASES.items()}
    results["bf16"] = fit(SHARDED, world, rank, BF16_STEPS, precision="bf16-mixed")
    # validated at the epoch's end (the forward-only schedule), then saved
    results["saved"] = fit(SHARDED, world, rank, SAVE_STEP, limit=STEPS_PER_EPOCH, save_path=f"{root}/pp2_fsdp2",
                           validate=True)
    # one process, no pipeline and no sharding, resumes the folder (a new world of one rank)
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        os.environ.update(MASTER_PORT=str(resume_port), WORLD_SIZE="1")
        dist.init_process_group("gloo", rank=0, world_size=1)
        results["resumed"] = resume_plain(f"{root}/pp2_fsdp2")
    return results


def resume_plain(folder: str) -> dict:
    module, recorder = make_module(), LossRecorder()
    trainer = quiet_trainer(strategy=lap.AttnHybridStrategy(plan=lap.ParallelPlan()), devices=1,
                            max_steps=FINAL_STEP, gradient_clip_val=CLIP, callbacks=[recorder],
                            limit_train_batches=STEPS_PER_EPOCH)
    trainer.fit(module, loader(FixedTokens(), ROWS * WORLD // SHARDED["pp"]), ckpt_path=folder)
    return {"losses": recorder.losses, "params": full_parameters(module), "start_params": recorder.start_params}


SLOW = pytest.mark.skipif(os.environ.get("LAP_SLOW_TESTS") != "1",
                          reason="minutes on 2 cores (8 processes, or compiling): set LAP_SLOW_TESTS=1")
# compiled stages: per block under FSDP2, and each stage whole (replicated data parallelism)
COMPILED = {"block_fsdp2": dict(SHARDED, compile="block"),
            "model_replicated": dict(pp=2, pp_microbatches=2, compile="model")}
COMPILED_STEPS = 2


def _compiled_worker(rank: int, world: int) -> dict:
    return {name: fit(plan, world, rank, COMPILED_STEPS) for name, plan in COMPILED.items()}


def _hsdp_worker(rank: int, world: int) -> dict:
    plan, accumulate = HSDP
    return fit(plan, world, rank, STEPS, accumulate)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_distributed(_worker, WORLD, str(tmp_path_factory.mktemp("pipeline_sharded")), free_port(),
                           timeout=400)


def one_process(max_steps: int, accumulate: int = 1, limit=None, dp: int = WORLD // SHARDED["pp"],
                precision: str = "64-true", validate: bool = False) -> dict:
    module, recorder = make_module(), LossRecorder()
    if precision != "64-true":
        module.float()
    trainer = quiet_trainer(devices=1, max_steps=max_steps, accumulate_grad_batches=accumulate,
                            gradient_clip_val=CLIP, callbacks=[recorder], limit_train_batches=limit,
                            precision=precision, limit_val_batches=1 if validate else 0)
    trainer.fit(module, loader(FixedTokens(), ROWS * dp), loader(FixedTokens(seed=1), ROWS * dp) if validate else None)
    return {"losses": recorder.losses, "params": full_parameters(module),
            "val": float(trainer.callback_metrics["val/loss"]) if validate else None}


@pytest.mark.parametrize("name", list(CASES))
def test_sharded_pipeline_equals_one_process(results, name):
    plan, accumulate = CASES[name]
    check_against_one_process([result[name] for result in results], name, accumulate, WORLD // plan["pp"])


@SLOW
def test_hsdp_pipeline_equals_one_process():
    """pp=2 x dp_replicate=2 x dp_shard=2: each stage's gradients are reduce-scattered inside its
    shard group and all-reduced across the replicas, once per optimizer step."""
    plan, accumulate = HSDP
    results = run_distributed(_hsdp_worker, HSDP_WORLD, timeout=400)
    check_against_one_process(results, "hsdp", accumulate, HSDP_WORLD // plan["pp"])
    for rank, result in enumerate(results):
        units = result["units"]
        assert result["traffic"] == [(units, 0), (0, units)] * STEPS, f"rank{rank}: {result['traffic']}"


@SLOW
def test_compiled_stages_equal_one_process():
    """compile='block' under pp x FSDP2 and compile='model' (each stage module compiled whole)
    under pp x replicated data parallelism equal one eager process."""
    results = run_distributed(_compiled_worker, WORLD, timeout=900)
    for name in COMPILED:
        check_against_one_process([result[name] for result in results], name, 1, WORLD // 2, steps=COMPILED_STEPS,
                                  sharded=name.endswith("fsdp2"))


def check_against_one_process(results: list, name: str, accumulate: int, dp: int, steps: int = STEPS,
                              sharded: bool = True) -> None:
    reference = one_process(steps, accumulate, dp=dp)
    stages = {}
    for rank, got in enumerate(results):
        assert got["sharded"] == sharded, f"{name} rank{rank}: every parameter is an FSDP2 shard, or none"
        assert got["params"] and set(got["params"]) < set(reference["params"]), name
        for key, value in got["params"].items():
            assert_close(value, reference["params"][key], rtol=1e-10, name=f"{name} rank{rank} {key}")
        assert_close(torch.tensor(got["losses"]), torch.tensor(reference["losses"]), rtol=1e-10,
                     name=f"{name} rank{rank} losses")
        stages.setdefault(frozenset(got["params"]), 0)
    assert set().union(*stages) == set(reference["params"]), "the stages together hold the whole model"


def test_activation_offload_spans_the_schedule(results):
    """offload_activations wraps every training step (the schedule's forwards and backwards)."""
    for rank, result in enumerate(results):
        assert result["gpipe_reduce_each_checkpointed_offloaded"]["offloaded"] == [True] * STEPS * 2, rank
        assert not any(result["1f1b_defer_all"]["offloaded"]), rank


@pytest.mark.parametrize("name", list(CASES))
def test_parameters_are_gathered_once_and_gradients_reduced_once_per_step(results, name):
    """Each unit's parameters are all-gathered once per optimizer step, not per micro-batch (they
    stay gathered over the micro-batches), and its gradients reduce-scattered once per optimizer
    step under "defer_all", once per batch under "reduce_scatter_each". Interleaved 1F1B gathers
    once per batch: torch's runtime for it reshards every stage at the end of each schedule step."""
    plan, accumulate = CASES[name]
    for rank, result in enumerate(results):
        got, units = result[name]["traffic"], result[name]["units"]
        assert len(got) == STEPS * accumulate and units >= 2
        regathered = units if plan["pp_schedule"] == "interleaved_1f1b" else 0
        if plan.get("accumulation") == "reduce_scatter_each":
            expected = [(units, units)] * len(got)
        else:  # gathered at a window's first batch, reduced at its last
            window = [(units, 0)] + [(regathered, 0)] * (accumulate - 2) + [(regathered, units)]
            expected = window * STEPS
        assert got == expected, f"{name} rank{rank}: (all-gathers, reduce-scatters) per batch {got}, expected {expected}"


def test_bf16_mixed_stages_send_what_fsdp2_computes_in(results):
    """Under bf16-mixed FSDP2 computes in bf16: the stages' boundaries carry bf16 activations
    (declared fp32, they came through as NaN). Losses follow one bf16-mixed process to bf16's
    precision."""
    reference = one_process(BF16_STEPS, precision="bf16-mixed")
    for rank, result in enumerate(results):
        losses = torch.tensor(result["bf16"]["losses"])
        assert torch.isfinite(losses).all(), f"rank{rank}: {losses}"
        assert_close(losses, torch.tensor(reference["losses"]), rtol=1e-2, name=f"bf16 rank{rank} losses")


def test_checkpoint_saved_under_sharded_pp_resumes_in_one_plain_process(results):
    """pp=2 x dp_shard=2 validates (the forward-only schedule; FSDP2 reshards the stages after a
    forward without gradients) and saves a DCP folder at step 2; one process without pipeline or sharding loads it (every
    stage's shards) and continues with the uninterrupted run's losses and parameters."""
    reference = one_process(FINAL_STEP, limit=STEPS_PER_EPOCH)
    validated = one_process(SAVE_STEP, limit=STEPS_PER_EPOCH, validate=True)
    saved = {k: v for result in results for k, v in result["saved"]["params"].items()}
    assert set(saved) == set(reference["params"])
    for result in results:
        assert result["saved"]["sharded"], "the stages are sharded after validation"
        assert abs(result["saved"]["val"] - validated["val"]) < 1e-10 * abs(validated["val"])
        assert_close(torch.tensor(result["saved"]["losses"]), torch.tensor(reference["losses"][:SAVE_STEP]),
                     rtol=1e-10, name="saved losses")
    resumed = results[0]["resumed"]
    for key, value in resumed["start_params"].items():
        assert_close(value, saved[key], rtol=1e-12, name=f"loaded {key}")
    assert_close(torch.tensor(resumed["losses"]), torch.tensor(reference["losses"][SAVE_STEP:]),
                 rtol=1e-10, name="resumed losses")
    for key, value in resumed["params"].items():
        assert_close(value, reference["params"][key], rtol=1e-10, name=f"resumed {key}")


# --------------------------------------------------------------------------- plans, no processes
COMPOSING = {  # name: (plan kwargs, world size)
    "FSDP2": (dict(pp=2, dp_shard=2), 4),
    "HSDP": (dict(pp=2, dp_replicate=2, dp_shard=2), 8),
    "compile per block": (dict(pp=2, dp_shard=2, compile="block"), 4),
    "compile per stage": (dict(pp=2, compile="model"), 4),
    "fp8": (dict(pp=2, dp_shard=2, fp8="tensorwise"), 4),
    "activation offload": (dict(pp=2, dp_shard=2, offload_activations=True), 4),
    "activation checkpointing": (dict(pp=2, dp_shard=2, activation_checkpointing="selective"), 4),
}


@pytest.mark.parametrize("name", list(COMPOSING))
def test_pipeline_composes_with_sharding_and_the_memory_and_kernel_levers(name):
    kwargs, world = COMPOSING[name]
    ParallelPlan(**kwargs).resolve(world).check_model(ModelConfig(**TINY_LLAMA))


def test_fp8_under_pp_keeps_its_gpu_guard():
    """fp8 passes the pipeline's checks but still needs an fp8 GPU: one line on the CPU."""
    with pytest.raises(PlanError) as info:
        check_plan(ParallelPlan(pp=2, dp_shard=2, fp8="tensorwise"), 4, ModelConfig(**TINY_LLAMA),
                   torch.device("cpu"))
    assert "fp8='tensorwise'" in str(info.value) and "\n" not in str(info.value)


def test_compile_model_under_pp_compiles_each_stage():
    """compile='model' compiles the modules the schedule calls (each stage), not the transformer,
    whose forward never runs under pipelining."""
    from lightning_attn_parallel.models import build_model
    from lightning_attn_parallel.parallel.apply import apply_compile
    from lightning_attn_parallel.parallel.pipeline_stages import split_into_stages

    model = build_model(ModelConfig(**TINY_LLAMA))
    stages = split_into_stages(model, ParallelPlan(pp=2, pp_schedule="interleaved_1f1b", pp_microbatches=2), 0)
    apply_compile(model, "model", [m for _, m in stages])
    assert all(m._compiled_call_impl is not None for _, m in stages)
    assert model._compiled_call_impl is None


def test_planner_prices_stages_sharded_and_gathered_over_the_step():
    """A Llama-8B shape on 16 H100s: at pp=2 a replicated stage (4B parameters at 16 bytes each)
    does not fit, an FSDP2 stage over its 8 GPUs does. Priced as the pipeline runs it: the whole
    stage held gathered in bf16 beside the FSDP2 plan's own memory, one all-gather per step."""
    from dataclasses import replace

    from lightning_attn_parallel.hardware import H100_SXM, ClusterSpec
    from lightning_attn_parallel.planning.pipeline import _gathered_over_the_step, _stage_workload, pipeline_option
    from lightning_attn_parallel.planning.select import make_workload

    cfg = ModelConfig(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                      max_seq_len=4096)
    work = make_workload(cfg, ClusterSpec(num_nodes=2), H100_SXM, 1, 4096, "bf16-mixed", grad_accum=2)
    assert pipeline_option(work, 2).fits  # the best stage of the search (it may split blocks over tp)
    stage_work = _stage_workload(work, 2)
    plain = stage_work.evaluate(ParallelPlan(dp_shard=8, accumulation="defer_all").resolve(8))
    stage = _gathered_over_the_step(stage_work, plain)
    assert stage.fits
    held = stage.memory.params - plain.memory.params
    # the gathered copy: the stage's 16 of 32 blocks plus embedding and head, 2 bytes a parameter
    assert 2 * 3.5e9 < held < 2 * 5.5e9, held
    assert stage.timing.fsdp_gather_s == pytest.approx(plain.timing.fsdp_gather_s / stage_work.grad_accum)
    replicated = stage_work.evaluate(replace(plain.plan, dp_shard=1, dp_replicate=8))
    assert not replicated.fits
