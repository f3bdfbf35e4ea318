"""Fabric(strategy="attn_hybrid"): the loop a Fabric user writes, on 4 gloo processes, against the
same loop under one process on the same global batch.

One spawn of 4 ranks runs every case: dp (hierarchical over 2 declared nodes), FSDP2, HSDP, tp,
cp and ep, a user's own nn.Module under dp and FSDP2, each with accumulation through
`fabric.no_backward_sync` and mesh-aware `fabric.clip_gradients`, in fp64 (exact: 1e-10).
The collectives each micro-batch sends are counted: accumulating ones send no gradient.
"""
from __future__ import annotations

import math
from contextlib import nullcontext

import lightning as L
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from dist_utils import assert_close, run_distributed
from lightning_utils import FixedTokens, params_of

import lightning_attn_parallel as lap
from lightning_attn_parallel.models import ModelConfig
from lightning_attn_parallel.precision import FabricMasterWeightsPrecision

TINY_LLAMA = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=32)
TINY_MOE = dict(family="deepseek", attention="mla", vocab_size=64, d_model=32, n_layers=2, n_heads=4,
                kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, ffn_dim=64,
                max_seq_len=32, n_routed_experts=4, n_shared_experts=1, moe_top_k=2, moe_ffn_dim=16,
                first_k_dense_replace=1, aux_loss_coef=0.01, bias_update_speed=0.01)
CASES = {
    # name: (model, plan)
    "dp_hierarchical": ("llama", dict(hierarchical="always", ranks_per_node=2, bucket_mb=0.005)),
    "fsdp2": ("llama", dict(dp_shard=4, accumulation="defer_all")),
    "hsdp": ("llama", dict(dp_shard=2)),
    "tp": ("llama", dict(tp=2)),
    "cp": ("llama", dict(cp=2)),
    "ep": ("moe", dict(ep=2)),
    "moe_dp": ("moe", dict()),  # the routers' bias update over loads summed by the strategy
    "user_dp": ("user", dict()),
    "user_fsdp2": ("user", dict(dp_shard=4)),
    # master weights: fp32 compute copies of fp64 masters (exactness of the mechanism, 1e-5)
    "masters_dp": ("llama", dict(mixed_precision="master_weights", bucket_mb=0.01)),
    "masters_fsdp2": ("llama", dict(mixed_precision="master_weights", dp_shard=4)),
}
MICRO = 2  # sequences per data-parallel rank and micro-batch
ACCUMULATE = 2
STEPS = 2
CLIP = 0.05  # below the gradient norm: every step clips
GRADIENT_COLLECTIVES = ("all_reduce", "reduce_scatter_tensor", "reduce_scatter_single")


class UserModel(nn.Module):
    """A user's own model, without the model protocol."""

    def __init__(self, vocab: int = 64, dim: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Embedding(vocab, dim), nn.Linear(dim, 4 * dim), nn.GELU(),
                                 nn.Linear(4 * dim, vocab))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.net(tokens)


def make_model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "user":
        return UserModel()
    return lap.build_model(ModelConfig(**(TINY_MOE if kind == "moe" else TINY_LLAMA)))


def loss_of(fabric: L.Fabric, model: nn.Module, kind: str, batch: dict) -> torch.Tensor:
    if kind == "user":
        logits = model(batch["input_ids"])
        return nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
    loss, _ = lap.fabric.training_loss(fabric, model, batch)
    return loss


class Counter:
    """Counts the gradient collectives (all-reduce, reduce-scatter) torch.distributed is asked for."""

    def __init__(self) -> None:
        self.calls = 0
        self._originals = {name: getattr(dist, name) for name in GRADIENT_COLLECTIVES if hasattr(dist, name)}

    def __enter__(self) -> "Counter":
        for name, original in self._originals.items():
            setattr(dist, name, self._counting(original))
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self._originals.items():
            setattr(dist, name, original)

    def _counting(self, original):
        def call(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)
        return call


WORLD = 4


def precision_of(plan: dict) -> dict:
    if plan.get("mixed_precision") == "master_weights":
        return {"plugins": FabricMasterWeightsPrecision(torch.float32, torch.float64)}
    return {"precision": "64-true"}


def fabric_train(kind: str, plan: dict, world: int) -> dict:
    """The Fabric loop a user writes: setup, setup_dataloaders, no_backward_sync while
    accumulating, backward, clip_gradients, step. One process runs Lightning's single-device
    strategy, or attn_hybrid's replicated plan where the case needs the strategy (master weights,
    the MoE routers' bias update)."""
    L.seed_everything(0, verbose=False)
    masters = plan.get("mixed_precision") == "master_weights"
    strategy = (lap.fabric.AttnHybridFabricStrategy(plan=lap.ParallelPlan(**plan) if world > 1 else
                                                    lap.ParallelPlan(mixed_precision="master_weights"))
                if world > 1 or masters or kind == "moe" else "auto")
    fabric = L.Fabric(accelerator="cpu", devices=world, strategy=strategy, **precision_of(plan))
    fabric.launch()
    model = make_model(kind)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer = fabric.setup(model, optimizer)
    dp = fabric.strategy.distributed_sampler_kwargs["num_replicas"] if world > 1 else 1
    global_batch = MICRO * (WORLD // plan.get("tp", 1) // plan.get("cp", 1))
    loader = fabric.setup_dataloaders(DataLoader(FixedTokens(), batch_size=global_batch // dp))
    sent, norms, biases = [], [], []
    with Counter() as counter:
        for i, batch in enumerate(loader):
            if i == STEPS * ACCUMULATE:
                break
            accumulating = (i + 1) % ACCUMULATE != 0
            before = counter.calls
            with fabric.no_backward_sync(model, enabled=accumulating):
                fabric.backward(loss_of(fabric, model, kind, batch) / ACCUMULATE)
            sent.append(counter.calls - before)
            if not accumulating:
                norms.append(fabric.clip_gradients(model, optimizer, max_norm=CLIP).detach().clone())
                optimizer.step()
                optimizer.zero_grad()
                biases.append(torch.cat([b.detach().flatten().clone() for n, b in model.named_buffers()
                                         if n.endswith("expert_bias")] or [torch.zeros(0)]))
    computed = {p.dtype for p in model.parameters()}
    with getattr(fabric.strategy, "masters_in_place", nullcontext)():  # master weights: the masters
        params = params_of(model)
    # the MoE routers' biases after each step, updated by the loads of every rank
    params["router_biases"] = torch.stack(biases)
    return {"params": params, "grad_norm": torch.stack(norms), "sent": sent, "dp": dp,
            "sampler": loader._dataloader.sampler.num_replicas if world > 1 else 1,
            "optimized": {p.dtype for g in optimizer.param_groups for p in g["params"]},
            "computed": computed}


def pretrained_load(world: int, folder: str) -> dict:
    """init_module(empty_init=True) + a Hugging Face folder under tp x FSDP2: each rank allocates
    and reads only its slices."""
    fabric = L.Fabric(accelerator="cpu", devices=world, strategy=lap.fabric.AttnHybridFabricStrategy(
        plan=lap.ParallelPlan(tp=2, dp_shard=2)))
    fabric.launch()
    with fabric.init_module(empty_init=True):
        model = lap.fabric.pretrained_model(f"{folder}/hf")
    assert all(p.is_meta for p in model.parameters())
    model = fabric.setup_module(model)
    local = sum(p.to_local().numel() for p in model.parameters())
    return {"params": params_of(model.module), "local_fraction": local / sum(p.numel() for p in model.parameters())}


def _worker(rank: int, world: int, folder: str) -> dict:
    from lightning_attn_parallel.parallel import gradient_reducer

    calls = {"n": 0}
    original = gradient_reducer.hierarchical_all_reduce

    def counting(*args, **kwargs):  # the two-level all-reduce of ranks declared on two nodes
        calls["n"] += 1
        return original(*args, **kwargs)

    gradient_reducer.hierarchical_all_reduce = counting
    out = {}
    for name, (kind, plan) in CASES.items():
        calls["n"] = 0
        out[name] = fabric_train(kind, plan, world)
        out[name]["hierarchical_calls"] = calls["n"]
    gradient_reducer.hierarchical_all_reduce = original
    out["interchange"] = _resume_worker(rank, world, folder)
    out["pretrained"] = pretrained_load(world, folder)
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="module")
def results(folder):
    """One spawn of WORLD ranks for every distributed case (process start-up dominates on CPU)."""
    from lightning_attn_parallel.models import save_pretrained

    save_pretrained(make_model("llama"), folder / "hf", dtype=torch.float32)
    return run_distributed(_worker, WORLD, str(folder))


def test_pretrained_loads_each_ranks_slices(results):
    expected = params_of(make_model("llama"))
    for rank, result in enumerate(results):
        assert result["pretrained"]["local_fraction"] < 0.3  # a quarter of the model, plus replicated norms
        for key, value in expected.items():
            assert torch.equal(result["pretrained"]["params"][key], value), f"rank{rank} {key}"


@pytest.mark.parametrize("name", list(CASES))
def test_fabric_loop_equals_one_process(results, name):
    kind, plan = CASES[name]
    reference = fabric_train(kind, plan, 1)
    assert float(reference["grad_norm"].min()) > CLIP, "every step must clip"
    if kind == "moe":  # the routers' biases moved
        assert reference["params"]["router_biases"].abs().sum() > 0
    rtol = 1e-5 if "mixed_precision" in plan else 1e-10  # fp32 compute copies, or fp64 throughout
    for rank, result in enumerate(results):
        assert_close(result[name]["grad_norm"], reference["grad_norm"], rtol=rtol, name=f"{name} rank{rank} norm")
        for key, expected in reference["params"].items():
            assert_close(result[name]["params"][key], expected, rtol=rtol, name=f"{name} rank{rank} {key}")
        if "mixed_precision" in plan:  # the optimizer updates fp64 masters
            assert result[name]["optimized"] == {torch.float64}, result[name]["optimized"]
            if not plan.get("dp_shard"):  # replicated: the module computes on fp32 copies
                assert result[name]["computed"] == {torch.float32}, result[name]["computed"]


def test_hierarchical_case_reduces_in_two_levels(results):
    for result in results:
        assert result["dp_hierarchical"]["hierarchical_calls"] >= STEPS
        assert result["user_dp"]["hierarchical_calls"] == 0  # flat where the world is one node


def test_sampler_splits_over_data_parallel_ranks_only(results):
    for result in results:
        assert {name: result[name]["sampler"] for name in ("tp", "cp", "fsdp2", "hsdp")} == \
            {"tp": 2, "cp": 2, "fsdp2": 4, "hsdp": 4}


@pytest.mark.parametrize("name", ["dp_hierarchical", "fsdp2", "user_dp"])
def test_accumulating_micro_batches_send_no_gradient(results, name):
    """no_backward_sync(enabled=True) sends nothing; the micro-batch that steps does."""
    for result in results:
        sent = result[name]["sent"]
        assert sent[0::ACCUMULATE] == [0] * STEPS, f"{name}: accumulating micro-batches sent {sent}"
        assert min(sent[ACCUMULATE - 1::ACCUMULATE]) > 0, f"{name}: {sent}"


# --------------------------------------------------------------------------- checkpoint interchange
RESUME_PLAN = dict(dp_shard=4)  # sharded: both front-ends write a torch.distributed.checkpoint folder
RESUME_STEPS, RESUME_AT = 4, 2


def _lm_module() -> L.LightningModule:
    L.seed_everything(0, verbose=False)
    module = lap.CausalLMModule(ModelConfig(**TINY_LLAMA), lr=1e-2, warmup_steps=1, total_steps=RESUME_STEPS)
    module.configure_model()
    return module


def _from_batch(first: int, world: int):
    from torch.utils.data import Subset

    return Subset(FixedTokens(), range(first * MICRO * world, len(FixedTokens())))


def trainer_run(world: int, rank: int, steps: int, first: int = 0, ckpt_path=None, save=None) -> list[float]:
    from lightning_utils import LossRecorder, loader, quiet_trainer

    recorder = LossRecorder(average_over_ranks=True)
    trainer = quiet_trainer(strategy=lap.AttnHybridStrategy(plan=lap.ParallelPlan(**RESUME_PLAN)), devices=world,
                            max_steps=steps, precision="64-true", callbacks=[recorder])
    trainer.fit(_lm_module(), loader(_from_batch(first, world), MICRO, replicas=world, rank=rank), ckpt_path=ckpt_path)
    if save:
        trainer.save_checkpoint(save)
    return recorder.losses


def fabric_run(world: int, steps: int, first: int = 0, load=None, save=None) -> list[float]:
    """A Fabric loop over CausalLMModule's model, optimizer and schedule."""
    fabric = L.Fabric(accelerator="cpu", devices=world, strategy=lap.fabric.AttnHybridFabricStrategy(
        plan=lap.ParallelPlan(**RESUME_PLAN)), precision="64-true")
    fabric.launch()
    module = fabric.setup_module(_lm_module())
    configured = module.configure_optimizers()
    optimizer = fabric.setup_optimizers(configured["optimizer"])
    scheduler = configured["lr_scheduler"]["scheduler"]
    if load:
        remainder = fabric.load(load, {"model": module, "optimizer": optimizer})
        scheduler.load_state_dict(remainder["lr_schedulers"][0])
    loader = fabric.setup_dataloaders(DataLoader(_from_batch(first, world), batch_size=MICRO))
    losses = []
    for batch, _ in zip(loader, range(steps)):
        loss, _ = lap.fabric.training_loss(fabric, module.model, batch)
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        losses.append(float(fabric.all_reduce(loss.detach(), reduce_op="mean")))
    if save:
        fabric.save(save, {"model": module, "optimizer": optimizer, "lr_schedulers": [scheduler.state_dict()]})
    return {"losses": losses, "params": params_of(module.module.model)}


def _resume_worker(rank: int, world: int, folder: str) -> dict:
    out = {"uninterrupted": trainer_run(world, rank, RESUME_STEPS)}
    first = fabric_run(world, RESUME_AT, save=f"{folder}/fabric")
    out["fabric_first"], out["fabric_saved"] = first["losses"], first["params"]
    out["trainer_after_fabric"] = trainer_run(world, rank, RESUME_STEPS - RESUME_AT, first=RESUME_AT,
                                              ckpt_path=f"{folder}/fabric")
    trainer_run(world, rank, RESUME_AT, save=f"{folder}/trainer")
    out["fabric_after_trainer"] = fabric_run(world, RESUME_STEPS - RESUME_AT, first=RESUME_AT,
                                             load=f"{folder}/trainer")["losses"]
    return out


def test_checkpoints_interchange_between_fabric_and_trainer(results, folder):
    """Fabric save -> Trainer resume and Trainer save -> Fabric resume give the uninterrupted
    losses (and the Fabric loop's first steps are the Trainer's)."""
    result = results[0]["interchange"]
    assert (folder / "fabric").is_dir() and (folder / "trainer").is_dir()
    expected = torch.tensor(result["uninterrupted"])
    for key, part in (("fabric_first", slice(0, RESUME_AT)), ("trainer_after_fabric", slice(RESUME_AT, None)),
                      ("fabric_after_trainer", slice(RESUME_AT, None))):
        assert_close(torch.tensor(result[key]), expected[part], rtol=1e-10, name=key)
    _exports_as_saved(folder / "fabric", folder / "fabric_hf", result["fabric_saved"])


def _exports_as_saved(checkpoint, out, params: dict) -> None:
    """A Fabric checkpoint exports as a Hugging Face folder holding the saved parameters."""
    from lightning_attn_parallel.export import export
    from lightning_attn_parallel.models import from_pretrained

    export(checkpoint, out, dtype="fp32")
    exported = dict(from_pretrained(out, dtype=torch.float64).named_parameters())
    for key, value in params.items():
        assert_close(exported[key], value, rtol=1e-7, name=key)  # fp32 in the folder


# --------------------------------------------------------------------------- precisions, bad input, example
def _precision_worker(rank: int, world: int) -> dict:
    from lightning.fabric.plugins.precision import MixedPrecision

    out = {}
    for precision in ("32-true", "bf16-mixed", "bf16-true", "16-true"):
        fabric = L.Fabric(accelerator="cpu", devices=1, strategy="attn_hybrid", precision=precision)
        fabric.launch()
        model = fabric.setup_module(make_model("llama"))
        # eps representable in fp16 (16-true keeps AdamW's states in fp16 too)
        optimizer = fabric.setup_optimizers(torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1e-4))
        losses = []
        batch = next(iter(DataLoader(FixedTokens(), batch_size=4)))
        for _ in range(3):  # one batch, learned
            loss, _ = lap.fabric.training_loss(fabric, model, batch)
            fabric.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(float(loss))
        out[precision] = {"losses": losses, "plugin": type(fabric.strategy.precision).__name__,
                          "optimized": {p.dtype for g in optimizer.param_groups for p in g["params"]},
                          "computed": {p.dtype for p in model.parameters()}}
    errors = {}
    for name, attempt in {
        "protocol": lambda: _launched(lap.fabric.AttnHybridFabricStrategy(
            plan=lap.ParallelPlan(activation_checkpointing="block"))).setup_module(make_model("user")),
        "precision": lambda: L.Fabric(accelerator="cpu", devices=1, strategy="attn_hybrid",
                                      plugins=MixedPrecision("16-mixed", "cuda")),
        "backward": lambda: _plain_backward(),
    }.items():
        try:
            attempt()
        except Exception as error:  # noqa: BLE001 - the message is what is tested
            errors[name] = f"{type(error).__name__}: {error}"
    out["errors"] = errors
    return out


def _launched(strategy) -> L.Fabric:
    fabric = L.Fabric(accelerator="cpu", devices=1, strategy=strategy)
    fabric.launch()
    return fabric


def _plain_backward() -> None:
    fabric = L.Fabric(accelerator="cpu", devices=1, strategy="attn_hybrid")
    fabric.launch()
    model = fabric.setup_module(make_model("llama"))
    loss, _ = lap.fabric.training_loss(fabric, model, next(iter(DataLoader(FixedTokens(), batch_size=2))))
    loss.backward()


@pytest.fixture(scope="module")
def single():
    return run_distributed(_precision_worker, 1)[0]


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true", "16-true"])
def test_precisions_train(single, precision):
    result = single[precision]
    assert all(math.isfinite(x) for x in result["losses"]) and result["losses"][-1] < result["losses"][0]
    if precision == "bf16-mixed":  # the plan's default: fp32 masters optimized, bf16 copies computed
        assert result["plugin"] == "FabricMasterWeightsPrecision"
        assert result["optimized"] == {torch.float32} and result["computed"] == {torch.bfloat16}


@pytest.mark.parametrize("name, message", [
    ("protocol", r"PlanError: .*needs a model with `blocks`"),
    ("precision", r"UserError: Fabric\(strategy='attn_hybrid', precision='16-mixed'\) is not supported: use one of"),
    ("backward", r"RuntimeError: .*requires you to call `fabric.backward\(loss\)`"),
])
def test_bad_input_is_one_clear_line(single, name, message):
    import re

    assert re.match(message, single["errors"][name]) and "\n" not in single["errors"][name], single["errors"]


def test_example_trains_the_tiny_recipe(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    # a process group this test session started (a one-process reference) holds its MASTER_PORT
    launcher = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK")
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    run = subprocess.run([sys.executable, str(root / "examples" / "fabric_pretrain.py"), "--steps", "3",
                          "--seq-len", "32", "--micro-batch", "2", "--log-every", "1", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    losses = [float(line.split()[-1]) for line in run.stdout.splitlines() if line.startswith("step ")]
    assert len(losses) == 3 and losses[-1] < losses[0]
    saved = torch.load(tmp_path / "final", weights_only=False)  # a replicated plan's single file
    assert saved["global_step"] == 3 and all(k.startswith("model.") for k in saved["state_dict"])
    _exports_as_saved(tmp_path / "final", tmp_path / "hf",
                      {k[len("model."):]: v for k, v in saved["state_dict"].items()})
    logged = (tmp_path / "logs" / "version_0" / "metrics.csv").read_text()
    assert "throughput/tokens_per_s" in logged and "memory/peak_allocated_gib" in logged
