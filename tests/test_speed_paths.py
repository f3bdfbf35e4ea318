"""The speed paths are exact on CPU: the accumulation policies under FSDP2/HSDP, replicated
bf16-mixed on cast parameters, and the local attention kernel's native GQA against copying K/V
heads.

One 4-process spawn runs every distributed case: for each accumulation policy, FSDP (dp_shard=4)
and HSDP (2 x 2) equal one process on the global batch (2 micro-batches per step, fp64, two
AdamW steps), and the collectives each micro-batch sends are
counted. The planner's accumulation terms are checked by hand.
"""
from __future__ import annotations

import copy
from dataclasses import replace
from functools import partial

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh

from torch.nn.attention import SDPBackend

from lightning_attn_parallel.models.layers import LocalAttentionKernel
from lightning_attn_parallel.parallel.fully_sharded import ACCUMULATION, apply_fully_sharded, set_gradient_sync
from lightning_attn_parallel.plan import ParallelPlan, PlanError
from lightning_attn_parallel.planning import H100_SXM, ClusterSpec, estimate_memory, estimate_time
from lightning_attn_parallel.planning.select import make_workload, resolve_accumulation
from dist_utils import assert_close, run_distributed
from test_fully_sharded import ROWS, _CountCollectives, global_and_local_batches
from test_planner import DEEPSEEK_67B, NO_SLACK, PARAMS, TINY
from test_tensor_parallel import RTOL, check_parity, make_batch, mean_loss, tiny_model


# ---------------------------------------------------------------------------- accumulation
def _accumulation_parity(name: str, dp_rank: int, mesh, policy: str) -> None:
    """fp64: losses, first-step gradients and parameters after two AdamW steps."""
    reference = tiny_model(torch.float64)
    model = apply_fully_sharded(copy.deepcopy(reference), mesh)
    global_steps, local_steps = global_and_local_batches(dp_rank, mesh.size(), 2)
    check_parity(model, reference, local_steps, RTOL[torch.float64], f"{name} {policy}",
                 ref_batches=global_steps, set_sync=partial(set_gradient_sync, accumulation=policy),
                 average_loss=True)


def _counts_per_micro_batch(mesh, policy: str) -> list[dict[str, int]]:
    """Collectives sent by the backward of an accumulating micro-batch, then of the last one."""
    model = apply_fully_sharded(tiny_model(), mesh)
    counts = []
    for i, last in enumerate((False, True)):
        set_gradient_sync(model, last, policy)
        loss = mean_loss(model, *make_batch(ROWS, seed=i))
        with _CountCollectives() as comm:
            loss.backward()
        counts.append(comm.counts)
    return counts


def _accumulation_worker(rank: int, world: int) -> dict:
    meshes = {"fsdp": init_device_mesh("cpu", (4,), mesh_dim_names=("dp_shard",)),
              "hsdp": init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_replicate", "dp_shard"))}
    counts = {}
    for name, mesh in meshes.items():
        for policy in ACCUMULATION:
            if policy != "defer_all":  # test_fully_sharded covers today's default
                _accumulation_parity(name, rank, mesh, policy)
            counts[name, policy] = _counts_per_micro_batch(mesh, policy)
    return counts


def test_accumulation_policies_parity_and_collectives_per_micro_batch():
    groups = tiny_model().config.n_layers + 1  # one FSDP unit per block, plus the root
    nothing = {"reduce_scatter": 0, "all_reduce": 0}
    scatter = {"reduce_scatter": groups, "all_reduce": 0}
    both = {"reduce_scatter": groups, "all_reduce": groups}
    expected = {  # (accumulating micro-batch, last micro-batch)
        ("fsdp", "defer_all"): (nothing, scatter),
        ("fsdp", "reduce_scatter_each"): (scatter, scatter),
        ("fsdp", "defer_all_reduce"): (scatter, scatter),
        ("hsdp", "defer_all"): (nothing, both),
        ("hsdp", "reduce_scatter_each"): (both, both),
        ("hsdp", "defer_all_reduce"): (scatter, both),
    }
    for rank_counts in run_distributed(_accumulation_worker, 4):
        for key, (accumulating, last) in expected.items():
            assert rank_counts[key] == [accumulating, last], (key, rank_counts[key])


def test_unknown_accumulation_policy_is_refused():
    with pytest.raises(PlanError, match="accumulation='sometimes'.*defer_all_reduce"):
        ParallelPlan(accumulation="sometimes")
    with pytest.raises(ValueError, match="accumulation='auto'"):
        set_gradient_sync(torch.nn.Linear(1, 1), False, "auto")  # the strategy resolves "auto"


# ---------------------------------------------------------------------------- planner terms
def test_accumulation_memory_by_hand():
    def grads(dp_replicate: int, policy: str) -> float:
        plan = ParallelPlan(dp_replicate=dp_replicate, dp_shard=2, accumulation=policy)
        return estimate_memory(TINY, plan, 1, 8, "bf16-mixed", H100_SXM, grad_accum=4,
                               calibration=NO_SLACK).grads

    sharded = PARAMS / 2 * 4  # fp32 gradients of this rank's shard
    assert grads(1, "defer_all") == sharded + PARAMS * 4  # the unsharded ones persist
    assert grads(1, "reduce_scatter_each") == sharded
    assert grads(1, "defer_all_reduce") == sharded  # no replicas: the same as reduce_scatter_each
    assert grads(2, "defer_all_reduce") == 2 * sharded  # FSDP2's partial sums beside them
    assert grads(1, "auto") == grads(1, "defer_all")  # unresolved: counted at its most


def test_accumulation_time_by_hand():
    """reduce_scatter_each sends everything every micro-batch; defer_all_reduce sends the
    reduce-scatter every micro-batch and the all-reduce across replicas once."""
    cluster = ClusterSpec(16, 8)

    def timing(policy: str, accumulate: int = 4):
        plan = ParallelPlan(dp_replicate=2, dp_shard=8, tp=8, accumulation=policy,
                            activation_checkpointing="block")
        return estimate_time(DEEPSEEK_67B, plan, cluster, H100_SXM, 1, 4096, "bf16-mixed",
                             grad_accum=accumulate)

    once = timing("defer_all")
    assert timing("defer_all", 1).dp_reduce_s == pytest.approx(once.dp_reduce_s)
    assert timing("reduce_scatter_each").dp_reduce_s == pytest.approx(4 * once.dp_reduce_s)
    single = timing("defer_all_reduce", 1).dp_reduce_s
    scatter_only = (timing("defer_all_reduce", 2).dp_reduce_s - single)  # one more reduce-scatter
    assert 0 < scatter_only < single
    assert timing("defer_all_reduce").dp_reduce_s == pytest.approx(single + 3 * scatter_only)


def test_planner_resolves_auto_accumulation_by_memory_and_time():
    """The deepseek_67b recipe on 128 GPUs: deferring everything keeps every unsharded fp32
    gradient of the tp shard (35 GiB). On an H100 that fits and is fastest (dp_shard spans
    nodes, so reduce-scatters per micro-batch are exposed); on a 40 GiB card only the sharded
    policies fit, and the planner takes the faster of them."""
    plan = ParallelPlan(dp_replicate=2, dp_shard=8, tp=8, activation_checkpointing="block")
    work = make_workload(DEEPSEEK_67B, ClusterSpec(16, 8), H100_SXM, 1, 4096, "bf16-mixed",
                         grad_accum=4, loss_chunk_tokens=4096)
    for gpu, expected in ((H100_SXM, "defer_all"), (replace(H100_SXM, memory_gib=40.0), "defer_all_reduce")):
        card = replace(work, gpu=gpu)
        by_policy = {p: card.evaluate(replace(plan, accumulation=p)) for p in ACCUMULATION}
        assert by_policy["defer_all"].memory.grads - by_policy["reduce_scatter_each"].memory.grads > 30 * 2**30
        fitting = [e for e in by_policy.values() if e.fits]
        fastest = max(fitting, key=lambda e: (e.tokens_per_s_per_gpu, -e.memory.total))
        chosen = resolve_accumulation(card, plan)
        assert chosen.plan.accumulation == fastest.plan.accumulation == expected
        assert chosen.fits and chosen.timing is not None
    assert resolve_accumulation(replace(work, grad_accum=1), plan).plan.accumulation == "defer_all"
    tight = replace(work, gpu=replace(H100_SXM, memory_gib=40.0))
    kept = resolve_accumulation(tight, replace(plan, accumulation="defer_all"))
    assert kept.plan.accumulation == "defer_all" and not kept.fits  # a requested policy is kept


# ---------------------------------------------------------------------------- attention backend
def _attention_by_copying_heads(q, k, v, scale=None):
    """The kernel as it was: K/V heads repeated to every query head, then plain SDPA."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kv_heads", [1, 2, 8])
def test_native_gqa_equals_copied_heads(dtype, kv_heads):
    kernel = LocalAttentionKernel()
    gen = torch.Generator().manual_seed(kv_heads)
    q = torch.randn(2, 8, 16, 8, generator=gen, dtype=dtype, requires_grad=True)
    k = torch.randn(2, kv_heads, 16, 8, generator=gen, dtype=dtype, requires_grad=True)
    v = torch.randn(2, kv_heads, 16, 4, generator=gen, dtype=dtype, requires_grad=True)
    out = kernel(q, k, v)
    expected = _attention_by_copying_heads(q, k, v)
    assert_close(out, expected, RTOL[dtype], name="output")
    grad = torch.randn(out.shape, generator=gen, dtype=dtype)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(expected, (q, k, v), grad)
    for name, a, b in zip("qkv", got, want):
        assert_close(a, b, RTOL[dtype], name=f"d{name}")
    kernel.scale = 0.3  # MLA-style explicit scale goes through too
    assert_close(kernel(q, k, v), _attention_by_copying_heads(q, k, v, 0.3), RTOL[dtype])


def test_sdpa_backend_order(monkeypatch):
    from lightning_attn_parallel.models import attention_backend

    def backends(capability, cudnn=True):
        monkeypatch.setattr(attention_backend, "_CHOSEN", {})
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
        monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: cudnn)
        return attention_backend.sdpa_backends("cuda")

    assert backends((9, 0))[:2] == (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION)
    assert backends((8, 0))[0] == SDPBackend.FLASH_ATTENTION  # Ampere: flash first
    assert backends((9, 0), cudnn=False)[0] == SDPBackend.FLASH_ATTENTION
    assert SDPBackend.MATH in backends((9, 0))  # every shape still has a kernel
    assert "cudnn_attention > flash_attention" in attention_backend.describe_sdpa_backends("cuda")
    assert attention_backend.sdpa_backends("cpu") == ()


# ---------------------------------------------------------------------------- bf16 on cast params
def _reference_cast_params(master, steps, dp: int, lr: float):
    """The arithmetic of mixed_precision="cast_params", written out: every rank runs forward and
    backward on a bf16 copy of the fp32 master weights; its bf16 gradients are upcast, summed
    over micro-batches and averaged over ranks in fp32; SGD updates the fp32 masters."""
    opt = torch.optim.SGD(master.parameters(), lr=lr)
    losses, first_grads = [], {}
    for step, micro_batches in enumerate(steps):
        step_loss = 0.0
        for tokens, targets in micro_batches:
            for r in range(dp):
                rows = slice(r * ROWS, (r + 1) * ROWS)
                work = copy.deepcopy(master).to(torch.bfloat16)
                loss = mean_loss(work, tokens[rows], targets[rows]) / len(micro_batches)
                loss.backward()
                step_loss += loss.item() / dp
                for m, w in zip(master.parameters(), work.parameters()):
                    g = w.grad.float() / dp
                    m.grad = g if m.grad is None else m.grad + g
        if step == 0:
            first_grads = {n: p.grad.clone() for n, p in master.named_parameters()}
        opt.step()
        opt.zero_grad()
        losses.append(step_loss)
    return losses, first_grads, {n: p.detach().clone() for n, p in master.named_parameters()}


def _count_unshards() -> list:
    """Names of the FSDP2 units unsharded (for cast_params: cast from the fp32 masters) since the
    list was last cleared, counted at FSDP2's unshard entry point (torch 2.11-2.13)."""
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

    seen: list = []
    original = FSDPParamGroup.unshard

    def counting(self, *args, **kwargs):
        if self._all_gather_result is None and not self.is_unsharded:
            seen.append(self._module_fqn)
        return original(self, *args, **kwargs)

    FSDPParamGroup.unshard = counting  # the worker process ends after the test
    return seen


def _cast_params_worker(rank: int, world: int) -> dict:
    from lightning_attn_parallel.mesh import build_meshes
    from lightning_attn_parallel.parallel.apply import parallelize
    from torch.distributed.tensor import DTensor

    plan = ParallelPlan(mixed_precision="cast_params").resolve(world)
    reference = tiny_model()
    model = copy.deepcopy(reference)
    if rank:  # replicas that start apart are made equal (rank 0's weights) before training
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
    result = parallelize(model, model, plan, build_meshes(plan, "cpu", world), precision="bf16-mixed",
                         cluster=ClusterSpec(1, world))
    assert result.gradients.fully_sharded and result.gradients.reducer is None
    assert all(isinstance(p, DTensor) and p.dtype == torch.float32 for p in model.parameters())
    residual = []
    model.blocks[0].register_forward_hook(lambda m, i, out: residual.append(out.dtype))
    global_steps, local_steps = global_and_local_batches(rank, world, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses, grads = [], {}
    casts = _count_unshards()
    for step, micro_batches in enumerate(local_steps):
        step_loss = torch.zeros(())
        for i, (tokens, targets) in enumerate(micro_batches):
            set_gradient_sync(model, i == len(micro_batches) - 1)
            casts.clear()
            loss = mean_loss(model, tokens, targets) / len(micro_batches)
            loss.backward()
            # one cast of the fp32 masters per FSDP unit (blocks + root) and micro-batch: the
            # bf16 copy is kept for the backward rather than cast again
            assert len(casts) == len(model.blocks) + 1, casts
            step_loss += loss.detach().float()
        torch.distributed.all_reduce(step_loss, op=torch.distributed.ReduceOp.AVG)
        if step == 0:
            grads = {n: p.grad.full_tensor().clone() for n, p in model.named_parameters()}
            assert all(p.grad.dtype == torch.float32 for p in model.parameters())
        opt.step()
        opt.zero_grad()
        losses.append(step_loss.item())
    ref_losses, ref_grads, ref_params = _reference_cast_params(reference, global_steps, world, lr=0.5)
    # Same arithmetic, so fp32's tolerance (the reductions sum in another order); the bf16
    # compute itself sits 1e-2 from an fp32 model, which the last check shows is not what this is.
    assert_close(torch.tensor(losses), torch.tensor(ref_losses), 1e-5, name="losses")
    for n, p in model.named_parameters():
        assert_close(grads[n], ref_grads[n], 1e-5, name=f"grad {n}")
        assert_close(p.full_tensor(), ref_params[n], 1e-5, name=f"param {n}")
    fp32_loss = mean_loss(tiny_model(), *local_steps[0][0]).item()
    return {"residual": residual[0], "bf16_vs_fp32": abs(losses[0] - fp32_loss)}


def test_replicated_bf16_mixed_on_cast_params_equals_its_arithmetic():
    for result in run_distributed(_cast_params_worker, 2):
        assert result["residual"] == torch.bfloat16  # the residual stream itself runs in bf16
        assert result["bf16_vs_fp32"] > 1e-4  # and the arithmetic matched is not fp32's


def test_cast_params_only_changes_mixed_precisions():
    from lightning_attn_parallel.parallel.fully_sharded import casts_parameters

    cast = ParallelPlan(mixed_precision="cast_params")
    assert casts_parameters(cast, "bf16-mixed") and casts_parameters(cast, "16-mixed")
    assert not casts_parameters(cast, "bf16-true") and not casts_parameters(cast, "32-true")
    assert not casts_parameters(ParallelPlan(), "bf16-mixed")  # Lightning's autocast by default
    assert casts_parameters(ParallelPlan(dp_shard=2), "32-true")  # sharding always uses FSDP2
    with pytest.raises(PlanError, match="mixed_precision='fp8'.*cast_params"):
        ParallelPlan(mixed_precision="fp8")


def test_planner_counts_cast_params_like_fsdp_mixed_precision():
    """Replicated cast_params: fp32 master weights, gradients and AdamW states as autocast, but
    activations as wide as bf16-true's and no autocast weight copies."""
    from test_planner import ANCHOR_1B

    def memory(plan: ParallelPlan, precision: str = "bf16-mixed"):
        return estimate_memory(ANCHOR_1B, plan, 8, 2048, precision, H100_SXM, calibration=NO_SLACK)

    autocast = memory(ParallelPlan(mixed_precision="autocast"))
    cast = memory(ParallelPlan(mixed_precision="cast_params"))
    true = memory(ParallelPlan(), "bf16-true")
    assert (cast.params, cast.grads, cast.optimizer) == (autocast.params, autocast.grads, autocast.optimizer)
    assert cast.activations == true.activations < autocast.activations
    # every block's bf16 copy lives from the forward to the backward (no reshard over one rank):
    # 2 bytes for each of the ~87% of parameters in blocks, against 4 for the fp32 masters
    assert 0.40 * cast.params < cast.comm < 0.5 * cast.params


# ---------------------------------------------------------------------------- compile modes
def test_compile_modes_and_the_old_bool():
    from lightning_attn_parallel.parallel.apply import apply_compile

    assert ParallelPlan(compile=True).compile == "block" and ParallelPlan(compile=True).compiled
    assert ParallelPlan(compile=False).compile == "none" and not ParallelPlan(compile=False).compiled
    assert not ParallelPlan().compiled
    with pytest.raises(PlanError, match="compile='fast'.*block, model"):
        ParallelPlan(compile="fast")
    for bad in (dict(tp=2), dict(dp_shard=2), dict(cp=2), dict(mixed_precision="cast_params")):
        with pytest.raises(PlanError, match="compile='model' composes with replicated"):
            ParallelPlan(compile="model", **bad)
    for mode, model_compiled, blocks_compiled in (("block", False, True), ("model", True, False),
                                                  ("none", False, False)):
        model = tiny_model()
        apply_compile(model, mode)
        assert (model._compiled_call_impl is not None) == model_compiled, mode
        assert all((b._compiled_call_impl is not None) == blocks_compiled for b in model.blocks), mode
        assert (model.loss_kernel._compiled_call_impl is not None) == (mode != "none"), mode


def test_planner_and_apply_compile_agree_on_the_compiled_loss_kernel():
    """The planner's rule (planning.memory.compiled_loss_kernel) is what apply_compile does: the
    local kernel is compiled under either compiled mode; the vocabulary-parallel kernel that
    tensor parallelism puts in the slot (untied head) stays eager."""
    from lightning_attn_parallel.parallel.apply import apply_compile
    from lightning_attn_parallel.parallel.vocab_parallel_loss import VocabParallelLoss
    from lightning_attn_parallel.planning.memory import compiled_loss_kernel

    # compile="model" is for replicated plans only, so tp=2 pairs with "none" and "block"
    for mode, tp in (("none", 1), ("block", 1), ("model", 1), ("none", 2), ("block", 2)):
        model = tiny_model()
        if tp > 1:
            model.loss_kernel = VocabParallelLoss()  # what apply_tensor_parallel installs
        apply_compile(model, mode)
        applied = getattr(model.loss_kernel, "_compiled_call_impl", None) is not None
        cfg = replace(model.config, tie_embeddings=False)
        assert applied == compiled_loss_kernel(cfg, ParallelPlan(tp=tp, compile=mode)), (mode, tp)


def test_compiled_loss_kernel_equals_the_eager_one():
    """The compiled loss kernel (apply_compile) gives the eager sum of token losses and its logit
    gradient, ignored targets included: fp32 to 1e-5, fp64 to 1e-10."""
    import torch._dynamo

    from lightning_attn_parallel.models.loss import IGNORE_INDEX, TokenCrossEntropy

    torch._dynamo.reset()
    for dtype, rtol in ((torch.float32, 1e-5), (torch.float64, 1e-10)):
        g = torch.Generator().manual_seed(0)
        logits = torch.randn(64, 97, generator=g, dtype=dtype) * 3
        targets = torch.randint(97, (64,), generator=g)
        targets[::7] = IGNORE_INDEX
        eager, compiled = TokenCrossEntropy(), TokenCrossEntropy()
        compiled.compile()
        results = []
        for kernel in (eager, compiled):
            x = logits.clone().requires_grad_()
            loss = kernel(x, targets)
            loss.backward()
            results.append((loss.detach(), x.grad))
        (l0, g0), (l1, g1) = results
        assert l1.dtype == l0.dtype and compiled._compiled_call_impl is not None
        torch.testing.assert_close(l1, l0, rtol=rtol, atol=0)
        torch.testing.assert_close(g1, g0, rtol=rtol, atol=rtol * g0.abs().max().item())


# ---------------------------------------------------------------------------- fp8
def test_fp8_converts_the_large_block_linears_only():
    """The blocks' projections wider than 1024 become Float8Linear; the LM head and the GQA key
    and value projections (1024 -> 256) stay in bf16."""
    pytest.importorskip("torchao.float8")
    from torchao.float8.float8_linear import Float8Linear

    from lightning_attn_parallel.models import ModelConfig, build_model
    from lightning_attn_parallel.parallel.float8 import apply_float8

    cfg = ModelConfig(vocab_size=2048, d_model=1024, n_layers=2, n_heads=16, n_kv_heads=4,
                      ffn_dim=2816, max_seq_len=64)
    with torch.device("meta"):
        model = build_model(cfg)
    chosen = apply_float8(model, "tensorwise", fsdp_all_gather=True)
    converted = {n for n, m in model.named_modules() if isinstance(m, Float8Linear)}
    expected = {f"blocks.{i}.{name}" for i in range(2) for name in
                ("attention.wq", "attention.wo", "ffn.w1", "ffn.w2", "ffn.w3")}
    assert converted == set(chosen) == expected
    assert model.blocks[0].ffn.w1.config.enable_fsdp_float8_all_gather
    with torch.device("meta"):
        rowwise = build_model(cfg)
    apply_float8(rowwise, "rowwise", fsdp_all_gather=True)
    assert not rowwise.blocks[0].ffn.w1.config.enable_fsdp_float8_all_gather  # tensorwise only


def test_fp8_filter_without_torchao():
    from lightning_attn_parallel.parallel.float8 import float8_module_filter

    convert = float8_module_filter()
    assert convert(torch.nn.Linear(2048, 5632, device="meta"), "blocks.0.ffn.w1")
    assert not convert(torch.nn.Linear(2048, 256, device="meta"), "blocks.0.attention.wk")  # small
    assert not convert(torch.nn.Linear(2048, 32000, device="meta"), "output")  # the LM head
    assert not convert(torch.nn.Linear(2048, 2056, device="meta"), "blocks.0.x")  # not a multiple of 16
    assert not convert(torch.nn.LayerNorm(2048, device="meta"), "blocks.0.norm")


def test_fp8_errors_name_the_missing_piece(monkeypatch):
    import importlib.util

    from lightning_attn_parallel.parallel import float8

    assert "compute capability 8.9" in float8.float8_unavailable(torch.device("cpu"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert "pip install -e '.[fp8]'" in float8.float8_unavailable(torch.device("cuda", 0))
    monkeypatch.undo()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA A100-SXM4-80GB")
    if importlib.util.find_spec("torchao") is not None:
        assert "A100-SXM4-80GB has 8.0" in float8.float8_unavailable(torch.device("cuda", 0))
    with pytest.raises(PlanError, match="fp8='tensorwise' does not compose with tensor parallelism"):
        ParallelPlan(fp8="tensorwise", tp=2)
    with pytest.raises(PlanError, match="fp8='e4m3'"):
        ParallelPlan(fp8="e4m3")


def test_fp8_refused_on_a_cpu_before_training(tmp_path):
    import subprocess
    import sys

    root = __import__("pathlib").Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "train.py", "strategy.plan.fp8=tensorwise", "logger=none",
                           f"hydra.run.dir={tmp_path}"], cwd=root, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr[-500:]
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "error: ParallelPlan fp8='tensorwise' cannot run: fp8 matmuls need an NVIDIA GPU")


def test_planner_knows_fp8():
    from lightning_attn_parallel.hardware import H200
    from test_planner import ANCHOR_1B

    def step(fp8: str) -> float:
        return estimate_time(ANCHOR_1B, ParallelPlan(fp8=fp8, compile=True), ClusterSpec(1, 1), H200,
                             8, 2048, "bf16-true").compute_s

    assert step("tensorwise") < step("none") < step("rowwise")
    assert H200.peak_tflops("fp8") == H200.fp8_tflops  # the table knows the fp8 peak

    def activations(model, **plan) -> float:
        return estimate_memory(model, ParallelPlan(**plan), 8, 2048, "bf16-true", H200,
                               calibration=NO_SLACK).activations

    # compiled fp8 tensorwise keeps 1-byte copies of the converted linears' inputs: each dense
    # layer saves fp8_saved_bytes_less per token and d_model, and nothing else changes
    saving = activations(ANCHOR_1B, compile=True) - activations(ANCHOR_1B, compile=True, fp8="tensorwise")
    expected = NO_SLACK.fp8_saved_bytes_less * 8 * 2048 * ANCHOR_1B.n_layers * ANCHOR_1B.d_model
    assert saving == pytest.approx(expected, rel=1e-9)
    for plan in (dict(fp8="tensorwise"), dict(fp8="rowwise", compile=True)):  # not measured: none
        base = {k: v for k, v in plan.items() if k != "fp8"}
        assert activations(ANCHOR_1B, **plan) == activations(ANCHOR_1B, **base), plan


def test_strategy_sends_what_the_plan_accumulation_says(monkeypatch):
    """The Lightning glue: micro-batches that only accumulate get the plan's policy, the last one
    full reduction; "auto" is pinned to one policy before training (on a CPU: defer_all)."""
    from lightning_attn_parallel.parallel import fully_sharded
    from lightning_attn_parallel.parallel.data_parallel import DataParallelGradients
    from lightning_attn_parallel.planning.auto import RunContext, resolve_plan
    from lightning_attn_parallel.strategy import AttnHybridStrategy

    calls = []
    monkeypatch.setattr(fully_sharded, "set_gradient_sync",
                        lambda model, enabled, accumulation="defer_all": calls.append((enabled, accumulation)))
    strategy = AttnHybridStrategy(plan=ParallelPlan(dp_shard=2, accumulation="defer_all_reduce"))
    strategy.gradients = DataParallelGradients(torch.nn.Linear(1, 1), None, True, "defer_all_reduce")
    with strategy.block_backward_sync():
        assert calls == [(False, "defer_all_reduce")]
    assert calls[-1][0] is True
    cpu = RunContext(world_size=2, device_type="cpu")
    assert resolve_plan(ParallelPlan(dp_shard=2), cpu, None)[0].accumulation == "defer_all"
    kept = resolve_plan(ParallelPlan(dp_shard=2, accumulation="reduce_scatter_each"), cpu, None)[0]
    assert kept.accumulation == "reduce_scatter_each"


# ---------------------------------------------------------------------------- fused loss
def test_fused_loss_falls_back_to_the_chunked_loss_exactly(monkeypatch):
    """On a CPU (or without liger, or with a vocabulary-parallel head) the fused loss is the
    chunked loss: the same sum, count and gradients, bit for bit."""
    from lightning_attn_parallel.models import fused_loss
    from lightning_attn_parallel.models.loss import cross_entropy_sum

    model = tiny_model(torch.float64)
    tokens, targets = make_batch(2, seed=3)
    targets = targets.clone()
    targets[0, :3] = -100  # ignored positions are not counted
    hidden = model(tokens)
    assert not fused_loss.liger_available(model.output.weight)
    got = fused_loss.fused_cross_entropy_sum(hidden, model.output, targets, chunk_tokens=4)
    want = cross_entropy_sum(hidden, model.output, targets, 4)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and got[1] == 2 * 8 - 3
    grads = torch.autograd.grad(got[0], model.output.weight, retain_graph=True)[0]
    assert torch.equal(grads, torch.autograd.grad(want[0], model.output.weight)[0])
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    import importlib.util
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert not fused_loss.liger_available(model.output.weight)  # a GPU but no liger: fallback


def test_module_selects_the_fused_loss(monkeypatch):
    from lightning_attn_parallel import module as module_file
    from lightning_attn_parallel.models import ModelConfig, objective
    from test_tensor_parallel import TINY as TINY_MODEL

    used = []
    real = objective.fused_cross_entropy_sum
    monkeypatch.setattr(objective, "fused_cross_entropy_sum",
                        lambda *a: used.append("fused") or real(*a))
    tokens, targets = make_batch(2, seed=0)
    for fused in (False, True):
        module = module_file.CausalLMModule(ModelConfig(**TINY_MODEL), fused_loss=fused)
        module.configure_model()
        module._loss({"input_ids": tokens, "labels": targets})
    assert used == ["fused"]


# ---------------------------------------------------------------------------- host waits
def test_logged_learning_rate_stays_on_the_host(monkeypatch):
    """A number logged from the step must not become a device tensor: on CUDA that copy waits
    for every queued kernel (an idle GPU each step). The profile's host waits show it on a GPU."""
    from lightning_attn_parallel import CausalLMModule
    from lightning_attn_parallel.callbacks.metrics import host_scalar

    with torch.device("meta"):  # even where factory functions default elsewhere
        assert host_scalar(3e-4).device.type == "cpu"
    module = CausalLMModule(TINY)
    logged = {}
    monkeypatch.setattr(module, "log", lambda name, value, **kw: logged.update({name: value}))
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.5e-4)
    module.on_before_optimizer_step(optimizer)
    value = logged["train/lr"]
    assert isinstance(value, torch.Tensor) and value.device.type == "cpu"
    assert value.item() == pytest.approx(2.5e-4)


def test_strategy_pins_a_cuda_bound_batch(monkeypatch):
    """Batches bound for a CUDA device are pinned before Lightning's non-blocking copy (from
    pageable memory that copy waits for the GPU to drain); CPU runs and pinned tensors are left
    alone. Pinning needs a GPU, so it is stood in for here."""
    from lightning_attn_parallel.lightning_workarounds import pinned

    pinned_ids = set()

    def fake_pin(t):
        out = t.clone()
        pinned_ids.add(id(out))
        return out

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda t: id(t) in pinned_ids)
    batch = {"input_ids": torch.arange(6).view(2, 3), "labels": torch.arange(6).view(2, 3), "n": 3}
    assert pinned(batch, torch.device("cpu")) is batch
    out = pinned(batch, torch.device("cuda"))
    assert all(out[k].is_pinned() and torch.equal(out[k], batch[k]) for k in ("input_ids", "labels"))
    assert out["n"] == 3
    again = pinned(out, torch.device("cuda"))
    assert again["input_ids"] is out["input_ids"]  # already pinned: not copied twice

    from lightning.pytorch.strategies import ParallelStrategy
    from lightning_attn_parallel.strategy import AttnHybridStrategy

    seen = {}
    monkeypatch.setattr(ParallelStrategy, "batch_to_device",
                        lambda self, b, device=None, dataloader_idx=0: seen.update(batch=b))
    AttnHybridStrategy.batch_to_device(object.__new__(AttnHybridStrategy), batch, torch.device("cuda"))
    assert seen["batch"]["labels"].is_pinned()


@pytest.mark.parametrize("bar", ["none", "lightning", "step_loss"])
def test_step_loss_reaches_the_progress_bar_only_where_one_needs_it(bar):
    """Lightning reads every `prog_bar=True` value back to the host after each step. The step
    loss goes there only under Lightning's own bar; with no bar nothing is read back, and
    StepLossProgressBar reads the loss itself when it refreshes."""
    from lightning.pytorch.callbacks import TQDMProgressBar

    from lightning_attn_parallel import CausalLMModule
    from lightning_attn_parallel.callbacks.progress import StepLossProgressBar
    from lightning_utils import FixedTokens, loader, quiet_trainer

    callbacks = {"none": [], "lightning": [TQDMProgressBar()], "step_loss": [StepLossProgressBar(refresh_rate=2)]}[bar]
    trainer = quiet_trainer(max_steps=2, enable_progress_bar=bar != "none", callbacks=callbacks,
                            strategy="attn_hybrid")
    trainer.fit(CausalLMModule(TINY), loader(FixedTokens(n=8, seq_len=8, vocab=TINY.vocab_size), 2))
    assert ("train/loss" in trainer.progress_bar_metrics) == (bar == "lightning")
    assert "train/loss" in trainer.callback_metrics
    if bar == "step_loss":
        shown = callbacks[0].get_metrics(trainer, trainer.lightning_module)
        assert float(shown["train/loss"]) == pytest.approx(float(trainer.callback_metrics["train/loss"]), rel=1e-3)
