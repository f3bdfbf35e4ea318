"""DeepSeek-style model: MLA against a from-scratch reference, routing rules, balancing, FLOPs,
recipes against published sizes, and a full forward/backward."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from dist_utils import assert_close
from lightning_attn_parallel.models.config import ModelConfig, smoke_scale
from lightning_attn_parallel.models.deepseek import (
    DeepSeekMoE, MultiHeadLatentAttention, Router, build_deepseek, collect_aux_loss,
    grouped_swiglu, looped_swiglu, moe_load_stats,
)
from lightning_attn_parallel.models.flops import active_matmul_params

RECIPES = Path(__file__).resolve().parent.parent / "lightning_attn_parallel" / "recipes"


pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(**over) -> ModelConfig:
    base = dict(family="deepseek", vocab_size=64, d_model=32, n_layers=2, n_heads=4, ffn_dim=48,
                max_seq_len=64, attention="mla", kv_lora_rank=16, qk_nope_head_dim=8,
                qk_rope_head_dim=4, v_head_dim=6, n_routed_experts=8, n_shared_experts=1,
                moe_top_k=2, moe_ffn_dim=16, init_std=0.1)
    base.update(over)
    return ModelConfig(**base)


def _recipe(name: str) -> ModelConfig:
    return ModelConfig(**yaml.safe_load((RECIPES / f"{name}.yaml").read_text())["model"])


# --------------------------------------------------------------------------------------------
# MLA
# --------------------------------------------------------------------------------------------


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rotate(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE as complex multiplication of consecutive pairs (x[2i], x[2i+1])."""
    dim = x.shape[-1]
    freqs = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = positions.double()[:, None] * freqs[None]
    pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], dim // 2, 2).contiguous())
    return torch.view_as_real(pairs * torch.polar(torch.ones_like(angles), angles)).flatten(-2)


def reference_mla(attn: MultiHeadLatentAttention, cfg: ModelConfig, x: torch.Tensor,
                  positions: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V2's equations written out head by head in float64."""
    w = {n: p.detach().double() for n, p in attn.named_parameters()}
    x = x.double()
    b, s, _ = x.shape
    h, nope, rope, vd = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    if cfg.q_lora_rank is None:
        q = x @ w["wq.weight"].T
    else:
        q = _rms(x @ w["wq_a.weight"].T, w["q_norm.weight"], cfg.norm_eps) @ w["wq_b.weight"].T
    q = q.view(b, s, h, nope + rope)
    compressed = x @ w["wkv_a.weight"].T
    latent, k_rope = compressed[..., :cfg.kv_lora_rank], compressed[..., cfg.kv_lora_rank:]
    kv = (_rms(latent, w["kv_norm.weight"], cfg.norm_eps) @ w["wkv_b.weight"].T).view(b, s, h, nope + vd)
    k_rope = _rotate(k_rope, positions, cfg.rope_theta)
    mask = torch.ones(s, s, dtype=torch.bool).tril()
    heads = []
    for i in range(h):
        qi = torch.cat([q[:, :, i, :nope], _rotate(q[:, :, i, nope:], positions, cfg.rope_theta)], -1)
        ki = torch.cat([kv[:, :, i, :nope], k_rope], -1)
        scores = (qi @ ki.transpose(1, 2)) / math.sqrt(nope + rope)
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        heads.append(probs @ kv[:, :, i, nope:])
    return torch.cat(heads, -1) @ w["wo.weight"].T


@pytest.mark.parametrize("q_lora_rank", [None, 12])
def test_mla_matches_reference(q_lora_rank):
    cfg = _cfg(q_lora_rank=q_lora_rank)
    torch.manual_seed(0)
    attn = MultiHeadLatentAttention(cfg)
    for p in attn.parameters():
        if p.ndim == 2:
            torch.nn.init.normal_(p, std=0.2)
        else:
            torch.nn.init.uniform_(p, 0.5, 1.5)
    x = torch.randn(2, 10, cfg.d_model)
    positions = torch.arange(10) + 7  # a shard that starts mid-sequence: RoPE uses global positions
    assert attn.kernel.scale == pytest.approx(12 ** -0.5)
    assert_close(attn(x, positions), reference_mla(attn, cfg, x, positions), name="MLA")


# --------------------------------------------------------------------------------------------
# Routing
# --------------------------------------------------------------------------------------------


def _identity_router(**over) -> Router:
    """A router whose logits are its input (d_model = n_routed_experts, gate = identity)."""
    cfg = _cfg(d_model=8, n_heads=2, **over)
    router = Router(cfg)
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(8))
    return router


def test_group_limited_topk_picks_only_from_top_groups():
    router = _identity_router(n_expert_groups=4, topk_groups=2, moe_top_k=3)
    logits = torch.randn(500, 8)
    indices, _, scores = router(logits)
    best_groups = scores.view(500, 4, 2).amax(-1).topk(2, dim=-1).indices
    assert ((indices // 2).unsqueeze(-1) == best_groups.unsqueeze(1)).any(-1).all()
    # A case where the unrestricted top-2 would take expert 2 from the second-best group.
    crafted = torch.tensor([[5.0, 4.9, 4.95, 0, 0, 0, 0, 0]])
    assert sorted(_identity_router(n_expert_groups=4, topk_groups=1)(crafted)[0][0].tolist()) == [0, 1]
    assert sorted(_identity_router(n_expert_groups=4, topk_groups=2)(crafted)[0][0].tolist()) == [0, 2]


def test_sigmoid_groups_rank_by_their_best_two():
    # Group 0 has the single best expert, group 1 the better pair.
    logits = torch.tensor([[6.0, -6.0, 3.0, 3.0, -6, -6, -6, -6]])
    router = _identity_router(score_func="sigmoid", n_expert_groups=4, topk_groups=1)
    assert sorted(router(logits)[0][0].tolist()) == [2, 3]


def test_softmax_and_sigmoid_weights_and_scaling():
    logits = torch.randn(16, 8)
    idx, weights, _ = _identity_router(routed_scaling_factor=2.5)(logits)
    torch.testing.assert_close(weights, 2.5 * logits.softmax(-1).gather(1, idx))
    assert torch.equal(idx, logits.topk(2, dim=-1).indices)
    idx, weights, _ = _identity_router(score_func="sigmoid", norm_topk_prob=True,
                                       routed_scaling_factor=3.0)(logits)
    chosen = logits.sigmoid().gather(1, idx)
    torch.testing.assert_close(weights, 3.0 * chosen / chosen.sum(-1, keepdim=True))
    torch.testing.assert_close(weights.sum(-1), torch.full((16,), 3.0))


def test_bias_changes_selection_but_not_weights():
    router = _identity_router(score_func="sigmoid")
    router.expert_bias[7] = 10.0
    logits = torch.randn(16, 8)
    idx, weights, _ = router(logits)
    assert (idx == 7).any(-1).all()
    torch.testing.assert_close(weights, logits.sigmoid().gather(1, idx))


# --------------------------------------------------------------------------------------------
# The MoE layer
# --------------------------------------------------------------------------------------------


def test_moe_layer_matches_per_token_reference():
    torch.manual_seed(0)
    layer = DeepSeekMoE(_cfg(n_shared_experts=2, score_func="sigmoid", norm_topk_prob=True))
    x = torch.randn(3, 5, 32)
    out = layer(x)
    tokens = x.reshape(-1, 32)
    idx, weights, _ = layer.router(tokens)
    e = layer.experts
    expected = []
    for t in range(tokens.shape[0]):
        row = layer.shared_experts(tokens[t])
        for j in range(idx.shape[1]):
            k = idx[t, j]
            row = row + weights[t, j] * ((F.silu(tokens[t] @ e.w1[k]) * (tokens[t] @ e.w3[k])) @ e.w2[k])
        expected.append(row)
    assert_close(out.reshape(-1, 32), torch.stack(expected), name="MoE")
    assert layer.tokens_per_expert.sum() == 15 * 2


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_grouped_gemm_matches_expert_loop(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no GPU")
    torch.manual_seed(0)
    counts = torch.tensor([3, 0, 5, 8], device=device)
    x = torch.randn(16, 32, dtype=torch.bfloat16, device=device)
    w1, w3 = torch.randn(2, 4, 32, 16, dtype=torch.bfloat16, device=device)
    w2 = torch.randn(4, 16, 32, dtype=torch.bfloat16, device=device)
    try:
        grouped = grouped_swiglu(x, counts, w1, w3, w2)
    except (RuntimeError, NotImplementedError) as err:
        pytest.skip(f"torch._grouped_mm unavailable on this device: {err}")
    assert_close(grouped, looped_swiglu(x, counts, w1, w3, w2), rtol=2e-2, name="grouped GEMM")


def test_expert_counts_equal_bincount_and_the_compiled_moe_block_is_one_graph(monkeypatch):
    """Routing counts have a fixed size (n_experts) whatever the routing, so torch.compile traces
    a MoE block on the grouped-GEMM path as one graph; bincount's data-dependent size broke it
    at every MoE layer."""
    import torch._dynamo

    from lightning_attn_parallel.models import deepseek

    idx = torch.tensor([[5, 0], [5, 2], [0, 5]])
    assert deepseek.expert_counts(idx, 8).tolist() == torch.bincount(idx.flatten(), minlength=8).tolist()
    try:
        deepseek.grouped_swiglu(torch.randn(4, 8, dtype=torch.bfloat16), torch.tensor([1, 3]),
                                *torch.randn(2, 2, 8, 8, dtype=torch.bfloat16), torch.randn(2, 8, 8, dtype=torch.bfloat16))
    except (RuntimeError, NotImplementedError) as err:
        pytest.skip(f"torch._grouped_mm unavailable on the CPU: {err}")
    monkeypatch.setattr(deepseek, "_grouped_mm_dtype", lambda x, experts: torch.bfloat16)
    torch.manual_seed(0)
    block = build_deepseek(_cfg(first_k_dense_replace=0)).blocks[0]
    torch._dynamo.reset()
    explained = torch._dynamo.explain(block)(torch.randn(2, 16, 32), torch.arange(16).expand(2, 16))
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]


def test_every_expert_gets_a_gradient_even_without_tokens():
    torch.manual_seed(0)
    layer = DeepSeekMoE(_cfg())
    layer.router.expert_bias[2:] = -100.0  # only experts 0 and 1 are ever selected
    layer(torch.randn(2, 4, 32)).sum().backward()
    assert layer.tokens_per_expert[2:].sum() == 0
    assert layer.experts.w1.grad is not None and layer.experts.w1.grad[2:].abs().sum() == 0


def test_bias_update_moves_load_toward_balance():
    torch.manual_seed(0)
    layer = DeepSeekMoE(_cfg(score_func="sigmoid", bias_update_speed=0.02))
    with torch.no_grad():
        layer.router.gate.weight[:, 0] = torch.linspace(-1, 1, 8)  # feature 0 favours high ids
    x = torch.randn(8, 32, 32)
    x[..., 0] = 3.0

    def imbalance() -> float:
        load = layer.tokens_per_expert
        return (load.max() / load.mean()).item()

    with torch.no_grad():
        layer(x)
        before = imbalance()
        load = layer.load_since_update.clone()
        layer.update_bias()
        assert torch.equal(layer.router.expert_bias, 0.02 * torch.sign(load.mean() - load))
        assert layer.load_since_update.sum() == 0
        for _ in range(100):
            layer(x)
            layer.update_bias()
        after = imbalance()
    assert before > 3.0 and after < 1.5, (before, after)


def test_aux_loss_on_a_crafted_case():
    """Two sequences of two tokens, two experts, top-1, identity gate.

    Sequence 1: both tokens pick expert 0 (p = 0.75 and 0.6): f = (2, 0), P0 = 0.675 -> 1.35.
    Sequence 2: one token each way (p = 0.25/0.75 and 0.75/0.25): f = (1, 1), P = (.5, .5) -> 1.0.
    Mean over sequences 1.175, times the coefficient 0.1.
    """
    cfg = _cfg(d_model=2, n_heads=1, n_routed_experts=2, moe_top_k=1, aux_loss_coef=0.1)
    layer = DeepSeekMoE(cfg)
    with torch.no_grad():
        layer.router.gate.weight.copy_(torch.eye(2))
    x = torch.tensor([[[math.log(3), 0.0], [math.log(1.5), 0.0]],
                      [[0.0, math.log(3)], [math.log(3), 0.0]]])
    layer(x)
    assert layer.aux_loss.item() == pytest.approx(0.1175, rel=1e-6)
    assert layer.tokens_per_expert.tolist() == [3.0, 1.0]
    layer.aux_loss.backward()
    assert layer.router.gate.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------
# FLOPs, recipes and the whole model
# --------------------------------------------------------------------------------------------


def test_flops_count_only_active_experts():
    d, v, heads, ql, kv, nope, rope, vd = 32, 64, 4, 12, 16, 8, 4, 6
    ffn, n_exp, k, shared, mf, seq = 48, 8, 2, 1, 16, 20
    cfg = _cfg(q_lora_rank=ql, first_k_dense_replace=1)
    attention = d * ql + ql * heads * (nope + rope) + d * (kv + rope) + kv * heads * (nope + vd) + heads * vd * d
    dense_ffn = 3 * d * ffn
    moe = n_exp * d + 3 * d * shared * mf + k * 3 * d * mf  # gate, shared, k active experts
    matmul = 2 * attention + dense_ffn + moe + d * v  # LM head counted, embedding not
    expected = 6 * matmul + 6 * 2 * heads * seq * ((nope + rope) + vd)
    model = build_deepseek(cfg)
    assert model.flops_per_token(seq) == pytest.approx(expected, rel=1e-12)
    # Doubling the experts at the same top-k adds only the wider gate.
    wider = build_deepseek(_cfg(q_lora_rank=ql, first_k_dense_replace=1, n_routed_experts=16))
    assert wider.flops_per_token(seq) - model.flops_per_token(seq) == pytest.approx(6 * 8 * d)


# (recipe, total parameters, active parameters) as published; papers differ on whether the
# embedding counts as active, so the published figure must lie between the two counts.
PUBLISHED = [("deepseek_v2_lite", 15.7e9, 2.4e9), ("deepseek_v2_236b", 236e9, 21e9),
             ("deepseek_moe_16b", 16.4e9, 2.8e9)]


@pytest.mark.parametrize("name,total,active", PUBLISHED)
def test_recipes_match_published_sizes(name, total, active):
    cfg = _recipe(name)
    with torch.device("meta"):
        model = build_deepseek(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    matmul = active_matmul_params(model)
    assert n_params == pytest.approx(total, rel=0.01)
    assert 0.97 * matmul <= active <= 1.03 * (matmul + model.tok_embeddings.weight.numel())


def test_top_k_above_expert_count_is_rejected():
    with pytest.raises(ValueError, match="moe_top_k=9.*n_routed_experts=8"):
        _cfg(moe_top_k=9)


@pytest.mark.parametrize("name", ["tiny_moe", "deepseek_moe_16b", "deepseek_v2_236b"])
def test_forward_backward_has_finite_grads(name):
    cfg = _recipe(name)
    if name != "tiny_moe":
        cfg = smoke_scale(cfg)
    torch.manual_seed(0)
    model = build_deepseek(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 33))
    logits = model.logits(tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()) + collect_aux_loss(model)
    loss.backward()
    assert torch.isfinite(loss)
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    stats = moe_load_stats(model)
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.n_layers))
    assert len([k for k in stats if k.endswith("/imbalance")]) == n_moe
    assert all(v >= 1.0 for k, v in stats.items() if k.endswith("/imbalance"))
    assert len([k for k in stats if k.endswith("/aux_loss")]) == n_moe
