"""Fused projections (q|k|v, gate|up, MLA's down projections as one GEMM each) compute exactly
what the separate projections compute, keep the parameters and their names, and step aside where
they cannot apply (tensor-parallel DTensors, layers with hooks). Under FSDP2 the unsharded
weights are plain tensors, so fusion runs there: 2 gloo ranks with fusion equal one process
without it."""
from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import lightning as L
import pytest
import torch
from torch import nn

from dist_utils import assert_close, run_distributed
from lightning_utils import FixedTokens, loader, params_of, quiet_trainer

import lightning_attn_parallel as lap
from lightning_attn_parallel.models import ModelConfig, build_model
from lightning_attn_parallel.models import fused_projections
from lightning_attn_parallel.models.fused_projections import fusable, project, set_fused_projections
from lightning_attn_parallel.models.loss import cross_entropy_sum

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

LLAMA = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=32)
DEEPSEEK = dict(LLAMA, family="deepseek", attention="mla", kv_lora_rank=16, qk_nope_head_dim=8,
                qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4, n_shared_experts=1, moe_top_k=2,
                moe_ffn_dim=32, first_k_dense_replace=1)
MODELS = {"llama": LLAMA, "deepseek_mla": DEEPSEEK, "deepseek_mla_q_latent": dict(DEEPSEEK, q_lora_rank=16)}


@contextmanager
def counting_fused_gemms() -> Iterator[list[int]]:
    """The output widths of the fused GEMMs run, by every layer class registered for fusion."""
    widths: list[int] = []
    saved = dict(fused_projections._FUSED_GEMMS)

    def counting(real):
        def gemm(x, weights, first):
            widths.append(sum(w.shape[0] for w in weights))
            return real(x, weights, first)
        return gemm

    fused_projections._FUSED_GEMMS.update({cls: counting(real) for cls, real in saved.items()})
    try:
        yield widths
    finally:
        fused_projections._FUSED_GEMMS.update(saved)


def _loss_and_grads(cfg: dict, fuse: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    torch.manual_seed(0)
    model = build_model(ModelConfig(**cfg)).double()
    assert set_fused_projections(model, fuse) > 0
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg["vocab_size"], (3, 13), generator=gen)
    with counting_fused_gemms() as fused:
        total, count = cross_entropy_sum(model(tokens[:, :-1]), model.output, tokens[:, 1:],
                                         kernel=model.loss_kernel)
    loss = total / count
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, len(fused)


@pytest.mark.parametrize("name", list(MODELS))
def test_fused_projections_equal_the_separate_ones(name):
    loss, grads, fused = _loss_and_grads(MODELS[name], fuse=True)
    ref_loss, ref_grads, unfused = _loss_and_grads(MODELS[name], fuse=False)
    # every block fuses its attention's projections; every dense ffn and shared expert its gate|up
    assert unfused == 0 and fused >= 2 * MODELS[name]["n_layers"]
    assert_close(loss, ref_loss, rtol=1e-10, name="loss")
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        assert_close(grads[n], ref_grads[n], rtol=1e-10, name=n)


def test_parameters_and_their_names_are_unchanged():
    torch.manual_seed(0)
    plain = build_model(ModelConfig(**LLAMA))
    torch.manual_seed(0)
    fused = build_model(ModelConfig(**LLAMA))
    set_fused_projections(fused, True)
    assert list(plain.state_dict()) == list(fused.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), fused.state_dict().values()))


def test_fusion_steps_aside_where_it_cannot_apply():
    a, b = nn.Linear(4, 3, bias=False), nn.Linear(4, 5, bias=False)
    x = torch.randn(2, 4)
    assert fusable([a, b])
    with_bias = nn.Linear(4, 2)
    assert not fusable([a, with_bias])
    hooked = nn.Linear(4, 2, bias=False)
    seen = []
    hooked.register_forward_hook(lambda *_: seen.append(1))
    assert not fusable([a, hooked])
    project(x, (a, hooked), fuse=True)
    assert seen == [1]  # the hook ran: the layer went through its own module

    class Float8Like(nn.Linear):  # a subclass with no fused GEMM registered computes its own way
        pass

    assert not fusable([a, Float8Like(4, 2, bias=False)])
    out = project(x, (a, b), fuse=True)
    assert [o.shape[-1] for o in out] == [3, 5]
    assert_close(out[1], b(x), rtol=1e-6)


# --------------------------------------------------------------------------- under the strategy
STEPS, GLOBAL_BATCH = 2, 4


def _train(rank: int, world: int, plan_kwargs: dict) -> dict:
    L.seed_everything(0, verbose=False)
    module = lap.CausalLMModule(ModelConfig(**LLAMA), lr=1e-2, warmup_steps=1, total_steps=STEPS)
    trainer = quiet_trainer(strategy=lap.AttnHybridStrategy(plan=lap.ParallelPlan(**plan_kwargs)),
                            devices=world, max_steps=STEPS)
    tp = plan_kwargs.get("tp", 1)
    dp = world // tp
    with counting_fused_gemms() as fused:
        trainer.fit(module, loader(FixedTokens(), GLOBAL_BATCH // dp, replicas=dp, rank=rank // tp))
    return {"params": params_of(module), "fused_gemms": len(fused)}


def _one_process(rank: int, world: int) -> dict:
    return _train(rank, world, {})


def _worker(rank: int, world: int) -> dict:
    return {"fsdp2": _train(rank, world, dict(dp_shard=2, fuse_projections=True)),
            "tp2": _train(rank, world, dict(tp=2, fuse_projections=True))}


def test_fused_projections_under_fsdp2_and_tp_equal_one_process():
    ranks = run_distributed(_worker, 2)
    reference = run_distributed(_one_process, 1)[0]
    # FSDP2 unshards into plain tensors, so its blocks fuse; tensor parallelism's hooked
    # DTensor layers run each projection through its own module
    assert ranks[0]["fsdp2"]["fused_gemms"] > 0 and ranks[0]["tp2"]["fused_gemms"] == 0
    for case in ("fsdp2", "tp2"):
        for n, ref in reference["params"].items():
            assert_close(ranks[0][case]["params"][n], ref, rtol=1e-5, name=f"{case} {n}")


# --------------------------------------------------------------------------- fp8 (torchao, emulated on the CPU)
def _float8_layers(widths: list[int], recipe: str = "tensorwise") -> list[nn.Module]:
    """Float8Linear layers of the given output widths on one input width, whose weights share one
    largest magnitude (so a group's tensorwise scale equals each layer's own)."""
    from lightning_attn_parallel.parallel.float8 import apply_float8

    torch.manual_seed(0)
    holder = nn.Module()
    for i, width in enumerate(widths):
        layer = nn.Linear(32, width, bias=False)
        with torch.no_grad():
            layer.weight.uniform_(-0.5, 0.5)
            layer.weight[i % width, 0] = 1.0
        holder.add_module(f"w{i}", layer)
    names = tuple(f"w{i}" for i in range(len(widths)))
    assert apply_float8(holder, recipe, fsdp_all_gather=False, min_features=16, emulate=True,
                        fused_groups=[names]) == list(names)
    return [getattr(holder, n) for n in names]


def _fp8_llama(recipe: str, fuse: bool) -> nn.Module:
    """The tiny Llama with every projection in emulated fp8, its groups judged as fused GEMMs."""
    from lightning_attn_parallel.models.fused_projections import projection_groups
    from lightning_attn_parallel.parallel.float8 import apply_float8

    torch.manual_seed(0)
    model = build_model(ModelConfig(**LLAMA))
    apply_float8(model, recipe, fsdp_all_gather=False, min_features=16, emulate=True,
                 fused_groups=list(projection_groups(model)))
    set_fused_projections(model, fuse)
    return model


def _project_with_grads(layers, x, grads, fuse):
    x = x.clone().requires_grad_(True)
    for layer in layers:
        layer.weight.grad = None
    outs = project(x, layers, fuse)
    torch.autograd.backward(outs, grads)
    return [o.detach() for o in outs], x.grad, [layer.weight.grad.clone() for layer in layers]


def test_fp8_group_runs_as_one_gemm_with_the_separate_layers_numbers():
    """q|k|v as torchao Float8Linear layers: one fp8 GEMM (the input cast once), and where the
    group's tensorwise scales equal each layer's own (equal largest magnitudes in the weights and in
    each output's gradient) it computes what the three fp8 layers compute, forward and backward."""
    pytest.importorskip("torchao.float8")
    layers = _float8_layers([32, 16, 16])
    assert fusable(layers)
    x = torch.randn(5, 7, 32, generator=torch.Generator().manual_seed(2))
    grads = [torch.randn(5, 7, w.out_features, generator=torch.Generator().manual_seed(3 + i)).clamp(-2, 2)
             for i, w in enumerate(layers)]
    for i, g in enumerate(grads):
        g[0, i, 0] = 3.0
    with counting_fused_gemms() as widths:
        fused = _project_with_grads(layers, x, grads, fuse=True)
        separate = _project_with_grads(layers, x, grads, fuse=False)
    assert widths == [64]  # one GEMM for the group, none when fusion is off
    for kind, a, b in zip(("output", "input grad", "weight grad"), fused, separate):
        for i, (u, v) in enumerate(zip(a, b) if isinstance(a, list) else [(a, b)]):
            assert_close(u, v, rtol=1e-5, name=f"{kind} {i}")
    # and it is fp8: the bf16-free fp32 product differs by fp8's rounding
    exact = x @ torch.cat([layer.weight for layer in layers]).t()
    assert (torch.cat(fused[0], dim=-1) - exact).abs().max() > 1e-3


def test_fp8_judges_fused_groups_by_their_gemm():
    """With fusion on, the narrow GQA key and value projections convert with their queries (the
    group's GEMM is wide), so the group can fuse; without it they stay in bf16."""
    pytest.importorskip("torchao.float8")
    from torchao.float8.float8_linear import Float8Linear

    from lightning_attn_parallel.models.fused_projections import projection_groups
    from lightning_attn_parallel.parallel.float8 import apply_float8

    def converted(fused: bool) -> set[str]:
        model = build_model(ModelConfig(**LLAMA))  # wq 32 -> 32, wk and wv 32 -> 16, w1 and w3 32 -> 64
        groups = list(projection_groups(model)) if fused else ()
        apply_float8(model, "tensorwise", fsdp_all_gather=False, min_features=32, emulate=True,
                     fused_groups=groups)
        return {n.split(".", 2)[-1] for n, m in model.named_modules() if isinstance(m, Float8Linear)}

    assert converted(False) == {"attention.wq", "attention.wo", "ffn.w1", "ffn.w2", "ffn.w3"}
    assert converted(True) == {"attention.wq", "attention.wk", "attention.wv", "attention.wo",
                               "ffn.w1", "ffn.w2", "ffn.w3"}
    mla = build_model(ModelConfig(**MODELS["deepseek_mla_q_latent"]))
    assert next(projection_groups(mla)) == ("blocks.0.attention.wq_a", "blocks.0.attention.wkv_a")


def test_fp8_model_with_fused_groups_trains_every_projection():
    """A Llama in emulated fp8 (rowwise: the forward's scales are per row, so fusing changes no
    number there) gives the unfused fp8 model's loss, and every projection gets its gradient."""
    pytest.importorskip("torchao.float8")

    def run(fuse: bool):
        model = _fp8_llama("rowwise", fuse)
        tokens = torch.randint(0, LLAMA["vocab_size"], (3, 13), generator=torch.Generator().manual_seed(1))
        total, count = cross_entropy_sum(model(tokens[:, :-1]), model.output, tokens[:, 1:],
                                         kernel=model.loss_kernel)
        (total / count).backward()
        return (total / count).detach(), {n: p.grad for n, p in model.named_parameters()}

    loss, grads = run(True)
    ref_loss, ref_grads = run(False)
    assert_close(loss, ref_loss, rtol=1e-5, name="loss")
    for n, g in grads.items():
        # the backward's rowwise scales span the group's concatenated gradient rows: fp8-close only
        rel = (g - ref_grads[n]).norm() / ref_grads[n].norm()
        assert rel < 0.1, (n, float(rel))


def test_fp8_fused_groups_compile_without_graph_breaks():
    """The whole-model compile traces the fused fp8 groups as one graph (fullgraph), equal to eager."""
    pytest.importorskip("torchao.float8")
    model = _fp8_llama("tensorwise", fuse=True)
    tokens = torch.randint(0, LLAMA["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(1))
    with counting_fused_gemms() as widths:
        eager = model(tokens)
    assert len(widths) == 2 * LLAMA["n_layers"]  # q|k|v and gate|up in each block
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(tokens)
    assert_close(compiled, eager, rtol=1e-5, name="logits")


@pytest.mark.parametrize("policy", ["none", "block", "selective"])
def test_compiled_fused_projections_keep_no_concatenation_and_equal_the_separate_ones(policy):
    """Compiled, a plain group recomputes its concatenated weight in the backward instead of keeping
    it (a selective checkpoint inside the GEMM), under every activation-checkpointing policy around
    it, and the gradients are the separate projections' (fp64)."""
    from lightning_attn_parallel.parallel.activation_checkpointing import apply_activation_checkpointing

    def run(fuse: bool):
        torch.manual_seed(0)
        model = build_model(ModelConfig(**LLAMA)).double()
        set_fused_projections(model, fuse)
        apply_activation_checkpointing(model, policy)
        tokens = torch.randint(0, LLAMA["vocab_size"], (3, 13), generator=torch.Generator().manual_seed(1))
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        total, count = cross_entropy_sum(compiled(tokens[:, :-1]), model.output, tokens[:, 1:],
                                         kernel=model.loss_kernel)
        (total / count).backward()
        return (total / count).detach(), {n: p.grad for n, p in model.named_parameters()}

    torch._dynamo.reset()
    loss, grads = run(True)
    ref_loss, ref_grads = run(False)
    assert_close(loss, ref_loss, rtol=1e-10, name="loss")
    for n in grads:
        assert_close(grads[n], ref_grads[n], rtol=1e-10, name=n)


def test_compiled_bf16_block_keeps_what_the_separate_projections_keep():
    """What the compiled graphs keep for the backward (benchmarks/fused_projection_graphs.py, at a
    small width): fused plain groups keep no more than separate projections."""
    import fused_projection_graphs as graphs

    small = dict(vocab_size=64, d_model=64, n_layers=1, n_heads=4, n_kv_heads=1, ffn_dim=128, max_seq_len=64)
    kept = {fuse: graphs.block_graphs(fuse, fp8=False, seq=16, block=small)["forward"]["bytes saved for the backward"]
            for fuse in (False, True)}
    assert kept[True] == kept[False] > 0
