"""fp8 routed experts (ParallelPlan.fp8_experts): the padded layout each expert's rows need, the
operands torchao's fp8 grouped GEMM is handed, the plan's checks, and, on an sm90 GPU, torchao's
kernel itself against the bf16 grouped GEMM.

On the CPU the fp8 kernel is replaced by a stand-in that asserts torchao's contract and then
multiplies exactly (tests/fp8_experts_reference.py), so padded and unpadded paths must agree
within fp32's 1e-5.
"""
from __future__ import annotations

import pytest
import torch

from dist_utils import assert_close
from fp8_experts_reference import counting_fp8_calls, reference_fp8_experts
from test_expert_parallel import _cfg as tiny_deepseek
from lightning_attn_parallel.models.config import ModelConfig
from lightning_attn_parallel.models.deepseek import (
    DeepSeekMoE, GroupedGemm, build_deepseek, grouped_swiglu, looped_swiglu, torch_grouped_mm,
)
from lightning_attn_parallel.models.token_groups import pad_rows, padded_groups, unpad_rows
from lightning_attn_parallel.plan import ParallelPlan, PlanError

pytestmark = pytest.mark.usefixtures("one_thread")

COUNTS = [3, 0, 17, 16, 1, 0, 40, 5]  # empty experts, exact multiples, one row past a multiple


def _cfg(**over) -> ModelConfig:
    """expert parallelism's tiny DeepSeek, every layer MoE."""
    return tiny_deepseek(**{"first_k_dense_replace": 0, **over})


def _cpu_grouped_mm_or_skip() -> None:
    try:
        torch._grouped_mm(torch.ones(16, 16), torch.ones(1, 16, 16), offs=torch.tensor([16], dtype=torch.int32))
    except (RuntimeError, NotImplementedError, AttributeError) as err:
        pytest.skip(f"torch._grouped_mm does not run fp32 on this CPU: {err}")


@pytest.mark.parametrize("multiple", [1, 16, 32])
def test_padded_layout_places_each_group_in_its_own_multiple(multiple):
    counts = torch.tensor(COUNTS)
    n = int(counts.sum())
    layout = padded_groups(counts, n, multiple)
    ends = layout.ends.long()
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    sizes = ends - starts
    assert layout.ends.dtype == torch.int32 and int(ends[-1]) == layout.capacity
    assert bool((sizes % multiple == 0).all()) and bool((sizes >= multiple).all())
    assert bool((sizes >= counts).all())
    # row i of expert e lands at its padded group's start + its place in the group, in order
    expected = torch.cat([starts[e] + torch.arange(c) for e, c in enumerate(COUNTS)])
    assert layout.rows.tolist() == expected.tolist()
    x = torch.randn(n, 4)
    padded = pad_rows(x, layout)
    assert padded.shape == (layout.capacity, 4)
    between = torch.ones(layout.capacity, dtype=torch.bool)
    between[layout.rows] = False
    assert int(between.sum()) == layout.capacity - n and not padded[between].any()
    assert torch.equal(unpad_rows(padded, layout), x)


def test_padded_layout_has_a_size_fixed_by_rows_and_groups():
    """The same number of rows routed differently gives the same buffer: static shapes."""
    n = sum(COUNTS)
    capacities = {padded_groups(torch.tensor(c), n, 16).capacity
                  for c in (COUNTS, [n, 0, 0, 0, 0, 0, 0, 0], [n // 8] * 7 + [n - 7 * (n // 8)])}
    assert len(capacities) == 1


def _expert_weights(e: int = 8, d: int = 32, f: int = 16):
    torch.manual_seed(0)
    w1, w3 = (0.1 * torch.randn(e, d, f)).requires_grad_(), (0.1 * torch.randn(e, d, f)).requires_grad_()
    w2 = (0.1 * torch.randn(e, f, d)).requires_grad_()
    return w1, w3, w2


def _swiglu_and_grads(fn, x, counts, weights):
    x = x.clone().requires_grad_(True)
    out = fn(x, counts, *weights)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    grads = [x.grad] + [w.grad.clone() for w in weights]
    for w in weights:
        w.grad = None
    return out.detach(), grads


@pytest.mark.parametrize("multiple", [16, 32])
def test_padded_grouped_swiglu_equals_the_expert_loop(multiple):
    """Padding rows are zeros whose outputs and gradients are dropped: output, input gradient
    and every expert's weight gradients equal the unpadded loop (fp32, 1e-5), empty experts'
    gradients included."""
    _cpu_grouped_mm_or_skip()
    weights = _expert_weights()
    counts = torch.tensor(COUNTS)
    x = torch.randn(int(counts.sum()), 32)
    gemm = GroupedGemm(torch_grouped_mm, row_multiple=multiple)
    padded = _swiglu_and_grads(lambda *a: grouped_swiglu(*a, dtype=torch.float32, gemm=gemm), x, counts, weights)
    looped = _swiglu_and_grads(looped_swiglu, x, counts, weights)
    assert_close(padded[0], looped[0], name="output")
    for name, got, want in zip(("x", "w1", "w3", "w2"), padded[1], looped[1]):
        assert_close(got, want, name=f"grad {name}")


def test_fp8_experts_hand_torchao_row_major_rows_in_groups_of_16_and_column_major_weights():
    """The layer with fp8 experts, through the contract-checking stand-in, equals the bf16-path
    layer looping over experts (fp32, 1e-5); the stand-in fails on any operand torchao refuses."""
    from lightning_attn_parallel.parallel.float8 import FLOAT8_GROUPED_GEMM, apply_float8_experts

    _cpu_grouped_mm_or_skip()
    torch.manual_seed(0)
    model = build_deepseek(_cfg())
    torch.manual_seed(0)
    reference = build_deepseek(_cfg())
    for sub in reference.modules():
        if hasattr(sub, "use_grouped_mm"):
            sub.use_grouped_mm = False
    assert apply_float8_experts(model) == ["blocks.0.ffn.experts", "blocks.1.ffn.experts"]
    assert all(layer.ffn.experts.grouped_gemm is FLOAT8_GROUPED_GEMM for layer in model.blocks)
    tokens = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(3))
    with reference_fp8_experts(), counting_fp8_calls() as calls:
        loss = model.logits(tokens).float().square().mean()
        assert len(calls) == 2 * 3  # three grouped GEMMs a layer, two MoE layers
        loss.backward()
    assert len(calls) == 2 * 2 * 3  # the backward redoes the forward's copies (a checkpoint)
    ref_loss = reference.logits(tokens).float().square().mean()
    ref_loss.backward()
    assert_close(loss, ref_loss, name="loss")
    for (name, p), ref in zip(model.named_parameters(), reference.parameters()):
        assert_close(p.grad, ref.grad, name=f"grad {name}")


@pytest.mark.parametrize("policy", ["block", "selective"])
def test_fp8_experts_under_activation_checkpointing_equal_the_run_without(policy):
    """The kernel's own selective checkpoint nests inside the block's checkpoint: the loss and
    every gradient equal the uncheckpointed fp8-experts model (fp32, 1e-5)."""
    from lightning_attn_parallel.parallel.activation_checkpointing import apply_activation_checkpointing
    from lightning_attn_parallel.parallel.float8 import apply_float8_experts

    _cpu_grouped_mm_or_skip()
    tokens = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(5))
    results = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = build_deepseek(_cfg())
        apply_float8_experts(model)
        if checkpointed:
            apply_activation_checkpointing(model, policy)
        with reference_fp8_experts(), counting_fp8_calls() as calls:
            loss = model.logits(tokens).float().square().mean()
            loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()], len(calls)))
    if policy == "block":  # the block's recompute ran the experts' forward once more
        assert results[1][2] > results[0][2], (results[1][2], results[0][2])
    assert_close(results[1][0], results[0][0], name="loss")
    for i, (got, want) in enumerate(zip(results[1][1], results[0][1])):
        assert_close(got, want, name=f"grad {i}")


def test_fp8_experts_compile_to_one_graph_a_block():
    """The padded layout keeps shapes static: a compiled MoE block on the fp8 path has no graph
    break, and equals eager (the same kernels: aot_eager)."""
    import torch._dynamo

    from lightning_attn_parallel.parallel.float8 import apply_float8_experts

    _cpu_grouped_mm_or_skip()
    torch.manual_seed(0)
    block = build_deepseek(_cfg(n_layers=1)).blocks[0]
    apply_float8_experts(block)
    x, positions = torch.randn(2, 16, 32), torch.arange(16).expand(2, 16)
    with reference_fp8_experts(torch.bfloat16):  # the grouped GEMM's meta kernel takes bf16 only
        torch._dynamo.reset()
        explained = torch._dynamo.explain(block)(x, positions)
        assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
        compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
        assert_close(compiled(x, positions), block(x, positions), name="compiled block")


@pytest.mark.parametrize("weights", [torch.bfloat16, torch.float32])
def test_compiled_fp8_experts_keep_no_copy_of_the_weights_for_the_backward(weights):
    """torchao keeps its column-major operand for the backward; the selective checkpoint around
    the kernel makes the backward copy it again, so no expert-weight-sized tensor (other than
    the parameters themselves) crosses from the compiled forward to the backward: with fp32
    weights (autocast) the cast to bf16 is made again too."""
    import sys
    from pathlib import Path

    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd

    from lightning_attn_parallel.parallel.float8 import apply_float8_experts

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from fused_projection_graphs import kept_for_backward

    _cpu_grouped_mm_or_skip()
    torch.manual_seed(0)
    block = build_deepseek(_cfg(n_layers=1)).blocks[0].to(weights)
    apply_float8_experts(block)
    kept = []

    def forward_compiler(gm, _inputs):
        kept.extend(tuple(node.meta["val"].shape) for node in kept_for_backward(gm))
        return make_boxed_func(gm.forward)

    backend = aot_autograd(fw_compiler=forward_compiler, bw_compiler=lambda gm, _: make_boxed_func(gm.forward),
                           partition_fn=min_cut_rematerialization_partition)
    x = torch.randn(2, 16, 32, dtype=weights, requires_grad=True)
    with reference_fp8_experts(torch.bfloat16):
        torch._dynamo.reset()
        torch.compile(block, backend=backend, fullgraph=True)(x, torch.arange(16)).sum().backward()
    assert kept, "the forward graph was not seen"
    weight_shapes = {(8, 32, 16), (8, 16, 32)}
    assert not weight_shapes & set(kept), sorted(weight_shapes & set(kept))


def test_padded_experts_take_a_rank_without_rows():
    """Under expert parallelism a rank may receive no rows: the padded kernel returns none, and
    every weight gets a zero gradient (the reducers wait for each)."""
    _cpu_grouped_mm_or_skip()
    weights = _expert_weights(e=3)
    x = torch.zeros(0, 32, requires_grad=True)
    out = grouped_swiglu(x, torch.zeros(3, dtype=torch.long), *weights, dtype=torch.float32,
                         gemm=GroupedGemm(torch_grouped_mm, row_multiple=16))
    assert out.shape == (0, 32)
    out.sum().backward()
    assert all(w.grad is not None and not w.grad.any() for w in weights)


def test_a_failing_fp8_kernel_falls_back_to_the_bf16_grouped_gemm():
    """A kernel that refuses the call (a GPU it does not support) leaves the experts on the bf16
    grouped GEMM, with a warning, not on the per-expert loop."""
    from lightning_attn_parallel.models import deepseek

    _cpu_grouped_mm_or_skip()

    def refuses(a, b, offs):
        raise RuntimeError("no kernel for this GPU")

    torch.manual_seed(0)
    layer = DeepSeekMoE(_cfg())
    torch.manual_seed(0)
    reference = DeepSeekMoE(_cfg())
    layer.experts.grouped_gemm = GroupedGemm(refuses, row_multiple=16, dim_multiple=16)
    x = torch.randn(2, 12, 32)
    with reference_fp8_experts(), pytest.warns(UserWarning, match="fp8 grouped GEMM failed"):
        out = layer(x)
    with reference_fp8_experts():
        expected = reference(x)
    assert layer.experts.grouped_gemm is deepseek.BF16_GROUPED_GEMM and not deepseek._GROUPED_MM_FAILED
    assert_close(out, expected, name="output")


def test_fp8_experts_plan_checks():
    with pytest.raises(PlanError, match="grouped_gemm=False"):
        ParallelPlan(fp8_experts=True, grouped_gemm=False)
    plan = ParallelPlan(fp8_experts=True)
    with pytest.raises(PlanError, match="no routed experts"):
        plan.check_model(ModelConfig(family="llama", vocab_size=64, d_model=32, n_layers=1, n_heads=2,
                                     ffn_dim=48, max_seq_len=64))
    with pytest.raises(PlanError, match="moe_ffn_dim=24"):
        plan.check_model(_cfg(moe_ffn_dim=24))
    plan.check_model(_cfg())


def test_fp8_experts_need_an_sm90_gpu_before_anything_starts():
    from lightning_attn_parallel.parallel.apply import check_plan

    with pytest.raises(PlanError, match=r"fp8_experts=True cannot run: .*compute capability 9\.0"):
        check_plan(ParallelPlan(fp8_experts=True), 1, _cfg(), torch.device("cpu"))


def test_a_torchao_without_the_padded_grouped_gemm_is_named_before_anything_starts(monkeypatch):
    import torchao
    import torchao.prototype.moe_training as moe_training

    from lightning_attn_parallel.parallel.float8 import float8_unavailable

    monkeypatch.setattr(moe_training, "_to_fp8_rowwise_then_scaled_grouped_mm", lambda a, b_t, offs: a)
    assert f"torchao {torchao.__version__} has no fp8 rowwise grouped GEMM" in float8_unavailable(
        torch.device("cuda", 0), "grouped")
    assert "torchao" not in float8_unavailable(torch.device("cpu"), "linear")


def _sm90_torchao_or_skip() -> None:
    from lightning_attn_parallel.parallel.float8 import float8_unavailable

    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    reason = float8_unavailable(torch.device("cuda"), "grouped")
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize("compiled", [False, True])
def test_torchao_fp8_experts_track_the_bf16_layer_on_the_gpu(compiled):
    """On sm90: the same layer with torchao's fp8 experts stays within fp8's error of the bf16
    grouped GEMM (e4m3 keeps 3 mantissa bits: a few percent), gradients included, in eager and
    compiled (torchao's custom ops under the kernel's selective checkpoint)."""
    from lightning_attn_parallel.models import deepseek
    from lightning_attn_parallel.parallel.float8 import FLOAT8_GROUPED_GEMM, apply_float8_experts

    _sm90_torchao_or_skip()
    cfg = _cfg(d_model=256, moe_ffn_dim=128, n_routed_experts=8, n_heads=4)
    results = []
    for fp8 in (False, True):
        torch.manual_seed(0)
        layer = DeepSeekMoE(cfg).cuda().to(torch.bfloat16)
        if fp8:
            apply_float8_experts(layer)
        run = torch.compile(layer, fullgraph=True) if compiled else layer
        torch.manual_seed(1)
        x = torch.randn(4, 100, 256, device="cuda", dtype=torch.bfloat16).requires_grad_()
        out = run(x)
        out.float().square().mean().backward()
        results.append((out.detach(), x.grad, layer.experts.w1.grad, layer.experts.w2.grad))
        if fp8:
            assert layer.experts.grouped_gemm is FLOAT8_GROUPED_GEMM, "the fp8 kernel failed and fell back"
    assert not deepseek._GROUPED_MM_FAILED, "a grouped GEMM failed and the layer fell back to the loop"
    for name, fp8, bf16 in zip(("output", "x grad", "w1 grad", "w2 grad"), results[1], results[0]):
        assert_close(fp8, bf16, rtol=0.1, name=name)
        assert not torch.equal(fp8, bf16), f"{name}: fp8 experts ran the bf16 kernel"
