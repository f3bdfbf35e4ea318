"""Expert parallelism is exact: N ranks with sharded experts match one process on all tokens.

Each rank feeds its own tokens; the reference runs the unsharded layer (or model) on the
concatenation. The distributed loss is the sum of the rank losses, so the reference gradient of
a replicated weight equals the sum of rank gradients, and the gradient of an expert slice equals
the sum over the ranks holding that slice (the expert-data-parallel reduction the strategy does).
All cases run in one spawn of 4 processes, because a spawn costs seconds on a small CPU.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
import torch.nn.functional as F

from dist_utils import assert_close, run_distributed
from fp8_experts_reference import reference_fp8_experts
from lightning_attn_parallel.models.config import ModelConfig
from lightning_attn_parallel.models.deepseek import (
    DeepSeekMoE, build_deepseek, collect_aux_loss, update_moe_biases,
)
from lightning_attn_parallel.models.protocol import moe_layers
from lightning_attn_parallel.parallel.expert_parallel import apply_expert_parallel
from lightning_attn_parallel.parallel.float8 import apply_float8_experts

WORLD = 4
EXPERT_WEIGHTS = ("w1", "w2", "w3")


pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(**over) -> ModelConfig:
    base = dict(family="deepseek", vocab_size=64, d_model=32, n_layers=2, n_heads=2, ffn_dim=48,
                max_seq_len=64, attention="mla", kv_lora_rank=16, qk_nope_head_dim=8,
                qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=8, n_shared_experts=1,
                moe_top_k=2, moe_ffn_dim=16, aux_loss_coef=0.01, init_std=0.1)
    base.update(over)
    return ModelConfig(**base)


# name -> (ep, config overrides, expert_bias overrides {expert: value})
LAYER_CASES = {
    "even_ep4": (4, dict(n_expert_groups=4, topk_groups=2), {}),
    # Experts 1 and 4..7 are never selected: ranks 2 and 3 receive no tokens at all.
    "uneven_ep4": (4, {}, {1: -100.0, 4: -100.0, 5: -100.0, 6: -100.0, 7: -100.0}),
    "sigmoid_ep2": (2, dict(score_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5,
                            n_expert_groups=2, topk_groups=1), {}),
    # fp8 experts' plumbing (rows padded per local expert, tests/fp8_experts_reference.py), with
    # expert 4 never selected: rank 2 pads an empty group beside expert 5's rows
    "fp8_experts_ep4": (4, {}, {4: -100.0}),
}
FP8_EXPERT_CASES = ("fp8_experts_ep4",)
MODEL_CASE = dict(ep=2, over=dict(first_k_dense_replace=0, bias_update_speed=0.01))


def _make_layer(name: str) -> DeepSeekMoE:
    _, over, bias = LAYER_CASES[name]
    torch.manual_seed(0)
    layer = DeepSeekMoE(_cfg(**over))
    for expert, value in bias.items():
        layer.router.expert_bias[expert] = value
    if name in FP8_EXPERT_CASES:
        apply_float8_experts(layer)
    return layer


def _kernels(name: str) -> contextlib.AbstractContextManager:
    return reference_fp8_experts() if name in FP8_EXPERT_CASES else contextlib.nullcontext()


def _layer_inputs(name: str, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * list(LAYER_CASES).index(name) + rank)
    return torch.randn(2, 12, 32, generator=gen), torch.randn(2, 12, 32, generator=gen)


def _make_model():
    torch.manual_seed(0)
    return build_deepseek(_cfg(**MODEL_CASE["over"]))


def _model_tokens(rank: int) -> torch.Tensor:
    return torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(77 + rank))


def _model_loss(model, tokens: torch.Tensor, aux_scale: float) -> torch.Tensor:
    logits = model.logits(tokens[:, :-1])
    ce = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum")
    return ce + aux_scale * collect_aux_loss(model)


def _ep_groups(ep: int, rank: int) -> dist.ProcessGroup:
    """Consecutive ranks form an EP group (as the expert mesh lays them out); every rank must
    create every group, in the same order."""
    groups = [dist.new_group(list(range(start, start + ep))) for start in range(0, WORLD, ep)]
    return groups[rank // ep]


def _summed(tensor: torch.Tensor) -> torch.Tensor:
    out = tensor.detach().clone()
    dist.all_reduce(out)
    return out


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The block of experts this rank holds (expert-parallel weights are DTensors)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _n_local(layer: DeepSeekMoE) -> int:
    return _local(layer.experts.w1).shape[0]


def _expert_grads(layer: DeepSeekMoE) -> dict[str, torch.Tensor]:
    return {n: _local(getattr(layer.experts, n).grad).detach().clone() for n in EXPERT_WEIGHTS}


def _run_layer_case(name: str, rank: int, groups: dict[int, dist.ProcessGroup]) -> dict:
    layer = apply_expert_parallel(_make_layer(name), groups[LAYER_CASES[name][0]])
    x, g = _layer_inputs(name, rank)
    x.requires_grad_(True)
    with _kernels(name):
        out = layer(x)
        ((out * g).sum() + layer.aux_loss).backward()
    return dict(out=out.detach(), x_grad=x.grad, experts=_expert_grads(layer),
                n_local=_n_local(layer), gate=_summed(layer.router.gate.weight.grad),
                shared={n: _summed(p.grad) for n, p in layer.shared_experts.named_parameters()})


def _run_model_case(rank: int, groups: dict[int, dist.ProcessGroup]) -> dict:
    model = apply_expert_parallel(_make_model(), groups[MODEL_CASE["ep"]])
    loss = _model_loss(model, _model_tokens(rank), 1.0)
    loss.backward()
    dense = {n: _summed(p.grad) for n, p in model.named_parameters() if ".experts." not in f".{n}."}
    experts = {f"{i}.{n}": g for i, layer in moe_layers(model) for n, g in _expert_grads(layer).items()}
    update_moe_biases(model)
    biases = {i: layer.router.expert_bias.clone() for i, layer in moe_layers(model)}
    return dict(loss=_summed(loss), dense=dense, experts=experts, biases=biases)


def _bad_degree_message(groups: dict[int, dist.ProcessGroup]) -> tuple[str, int]:
    torch.manual_seed(0)
    layer = DeepSeekMoE(_cfg(n_routed_experts=6))
    try:
        apply_expert_parallel(layer, groups[4])
    except ValueError as err:
        return str(err), _n_local(layer)
    return "", _n_local(layer)


def _worker(rank: int, world: int) -> dict:
    groups = {2: _ep_groups(2, rank), 4: _ep_groups(4, rank)}
    results = {name: _run_layer_case(name, rank, groups) for name in LAYER_CASES}
    results["model"] = _run_model_case(rank, groups)
    results["bad_degree"] = _bad_degree_message(groups)
    return results


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return run_distributed(_worker, WORLD)


def _expert_slice(ep: int, rank: int, n_experts: int) -> slice:
    n_local = n_experts // ep
    start = (rank % ep) * n_local
    return slice(start, start + n_local)


def _check_expert_grads(rank_grads: list[dict[str, torch.Tensor]], ref: dict[str, torch.Tensor],
                        ep: int, name: str) -> None:
    """Each slice's reference grad equals the sum over the ranks that hold that slice."""
    for key, full in ref.items():
        n_experts = full.shape[0]
        for ep_rank in range(ep):
            holders = [g[key] for r, g in enumerate(rank_grads) if r % ep == ep_rank]
            sl = _expert_slice(ep, ep_rank, n_experts)
            assert_close(torch.stack(holders).sum(0), full[sl], name=f"{name} {key} slice {ep_rank}")


@pytest.mark.parametrize("name", list(LAYER_CASES))
def test_layer_matches_single_process(ranks, name):
    ep = LAYER_CASES[name][0]
    layer = _make_layer(name)
    inputs = [_layer_inputs(name, r) for r in range(WORLD)]
    x = torch.cat([xi for xi, _ in inputs]).requires_grad_(True)
    g = torch.cat([gi for _, gi in inputs])
    with _kernels(name):
        out = layer(x)
        # Per-sequence balance loss averages over sequences: the rank losses sum to WORLD x this one.
        ((out * g).sum() + WORLD * layer.aux_loss).backward()
    res = [r[name] for r in ranks]
    assert all(r["n_local"] == 8 // ep for r in res)
    assert_close(torch.cat([r["out"] for r in res]), out, name=f"{name} output")
    assert_close(torch.cat([r["x_grad"] for r in res]), x.grad, name=f"{name} input grad")
    assert_close(res[0]["gate"], layer.router.gate.weight.grad, name=f"{name} gate grad")
    for n, p in layer.shared_experts.named_parameters():
        assert_close(res[0]["shared"][n], p.grad, name=f"{name} shared {n}")
    _check_expert_grads([r["experts"] for r in res], _expert_grads(layer), ep, name)


def test_uneven_routing_leaves_idle_ranks_with_zero_grads(ranks):
    layer = _make_layer("uneven_ep4")
    layer(torch.cat([_layer_inputs("uneven_ep4", r)[0] for r in range(WORLD)]))
    assert layer.tokens_per_expert[[1, 4, 5, 6, 7]].sum() == 0
    for rank in (2, 3):  # own experts 4..7: received nothing, yet every weight has a gradient
        for grad in ranks[rank]["uneven_ep4"]["experts"].values():
            assert torch.count_nonzero(grad) == 0
    assert torch.count_nonzero(ranks[0]["uneven_ep4"]["experts"]["w1"][0]) > 0


def test_model_with_ep2_over_two_replicas_matches_single_process(ranks):
    model = _make_model()
    tokens = torch.cat([_model_tokens(r) for r in range(WORLD)])
    loss = _model_loss(model, tokens, float(WORLD))
    loss.backward()
    res = [r["model"] for r in ranks]
    assert_close(res[0]["loss"], loss, name="loss")
    for n, p in model.named_parameters():
        if ".experts." not in f".{n}.":
            assert_close(res[0]["dense"][n], p.grad, name=n)
    ref_experts = {f"{i}.{n}": g for i, layer in moe_layers(model) for n, g in _expert_grads(layer).items()}
    _check_expert_grads([r["experts"] for r in res], ref_experts, MODEL_CASE["ep"], "model")


def test_bias_update_uses_the_global_load_on_every_rank(ranks):
    model = _make_model()
    model(torch.cat([_model_tokens(r) for r in range(WORLD)])[:, :-1])
    update_moe_biases(model)
    for i, layer in moe_layers(model):
        assert layer.router.expert_bias.abs().sum() > 0
        for r in range(WORLD):
            torch.testing.assert_close(ranks[r]["model"]["biases"][i], layer.router.expert_bias)


def test_ep_must_divide_expert_count(ranks):
    message, n_local = ranks[0]["bad_degree"]
    assert "ep=4" in message and "n_routed_experts=6" in message and "[1, 2, 3, 6]" in message
    assert n_local == 6  # the model was left intact
