"""Master weights: the forward and backward compute on low-precision copies of master weights
that the optimizer updates, cast once per optimizer step, under every plan.

The mechanism is dtype-generic, so exactness is proven with fp32 compute on fp64 masters
(`MasterWeightsPrecision(torch.float32, torch.float64)`): N gloo ranks against one process on
the same global batch agree to fp32 precision (relative error < 1e-5), under replicated data
parallelism (the reducer, in the masters' dtype), tp x dp, cp x dp, ep x dp (MoE), FSDP2 and HSDP
(FSDP2's MixedPrecisionPolicy). A checkpoint holds the masters and resumes bit for bit, and the
copies are refreshed once per optimizer step however many micro-batches it has. The real
bf16-on-fp32 path runs one process on the CPU.

On one rank no bucket reduces the masters' gradients, and AdamW/Adam steps are taken by the fused
master step (parallel/master_adamw.py): the same runs with fused_master_step=False are its
reference, with weight decay, a schedule, clipping and accumulation in either dtype, and a
checkpoint of either path resumes on the other.
"""
from __future__ import annotations

import shutil
import warnings

import lightning as L

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dist_utils import assert_close, run_distributed
from lightning_utils import FixedTokens, LossRecorder, loader, params_of, quiet_trainer

import lightning_attn_parallel as lap
from lightning_attn_parallel.models import ModelConfig
from lightning_attn_parallel.planning.memory import fused_master_step, precision_spec
from lightning_attn_parallel.precision import MasterWeightsPrecision

LLAMA = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=32)
MOE = dict(family="deepseek", attention="mla", vocab_size=64, d_model=32, n_layers=3, n_heads=4,
           kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, ffn_dim=64,
           max_seq_len=32, n_routed_experts=8, n_shared_experts=1, moe_top_k=2, moe_ffn_dim=16,
           first_k_dense_replace=1)
MASTERS = dict(mixed_precision="master_weights")
# name: (model, plan, accumulate). The MoE case computes in fp64 too: fp32 routing and AdamW steps
# move its parameters by ~3e-5 between layouts (tests/test_expert_parallel_training.py), and the
# mechanism under test is the same whatever the two dtypes are.
CASES = {
    "dp4_accumulate": (LLAMA, dict(MASTERS, bucket_mb=0.01), 2),
    "dp4_accumulate_in_compute": (LLAMA, dict(MASTERS, bucket_mb=0.01, accumulate_grads_in="compute"), 2),
    "tp2_dp2": (LLAMA, dict(MASTERS, tp=2), 1),
    "cp2_dp2": (LLAMA, dict(MASTERS, cp=2, cp_kernel="ring"), 1),
    "ep2_dp4_moe": (MOE, dict(MASTERS, ep=2), 1),
    "fsdp4": (LLAMA, dict(MASTERS, dp_shard=4), 2),
    "hsdp2x2": (LLAMA, dict(MASTERS, dp_shard=2), 1),
}
STEPS, GLOBAL_BATCH = 3, 8


def compute_dtype(model: dict) -> torch.dtype:
    return torch.float64 if model is MOE else torch.float32


def rtol(model: dict) -> float:
    return 1e-10 if compute_dtype(model) == torch.float64 else 1e-5


def precision(compute: torch.dtype = torch.float32) -> MasterWeightsPrecision:
    return MasterWeightsPrecision(compute_dtype=compute, master_dtype=torch.float64)


def make_module(model: dict) -> lap.CausalLMModule:
    L.seed_everything(0, verbose=False)
    module = lap.CausalLMModule(ModelConfig(**model), lr=1e-3, warmup_steps=1, total_steps=STEPS)
    module.configure_model()
    return module


class CopyDtypes(L.Callback):
    """The dtypes of the parameters the forward computes with, and of the optimizer's tensors."""

    def __init__(self) -> None:
        self.compute: set = set()
        self.optimizer: set = set()

    def on_train_batch_start(self, trainer, pl_module, *args) -> None:
        self.compute |= {p.dtype for p in pl_module.parameters()}

    def on_train_end(self, trainer, pl_module) -> None:
        for opt in trainer.optimizers:
            self.optimizer |= {p.dtype for group in opt.param_groups for p in group["params"]}
            self.optimizer |= {v.dtype for state in opt.state.values() for k, v in state.items() if k != "step"}


def train(model: dict, plan: dict, accumulate: int, world: int, rank: int = 0) -> dict:
    module = make_module(model)
    tp_cp = plan.get("tp", 1) * plan.get("cp", 1) if world > 1 else 1
    dp = world // tp_cp
    strategy = lap.AttnHybridStrategy(plan=lap.ParallelPlan(**plan) if world > 1 else MASTERS)
    dtypes = CopyDtypes()
    trainer = quiet_trainer(strategy=strategy, devices=world, max_steps=STEPS,
                            plugins=[precision(compute_dtype(model))], accumulate_grad_batches=accumulate,
                            callbacks=[dtypes])
    trainer.fit(module, loader(FixedTokens(), GLOBAL_BATCH // dp // accumulate, replicas=dp,
                               rank=rank // tp_cp))
    masters = trainer.strategy.master_weights  # None under FSDP2
    return {"params": params_of(module), "compute": dtypes.compute, "optimizer": dtypes.optimizer,
            "fused": masters is not None and masters.fused_optimizer is not None}


def _worker(rank: int, world: int) -> dict:
    return {name: train(*case, world, rank) for name, case in CASES.items()}


@pytest.fixture(scope="module")
def results():
    return run_distributed(_worker, 4, timeout=900)


@pytest.mark.parametrize("name", list(CASES))
def test_master_weights_on_n_ranks_equal_one_process(results, name):
    model, plan, accumulate = CASES[name]
    reference = train(model, plan, accumulate, 1)
    # one process: the fused master step (parallel/master_adamw.py); torch's AdamW where buckets
    # reduce the masters' gradients or the masters are DTensors; the planner's memory model
    # (planning.memory.fused_master_step) agrees on each plan
    spec = precision_spec("bf16-mixed")
    assert reference["fused"] and fused_master_step(lap.ParallelPlan(**MASTERS).resolve(1), spec)
    for rank, result in enumerate(results):
        r = result[name]
        assert not r["fused"] and not fused_master_step(lap.ParallelPlan(**plan).resolve(4), spec)
        if not plan.get("dp_shard"):  # replicated: the module computes on the copies
            assert r["compute"] == {compute_dtype(model)}, (name, r["compute"])
        assert r["optimizer"] == {torch.float64}, (name, r["optimizer"])  # masters and states
        for key, expected in reference["params"].items():
            assert r["params"][key].dtype == torch.float64, key  # the module ends holding the masters
            assert_close(r["params"][key], expected, rtol(model), name=f"{name} rank{rank} {key}")


# ---------------------------------------------------------------------------- one cast per step
class CountCasts(TorchDispatchMode):
    """Master tensors read into the compute dtype, by any copy or conversion."""

    def __init__(self) -> None:
        super().__init__()
        self.masters: set[int] = set()
        self.tensors = 0

    def _from_master(self, source, target_dtype) -> bool:
        return (isinstance(source, torch.Tensor) and source.data_ptr() in self.masters
                and target_dtype == torch.float32)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket)
        if name.endswith("_foreach_copy_"):
            self.tensors += sum(self._from_master(s, d.dtype) for d, s in zip(*args[:2]))
        elif name.endswith("copy_") and len(args) >= 2:
            self.tensors += self._from_master(args[1], args[0].dtype)
        elif name.endswith("_to_copy"):
            self.tensors += self._from_master(args[0], kwargs.get("dtype"))
        return func(*args, **kwargs)


class CastsPerStep(L.Callback):
    def __init__(self) -> None:
        self.mode = CountCasts()

    def on_train_start(self, trainer, pl_module) -> None:
        self.mode.masters = {p.data_ptr() for p in trainer.strategy.master_weights.master_params}
        self.mode.__enter__()

    def on_train_end(self, trainer, pl_module) -> None:
        self.mode.__exit__(None, None, None)


@pytest.mark.parametrize("accumulate", [1, 3])
def test_one_cast_into_the_compute_copies_per_optimizer_step(accumulate):
    module = make_module(LLAMA)
    counter = CastsPerStep()
    trainer = quiet_trainer(strategy=lap.AttnHybridStrategy(plan=MASTERS), devices=1, max_steps=STEPS,
                            plugins=[precision()], accumulate_grad_batches=accumulate, callbacks=[counter])
    trainer.fit(module, loader(FixedTokens(), 2))
    n_params = len(list(module.parameters()))
    assert counter.mode.tensors == STEPS * n_params, (counter.mode.tensors, n_params)


# ---------------------------------------------------------------------------- resume
def _resume(rank: int, world: int, root: str) -> dict:
    out = {}
    for name, steps, ckpt in (("uninterrupted", 4, None), ("first", 2, None), ("resumed", 4, f"{root}/ckpt")):
        module = make_module(LLAMA)
        module.hparams.total_steps = 4
        recorder = LossRecorder()
        trainer = quiet_trainer(strategy=lap.AttnHybridStrategy(plan=dict(MASTERS, bucket_mb=0.01)),
                                devices=world, max_steps=steps, plugins=[precision()], callbacks=[recorder],
                                limit_train_batches=2)
        trainer.fit(module, loader(FixedTokens(n=16), 4 // world, replicas=world, rank=rank), ckpt_path=ckpt)
        if name == "first":
            trainer.save_checkpoint(f"{root}/ckpt")
        out[name] = {"losses": recorder.losses, "params": params_of(module)}
    return out


def test_resume_under_master_weights_is_bit_exact(tmp_path):
    """Two ranks save at step 2 (a single file: replicated parameters) and resume to step 4:
    the losses and the final masters equal the uninterrupted run's, bit for bit."""
    for rank, out in enumerate(run_distributed(_resume, 2, str(tmp_path), timeout=600)):
        assert out["resumed"]["losses"] == out["uninterrupted"]["losses"][2:], rank
        for key, value in out["uninterrupted"]["params"].items():
            assert torch.equal(out["resumed"]["params"][key], value), (rank, key)


# ---------------------------------------------------------------------------- bf16 on fp32
def test_bf16_mixed_master_weights_compute_in_bf16_and_keep_fp32_masters():
    """precision="bf16-mixed" with the plan's master weights: the plugin, bf16 compute copies, fp32
    masters and optimizer states, and a falling loss."""
    module = make_module(LLAMA)
    dtypes, recorder = CopyDtypes(), LossRecorder()
    trainer = quiet_trainer(strategy=lap.AttnHybridStrategy(plan=MASTERS), devices=1, max_steps=8,
                            precision="bf16-mixed", callbacks=[dtypes, recorder])
    module.hparams.lr = 1e-2
    trainer.fit(module, loader(FixedTokens(n=16), 4))
    assert isinstance(trainer.strategy.precision_plugin, MasterWeightsPrecision)
    assert dtypes.compute == {torch.bfloat16} and dtypes.optimizer == {torch.float32}
    assert all(p.dtype == torch.float32 for p in module.parameters())
    assert recorder.losses[4] < recorder.losses[0] - 0.1, recorder.losses  # the same batch, an epoch later


# ---------------------------------------------------------------------------- the fused step
# parallel/master_adamw.py: on one rank (no bucket holds a master) torch's Adam/AdamW over the
# masters is replaced by one update per master from its gradient parts, writing its compute copy.
# The same run on the unfused path (fused_master_step=False) is the reference.
class AdamModule(lap.CausalLMModule):
    """torch's Adam (L2 weight decay) instead of AdamW, with the same groups and schedule."""

    def configure_optimizers(self):
        config = super().configure_optimizers()
        adamw = config["optimizer"]
        adam = torch.optim.Adam([{"params": g["params"], "weight_decay": g["weight_decay"]}
                                 for g in adamw.param_groups], lr=self.hparams.lr, betas=tuple(self.hparams.betas))
        assert not any(g["decoupled_weight_decay"] for g in adam.param_groups)
        config["lr_scheduler"]["scheduler"] = torch.optim.lr_scheduler.LambdaLR(
            adam, config["lr_scheduler"]["scheduler"].lr_lambdas[0])
        config["optimizer"] = adam
        return config


class OptimizerStates(L.Callback):
    """The optimizer's state at the end, in parameter order, and the gradient norms logged."""

    def __init__(self) -> None:
        self.states: list[dict] = []
        self.norms: list[float] = []

    def on_before_zero_grad(self, trainer, pl_module, optimizer) -> None:
        norm = trainer.callback_metrics.get("train/grad_norm")
        if norm is not None:
            self.norms.append(float(norm))

    def on_train_end(self, trainer, pl_module) -> None:
        opt = trainer.optimizers[0]
        self.states = [{k: v.clone() for k, v in opt.state[p].items()}
                       for group in opt.param_groups for p in group["params"]]


FUSED_CASES = {  # name: (module class, Trainer arguments, plan)
    "adamw": (lap.CausalLMModule, {}, {}),
    "adam_l2": (AdamModule, {}, {}),
    "adamw_clipped": (lap.CausalLMModule, dict(gradient_clip_val=0.05), {}),
    "adam_clipped": (AdamModule, dict(gradient_clip_val=0.05), {}),
    "accumulate_in_master": (lap.CausalLMModule, dict(accumulate_grad_batches=2), {}),
    "accumulate_in_compute": (lap.CausalLMModule, dict(accumulate_grad_batches=2),
                              dict(accumulate_grads_in="compute")),
    "accumulate_clipped": (lap.CausalLMModule, dict(accumulate_grad_batches=2, gradient_clip_val=0.05), {}),
}


def fit_one(cls, trainer_args: dict, plan: dict, fused: bool, steps: int = STEPS, ckpt=None, save=None,
            callbacks=()):
    L.seed_everything(0, verbose=False)
    module = cls(ModelConfig(**LLAMA), lr=1e-2, warmup_steps=2, total_steps=4)
    module.configure_model()
    states = OptimizerStates()
    trainer = quiet_trainer(strategy=lap.AttnHybridStrategy(plan=dict(MASTERS, fused_master_step=fused, **plan)),
                            devices=1, max_steps=steps, plugins=[precision()], callbacks=[states, *callbacks],
                            **trainer_args)
    trainer.fit(module, loader(FixedTokens(n=16), 2), ckpt_path=ckpt)
    if save:
        trainer.save_checkpoint(save)
    masters = trainer.strategy.master_weights
    assert (masters.fused_optimizer is not None) == fused  # the path under test was taken
    return {"params": params_of(module), "states": states.states, "norms": states.norms}


@pytest.mark.parametrize("name", list(FUSED_CASES))
def test_fused_master_step_equals_torch_adam_over_the_masters(name):
    cls, trainer_args, plan = FUSED_CASES[name]
    fused, reference = (fit_one(cls, trainer_args, plan, f) for f in (True, False))
    if "gradient_clip_val" in trainer_args:  # the clipping was active, and reported alike
        assert min(reference["norms"]) > trainer_args["gradient_clip_val"], reference["norms"]
        for a, b in zip(fused["norms"], reference["norms"], strict=True):
            assert a == pytest.approx(b, rel=1e-10)
    for key, expected in reference["params"].items():
        assert fused["params"][key].dtype == torch.float64
        assert_close(fused["params"][key], expected, 1e-10, name=f"{name} {key}")
    assert len(fused["states"]) == len(reference["states"])
    for i, (a, b) in enumerate(zip(fused["states"], reference["states"])):
        assert list(a) == list(b) == ["step", "exp_avg", "exp_avg_sq"], (list(a), list(b))
        assert a["step"].dtype == b["step"].dtype and a["step"].device == b["step"].device
        assert torch.equal(a["step"], b["step"]), (i, a["step"], b["step"])
        for k in ("exp_avg", "exp_avg_sq"):
            assert a[k].dtype == b[k].dtype == torch.float64
            assert_close(a[k], b[k], 1e-10, name=f"{name} state {i} {k}")


@pytest.mark.parametrize("first", [True, False], ids=["fused_then_unfused", "unfused_then_fused"])
def test_a_checkpoint_resumes_on_the_other_path_bit_for_bit(tmp_path, first):
    """Two steps on one path, saved; two more on the other: the masters and optimizer states
    equal four uninterrupted steps on the second path, bit for bit."""
    cls, epoch = lap.CausalLMModule, dict(limit_train_batches=2)  # saved at an epoch's end
    fit_one(cls, epoch, {}, first, steps=2, save=f"{tmp_path}/ckpt")
    resumed = fit_one(cls, epoch, {}, not first, steps=4, ckpt=f"{tmp_path}/ckpt")
    whole = fit_one(cls, epoch, {}, not first, steps=4)
    for key, value in whole["params"].items():
        assert torch.equal(resumed["params"][key], value), key
    for a, b in zip(resumed["states"], whole["states"], strict=True):
        for k in b:
            assert torch.equal(a[k], b[k]), k


class NaNGradient(torch.autograd.Function):
    """Identity forward; a NaN gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


class PoisonedGradient(lap.CausalLMModule):
    """A finite loss whose gradient is NaN at optimizer step 2."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.global_step + 1 == 2:
            loss = loss + NaNGradient.apply(next(self.parameters())).sum() * 0
        return loss


def test_the_nonfinite_guard_names_a_nan_gradient_under_the_fused_step():
    from lightning_attn_parallel.callbacks.nonfinite import NonFiniteGuard, NonFiniteStep

    with pytest.raises(NonFiniteStep, match=r"^step 2 is not finite: gradient norm on rank 0;"):
        fit_one(PoisonedGradient, dict(log_every_n_steps=1), {}, True, steps=4, callbacks=[NonFiniteGuard()])


def _fabric_fit(fused: bool) -> dict:
    from lightning_attn_parallel.precision import FabricMasterWeightsPrecision

    L.seed_everything(0, verbose=False)
    fabric = L.Fabric(accelerator="cpu", devices=1, plugins=[FabricMasterWeightsPrecision(torch.float32, torch.float64)],
                      strategy=lap.fabric.AttnHybridFabricStrategy(plan=dict(MASTERS, fused_master_step=fused)))
    fabric.launch()
    model = fabric.setup_module(make_module(LLAMA).model)
    optimizer = fabric.setup_optimizers(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1))
    assert (fabric.strategy.master_weights.fused_optimizer is not None) == fused
    norms = []
    for batch in list(loader(FixedTokens(n=16), 4))[:3]:
        loss, _ = lap.fabric.training_loss(fabric, model, batch)
        fabric.backward(loss)
        norms.append(float(fabric.clip_gradients(model, optimizer, max_norm=0.05)))
        optimizer.step()
        optimizer.zero_grad()
    with fabric.strategy.masters_in_place():
        return {"params": params_of(model), "norms": norms}


def test_fused_master_step_under_fabric_clips_as_torch_adamw():
    fused, reference = _fabric_fit(True), _fabric_fit(False)
    assert min(reference["norms"]) > 0.05, reference["norms"]  # every step clipped
    assert fused["norms"] == pytest.approx(reference["norms"], rel=1e-10)
    for key, expected in reference["params"].items():
        assert_close(fused["params"][key], expected, 1e-10, name=key)


class Materialize(L.Callback):
    """A reader of the masters' `.grad` before the step (and before clipping)."""

    def __init__(self) -> None:
        self.seen = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        masters = trainer.strategy.master_weights
        masters.materialize_grads()
        self.seen += sum(m.grad is not None for m in masters.master_params)


def test_materialized_gradients_step_as_the_unfused_path():
    """materialize_grads() puts the parts into master.grad: clipping and torch's own step then
    take them, and the copies are refreshed, as on the unfused path."""
    args = dict(accumulate_grad_batches=2, gradient_clip_val=0.05)
    reader = Materialize()
    fused = fit_one(lap.CausalLMModule, args, {}, True, callbacks=[reader])
    reference = fit_one(lap.CausalLMModule, args, {}, False)
    assert reader.seen == STEPS * len(fused["params"])
    assert fused["norms"] == pytest.approx(reference["norms"], rel=1e-10)
    for key, expected in reference["params"].items():
        assert_close(fused["params"][key], expected, 1e-10, name=key)


def test_a_skipped_nonfinite_step_leaves_the_masters_alone_under_the_fused_step():
    from lightning_attn_parallel.callbacks.nonfinite import NonFiniteGuard

    fused, reference = (fit_one(PoisonedGradient, {}, {}, f, steps=3, callbacks=[NonFiniteGuard(skip_nonfinite=1)])
                        for f in (True, False))
    for key, expected in reference["params"].items():
        assert torch.isfinite(fused["params"][key]).all(), key
        assert_close(fused["params"][key], expected, 1e-10, name=key)


@pytest.mark.parametrize("cls", [torch.optim.AdamW, torch.optim.Adam])
def test_step_masters_with_steps_beside_the_parameters_matches_torch_fused(cls):
    """fused=True keeps `step` beside the parameters (here the CPU): the bias corrections, the
    learning rate and the clipping multiplier reach the update as 0-dim tensors, the form the
    compiled CUDA kernel takes; torch's fused kernel over the summed gradients is the reference."""
    from lightning_attn_parallel.parallel.master_adamw import step_masters

    torch.manual_seed(0)
    shapes = [(5, 7), (13,)]
    masters = [torch.nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in shapes]
    twins = [torch.nn.Parameter(m.detach().clone()) for m in masters]
    opt, ref = (cls(ps, lr=1e-2, weight_decay=0.1, fused=True) for ps in (masters, twins))
    copies = [torch.empty(s, dtype=torch.float32) for s in shapes]
    for k in range(1, 4):
        for o in (opt, ref):
            o.param_groups[0]["lr"] = 1e-2 * k  # as a scheduler would
        grads = [torch.randn(s, dtype=torch.float32) for s in shapes]
        held = [torch.randn(s, dtype=torch.float64) if k > 1 else None for s in shapes]
        multiplier = torch.tensor(0.5, dtype=torch.float64)
        for t, g, h in zip(twins, grads, held):
            t.grad = (g.double() if h is None else h + g) * multiplier
        ref.step()
        step_masters(opt, {id(m): (m, h, g, c) for m, h, g, c in zip(masters, held, grads, copies)}, multiplier)
    for m, t, c in zip(masters, twins, copies):
        assert_close(m, t, 1e-12, name="master")
        assert torch.equal(c, m.detach().float())
        for key in ("exp_avg", "exp_avg_sq"):
            assert_close(opt.state[m][key], ref.state[t][key], 1e-12, name=key)
        a, b = opt.state[m]["step"], ref.state[t]["step"]
        assert (a.dtype, a.device, float(a)) == (b.dtype, b.device, float(b)) == (torch.float32, b.device, 3.0)


def test_clipping_then_materializing_gives_the_clipped_gradients():
    """clip_ before materialize_grads: master.grad holds the held sum plus the copy's gradient,
    times the coefficient, as the unfused path's clipped gradient."""
    from lightning_attn_parallel.parallel.clipping import clip_grad_norm_
    from lightning_attn_parallel.parallel.master_weights import MasterWeights

    torch.manual_seed(0)
    grads = {}
    for fused in (True, False):
        module = torch.nn.Linear(4, 3).double()
        module.load_state_dict({k: torch.ones_like(v) for k, v in module.state_dict().items()})
        masters = MasterWeights(module, torch.float32)
        optimizer = torch.optim.AdamW(masters.master_params)
        masters.fused_optimizer = optimizer if fused else None
        for synced, seed in ((False, 1), (True, 2)):  # two micro-batches
            masters.synced = synced
            module(torch.randn(2, 4, generator=torch.Generator().manual_seed(seed))).square().sum().backward()
            if synced:
                masters.flush()
        if fused:
            norm = masters.clip_(0.01)
            masters.materialize_grads()
            assert not masters.holds_step_gradients(optimizer)
        else:
            norm = clip_grad_norm_(masters.master_params, 0.01)
        assert norm > 0.01
        grads[fused] = [m.grad.clone() for m in masters.master_params]
    for a, b in zip(grads[True], grads[False], strict=True):
        assert torch.equal(a, b)


def group(params, exp_avgs, exp_avg_sqs, grad, args) -> tuple:
    """`adam_update_group_`'s arguments for one gradient and no held sum, clipping or copy, from
    `adam_update_`'s scalars `args` (lr, beta1, beta2, eps, weight_decay, decoupled, bc1, bc2)."""
    lr, beta1, beta2, eps, weight_decay, decoupled, bc1, bc2 = args
    n = len(params)
    return (params, exp_avgs, exp_avg_sqs, [None] * n, [grad] * n, None, [None] * n, [lr] * n,
            beta1, beta2, eps, weight_decay, decoupled, [bc1] * n, [bc2] * n)


def test_the_compiled_step_takes_a_few_graphs_for_a_whole_model_and_none_after_the_first_step(monkeypatch):
    """The update is compiled over groups of tensors of one signature: a Llama's parameters take
    one graph per group length (not one per shape or per tensor), a later step with a new learning
    rate compiles nothing, and the numbers are torch's fused AdamW's."""
    from torch._dynamo.testing import CompileCounter

    from lightning_attn_parallel.parallel import master_adamw

    counter = CompileCounter()
    monkeypatch.setattr(master_adamw, "_compiled", None)
    monkeypatch.setattr(master_adamw, "_compiles", lambda device: True)
    monkeypatch.setattr(master_adamw, "_BACKEND", counter)
    torch._dynamo.reset()
    dim, kv, ffn, vocab, layers = 16, 8, 24, 40, 8
    per_layer = [(dim,), (dim, dim), (kv, dim), (kv, dim), (dim, dim), (dim,), (ffn, dim), (dim, ffn), (ffn, dim)]
    shapes = [(vocab, dim)] + per_layer * layers + [(dim,), (vocab, dim)]
    torch.manual_seed(0)
    masters = [torch.nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in shapes]
    twins = [torch.nn.Parameter(m.detach().clone()) for m in masters]
    opt, ref = (torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True) for ps in (masters, twins))
    copies = [torch.empty(s, dtype=torch.float32) for s in shapes]
    for k in range(1, 4):
        for o in (opt, ref):
            o.param_groups[0]["lr"] = 1e-2 * k  # as a scheduler would
        grads = [torch.randn(s, dtype=torch.float32) for s in shapes]
        for t, g in zip(twins, grads):
            t.grad = g.double()
        ref.step()
        master_adamw.step_masters(opt, {id(m): (m, None, g, c) for m, g, c in zip(masters, grads, copies)}, None)
        if k == 1:
            graphs = counter.frame_count
    batches = master_adamw.groups([(m, None, g, c) for m, g, c in zip(masters, grads, copies)])
    assert len(batches) < len(shapes) / 4
    assert graphs == len({(len(b), len(shapes[b[0]])) for b in batches})  # lengths x ranks
    assert counter.frame_count == graphs  # steps 2 and 3: new learning rates, no new graph
    # sizes that coincide (a square matrix) do not split a graph: groups of 4 (16, 16) and then
    # 4 (8, 16) tensors share one (duck shaping would make the square's two sizes one symbol)
    torch._dynamo.reset()
    counter.clear()
    update = master_adamw._compile(master_adamw.adam_update_group_)
    for shape in ((16, 16), (8, 16)):
        p, m, v = ([torch.zeros(shape, dtype=torch.float64) for _ in range(4)] for _ in range(3))
        lr = torch.tensor(0.1, dtype=torch.float64)
        update(p, m, v, [None] * 4, [torch.ones(shape)] * 4, None, [None] * 4, [lr] * 4, 0.9, 0.999,
               1e-8, 0.0, True, [lr] * 4, [lr] * 4)
    assert counter.frame_count == 1
    for m, t, c in zip(masters, twins, copies):
        assert_close(m, t, 1e-12, name="master")
        assert torch.equal(c, m.detach().float())
        for key in ("exp_avg", "exp_avg_sq"):
            assert_close(opt.state[m][key], ref.state[t][key], 1e-12, name=key)


@pytest.mark.skipif(shutil.which("g++") is None, reason="inductor compiles for the CPU with a C++ compiler")
def test_the_update_compiled_by_inductor_equals_torch_adamw(monkeypatch):
    """The grouped update through inductor itself (here its CPU code generation): fp32 masters,
    bf16 gradients and copies, held sums on alternate steps and a clipping multiplier, within
    fp32's tolerance of torch's fused AdamW, the copies exactly the rounded masters, and a third
    step that compiles nothing new."""
    from torch._dynamo.utils import counters

    from lightning_attn_parallel.parallel import master_adamw

    monkeypatch.setattr(master_adamw, "_compiled", None)
    monkeypatch.setattr(master_adamw, "_compiles", lambda device: True)
    torch._dynamo.reset()
    shapes = [(40, 16), (16,), (16, 16), (8, 16), (8, 16), (16, 16), (16,), (16,), (40, 16)]
    torch.manual_seed(0)
    masters = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    twins = [torch.nn.Parameter(m.detach().clone()) for m in masters]
    opt, ref = (torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True) for ps in (masters, twins))
    copies = [torch.empty(s, dtype=torch.bfloat16) for s in shapes]
    multiplier = torch.tensor(0.7)
    for k in range(1, 4):
        for o in (opt, ref):
            o.param_groups[0]["lr"] = 1e-2 * k
        grads = [torch.randn(s).to(torch.bfloat16) for s in shapes]
        held = [torch.randn(s) if k == 2 else None for s in shapes]
        for t, g, h in zip(twins, grads, held):
            t.grad = (g.float() if h is None else h + g.float()) * multiplier
        ref.step()
        with warnings.catch_warnings():
            warnings.filterwarnings("error", "the fused master step could not be compiled")  # no eager fallback
            master_adamw.step_masters(opt, {id(m): (m, h, g, c) for m, h, g, c in zip(masters, held, grads, copies)},
                                      multiplier)
        if k == 2:
            graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs
    assert master_adamw._compiled is not master_adamw.adam_update_group_  # compiled, not fallen back
    for m, t, c in zip(masters, twins, copies):
        assert_close(m, t, 1e-5, name="master")
        assert torch.equal(c, m.detach().to(torch.bfloat16))
        for key in ("exp_avg", "exp_avg_sq"):
            assert_close(opt.state[m][key], ref.state[t][key], 1e-5, name=key)


def test_a_fused_update_that_cannot_compile_runs_eagerly_with_one_warning(monkeypatch):
    """If compiling the update fails on a machine, the step is taken eagerly (the same numbers)
    with a warning, and later steps go straight to the eager update."""
    from lightning_attn_parallel.parallel import master_adamw

    def broken(*args):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(master_adamw, "_compiled", None)
    update = master_adamw._compiled_or_eager(broken)
    torch.manual_seed(0)
    tensors = [torch.randn(16, dtype=torch.float64) for _ in range(2)]
    expected = [t.clone() for t in tensors]
    m, v = torch.zeros(16, dtype=torch.float64), torch.zeros(16, dtype=torch.float64)
    m2, v2 = m.clone(), v.clone()
    grad = torch.randn(16, dtype=torch.float32)
    args = (0.1, 0.9, 0.999, 1e-8, 0.01, True, 0.1, 0.001 ** 0.5)
    with pytest.warns(UserWarning, match="could not be compiled.*no compiler here"):
        update(*group([tensors[0]], [m], [v], grad, args))
    master_adamw.adam_update_(expected[0], m2, v2, None, grad, None, None, *args)
    assert torch.equal(tensors[0], expected[0]) and torch.equal(m, m2) and torch.equal(v, v2)
    assert master_adamw._compiled is master_adamw.adam_update_group_


def test_a_failed_compile_is_tried_once_not_per_tensor(monkeypatch):
    """The rest of the step that saw the failure (which still holds the wrapper) runs eagerly
    without compiling again."""
    from lightning_attn_parallel.parallel import master_adamw

    calls = []

    def broken(*args):
        calls.append(1)
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(master_adamw, "_compiled", None)
    update = master_adamw._compiled_or_eager(broken)
    args = (0.1, 0.9, 0.999, 1e-8, 0.01, True, 0.1, 0.001 ** 0.5)
    with pytest.warns(UserWarning, match="could not be compiled"):
        for _ in range(3):
            p, m, v = (torch.zeros(4, dtype=torch.float64) for _ in range(3))
            update(*group([p], [m], [v], torch.ones(4), args))
    assert len(calls) == 1
