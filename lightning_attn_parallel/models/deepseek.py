"""DeepSeek-style decoder: multi-head latent attention (MLA) and the DeepSeekMoE layer.

MLA (DeepSeek-V2, arXiv:2405.04434) compresses keys and values into a small latent and adds a
decoupled rotary part shared by all heads; here it is computed in its training form (latent
expanded to per-head keys and values) so that any attention kernel, local or context parallel,
can run it. The MoE layer (DeepSeekMoE, arXiv:2401.06066) combines always-on shared experts with
many fine-grained routed experts; routing follows V2 (softmax, group-limited top-k, sequence-wise
balance loss) or V3 (arXiv:2412.19437: sigmoid scores, normalised top-k weights and the
auxiliary-loss-free selection bias), chosen by ModelConfig fields.

The MoE layer never moves tokens itself: it calls `self.dispatcher`, which expert parallelism
replaces with an all-to-all dispatcher. Routed experts are stacked weights (E, ...) so that they
can be sliced across ranks and multiplied with one grouped GEMM.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .fused_projections import project
from .layers import LocalAttentionKernel, RMSNorm, SwiGLU
from .llama import CausalTransformer, GroupedQueryAttention, TransformerBlock, run_kernel
from .protocol import moe_layers
from .rope import RopeScaling, RotaryEmbedding, softmax_scale_factor
from .token_groups import pad_rows, padded_groups, unpad_rows


# --------------------------------------------------------------------------------------------
# Multi-head latent attention
# --------------------------------------------------------------------------------------------


class MultiHeadLatentAttention(nn.Module):
    """MLA in its training form: q, k, v of shape (B, H, S, nope+rope) / (B, H, S, v_head_dim).

    Projections whose output is per head (wq or wq_b, wkv_b) and the output projection wo can be
    split by heads for tensor parallelism; the down-projections (wq_a, wkv_a) and the latent norms
    stay replicated. Reshapes use -1 for the head count for that reason.
    """

    # what `fuse_projections` runs as one GEMM: the queries' first projection with wkv_a
    projection_groups = (("wq", "wkv_a"), ("wq_a", "wkv_a"))

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.nope_dim = cfg.qk_nope_head_dim
        self.rope_dim = cfg.qk_rope_head_dim
        self.qk_dim = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        self.v_dim = cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        q_out = cfg.n_heads * self.qk_dim
        if cfg.q_lora_rank is None:
            self.wq = nn.Linear(cfg.d_model, q_out, bias=False)
        else:
            self.wq_a = nn.Linear(cfg.d_model, cfg.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
            self.wq_b = nn.Linear(cfg.q_lora_rank, q_out, bias=False)
        self.wkv_a = nn.Linear(cfg.d_model, cfg.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, cfg.norm_eps)
        self.wkv_b = nn.Linear(cfg.kv_lora_rank, cfg.n_heads * (self.nope_dim + self.v_dim), bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.v_dim, cfg.d_model, bias=False)
        scaling = RopeScaling.of(cfg)
        self.rope = RotaryEmbedding(self.rope_dim, cfg.max_seq_len, cfg.rope_theta, scaling)
        self.kernel: nn.Module = LocalAttentionKernel()
        # The published scale is 1/sqrt(qk head dim) (v has another width, so set it explicitly),
        # times YaRN's mscale(factor, mscale_all_dim)^2 when the context is extended.
        self.kernel.scale = self.qk_dim ** -0.5 * softmax_scale_factor(scaling)
        self.fuse_projections = False  # down projections as one GEMM (models/fused_projections.py)

    def _down_projections(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(queries, the latent and rotary key of wkv_a): the two projections of x share one GEMM
        under `fuse_projections` (wq or wq_a, with wkv_a), where fusion applies."""
        first = self.wq if hasattr(self, "wq") else self.wq_a
        q, kv = project(x, (first, self.wkv_a), self.fuse_projections)
        return (q if hasattr(self, "wq") else self.wq_b(self.q_norm(q))), kv

    def forward(self, x: torch.Tensor, positions: torch.Tensor,
                document_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, s, _ = x.shape
        q, kv_a = self._down_projections(x)
        q = q.view(b, s, -1, self.qk_dim).transpose(1, 2)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        latent, k_rope = kv_a.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.wkv_b(self.kv_norm(latent)).view(b, s, -1, self.nope_dim + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        # One rotary key per token, shared by every head (the "decoupled" RoPE of MLA).
        k_rope = self.rope(k_rope.view(b, 1, s, self.rope_dim), positions)
        q = torch.cat([q_nope, self.rope(q_rope, positions)], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(-1, k_nope.shape[1], -1, -1)], dim=-1)
        out = run_kernel(self.kernel, q, k, v, positions, document_ids)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


# --------------------------------------------------------------------------------------------
# Routing
# --------------------------------------------------------------------------------------------


class Router(nn.Module):
    """Scores every routed expert and picks top-k per token, without ever dropping a token.

    `expert_bias` (the auxiliary-loss-free balancing of DeepSeek-V3) shifts which experts are
    *selected* but never the weights their outputs get, so balancing does not distort the
    function the layer computes. Scores are computed in fp32 even under autocast: a bf16 softmax
    over hundreds of experts makes near-ties in the top-k arbitrary.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_experts = cfg.n_routed_experts
        self.top_k = cfg.moe_top_k
        self.score_func = cfg.score_func
        self.n_groups = cfg.n_expert_groups
        self.topk_groups = cfg.topk_groups
        self.scaling = cfg.routed_scaling_factor
        self.norm_topk_prob = cfg.norm_topk_prob
        self.gate = nn.Linear(cfg.d_model, cfg.n_routed_experts, bias=False)
        self.register_buffer("expert_bias", torch.zeros(cfg.n_routed_experts))

    def scores(self, tokens: torch.Tensor) -> torch.Tensor:
        """(T, E) affinities in fp32 (fp64 for fp64 tokens): softmax (V2) or independent sigmoids (V3)."""
        dtype = torch.promote_types(tokens.dtype, torch.float32)
        with torch.autocast(tokens.device.type, enabled=False):
            logits = F.linear(tokens.to(dtype), self.gate.weight.to(dtype))
        return logits.softmax(dim=-1) if self.score_func == "softmax" else logits.sigmoid()

    @torch.no_grad()
    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """(T, k) expert indices from the biased scores, limited to the best `topk_groups` groups.

        A group's score is its best expert for softmax routing (V2's group-limited greedy) and the
        sum of its best two for sigmoid routing (V3), where single outliers are less telling.
        """
        biased = scores + self.expert_bias
        if self.topk_groups < self.n_groups:
            grouped = biased.view(biased.shape[0], self.n_groups, -1)
            if self.score_func == "sigmoid":
                group_score = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
            else:
                group_score = grouped.amax(dim=-1)
            keep = group_score.topk(self.topk_groups, dim=-1).indices
            allowed = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep, True)
            biased = grouped.masked_fill(~allowed.unsqueeze(-1), float("-inf")).flatten(1)
        return biased.topk(self.top_k, dim=-1).indices

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(indices (T, k), combine weights (T, k) fp32, scores (T, E) fp32) for tokens (T, D)."""
        scores = self.scores(tokens)
        indices = self.select(scores)
        weights = scores.gather(1, indices)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return indices, weights * self.scaling, scores


def sequence_balance_loss(probs: torch.Tensor, indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """DeepSeek's expert-level balance loss, per sequence and then averaged over sequences.

    probs (B, S, E): routing probabilities summing to one per token; indices (B, S, k).
    For each sequence: sum_i f_i * P_i with f_i = E / (k S) * (tokens choosing i) and P_i the mean
    probability of i; a perfectly even router scores 1. Per sequence (not per batch), so that the
    value does not depend on how a batch is split across data-parallel ranks.
    """
    b, s, k = indices.shape
    counts = torch.zeros(b, n_experts, device=probs.device, dtype=probs.dtype)
    counts.scatter_add_(1, indices.reshape(b, s * k), torch.ones(b, s * k, device=probs.device,
                                                                 dtype=probs.dtype))
    fraction = counts * (n_experts / (k * s))
    return (fraction * probs.mean(dim=1)).sum(dim=-1).mean()


# --------------------------------------------------------------------------------------------
# Routed experts and the local dispatcher
# --------------------------------------------------------------------------------------------

_GROUPED_MM_FAILED = False

# a grouped GEMM: (a (N, K) rows grouped by expert, b (G, K, M) as the experts store it, in any
# float dtype (the kernel casts it to a's), int32 end offsets of the groups (G,)) -> (N, M)
GroupedMM = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def torch_grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """bf16 `torch._grouped_mm`, called as torch 2.11 to 2.13 take it (`bias`, `out_dtype` follow)."""
    return torch._grouped_mm(a, b.to(a.dtype), offs=offs)


@dataclass(frozen=True)
class GroupedGemm:
    """How the routed experts' grouped GEMMs run: the kernel, the multiple each expert's row
    count must be (rows are padded up to it, models/token_groups.py) and the multiple the
    weights' dimensions must be. parallel/ swaps it (fp8 experts, parallel/float8.py)."""

    mm: GroupedMM = torch_grouped_mm
    row_multiple: int = 1
    dim_multiple: int = 8  # CUDA's grouped GEMM needs 16-byte aligned bf16 rows


BF16_GROUPED_GEMM = GroupedGemm()


def _grouped_mm_dtype(x: torch.Tensor, experts: "RoutedExperts") -> Optional[torch.dtype]:
    """bf16 when the experts' grouped GEMM can run these rows on this GPU; None means loop instead.

    CUDA needs bf16 operands whose rows are aligned (`GroupedGemm.dim_multiple`). A kernel that
    still refuses the call makes us loop from then on.
    """
    if (_GROUPED_MM_FAILED or not experts.use_grouped_mm or not x.is_cuda or x.shape[0] == 0
            or not hasattr(torch, "_grouped_mm")):
        return None
    autocast_bf16 = torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.bfloat16
    if not (autocast_bf16 or x.dtype == torch.bfloat16):
        return None
    multiple = experts.grouped_gemm.dim_multiple
    if experts.w1.shape[1] % multiple or experts.w1.shape[2] % multiple:
        return None
    return torch.bfloat16


def grouped_swiglu(x: torch.Tensor, counts: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor,
                   w2: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
                   gemm: GroupedGemm = BF16_GROUPED_GEMM) -> torch.Tensor:
    """Every expert's SwiGLU in three grouped GEMMs; rows of x are grouped by expert by `counts`.
    Where the kernel needs row counts in multiples, the groups are padded with zero rows and the
    padding dropped from the output. The kernel casts the weights (fp32 under autocast) itself,
    so a kernel that copies them anyway does both in one pass."""
    x = x.to(dtype)
    layout = None
    if gemm.row_multiple > 1:
        layout = padded_groups(counts, x.shape[0], gemm.row_multiple)
        x, offs = pad_rows(x, layout), layout.ends
    else:
        offs = counts.cumsum(0).to(torch.int32)
    hidden = F.silu(gemm.mm(x, w1, offs)) * gemm.mm(x, w3, offs)
    out = gemm.mm(hidden, w2, offs)
    return out if layout is None else unpad_rows(out, layout)


def looped_swiglu(x: torch.Tensor, counts: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor,
                  w2: torch.Tensor) -> torch.Tensor:
    """Reference path: one SwiGLU per expert. Experts without rows still run on an empty slice so
    every expert weight gets a (zero) gradient and hook-driven gradient reducers never wait."""
    # unbind (not w[e]) so the backward stacks the per-expert grads once instead of
    # materialising a full (E, ...) zero gradient per expert.
    outs = [(F.silu(rows @ gate) * (rows @ up)) @ down
            for rows, gate, up, down in zip(x.split(counts.tolist()), w1.unbind(0), w3.unbind(0),
                                            w2.unbind(0))]
    return torch.cat(outs)


class RoutedExperts(nn.Module):
    """Fine-grained experts as stacked weights: w1, w3 (E, D, F) and w2 (E, F, D).

    `n_experts` is the model's total. `active_fraction` tells the FLOP counter that a token uses
    top_k of them. `is_expert` is the model protocol's marker of routed experts (models.protocol).
    The dispatcher slot calls it on rows grouped by expert. `local_view` is a slot too: what of
    each weight this process computes with (itself by default; the block of experts a rank holds
    once expert parallelism has split them), read inside the forward, where any wrapper has
    already gathered the weights.
    """

    is_expert = True

    def __init__(self, n_experts: int, dim: int, hidden: int, top_k: int, init_std: float) -> None:
        super().__init__()
        self.n_experts = n_experts
        self.active_fraction = top_k / n_experts
        self.init_std = init_std
        self.use_grouped_mm = True  # False: always the per-expert loop (ParallelPlan.grouped_gemm)
        self.grouped_gemm = BF16_GROUPED_GEMM  # slot: the grouped GEMMs' kernel (parallel/ fills it)
        self.local_view: Callable[[torch.Tensor], torch.Tensor] = _whole  # slot (parallel/ fills it)
        self.w1 = nn.Parameter(torch.empty(n_experts, dim, hidden))
        self.w3 = nn.Parameter(torch.empty(n_experts, dim, hidden))
        self.w2 = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.reset_parameters()

    def weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.w1, self.w3, self.w2

    def reset_parameters(self) -> None:
        if self.w1.is_meta:
            return
        for w in (self.w1, self.w3, self.w2):
            nn.init.normal_(w, mean=0.0, std=self.init_std)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x (N, D) with rows grouped by expert, `counts` (G,) rows per expert this process
        computes (all E, or the G = E/ep of its block)."""
        global _GROUPED_MM_FAILED
        w1, w3, w2 = (self.local_view(w) for w in self.weights())
        dtype = _grouped_mm_dtype(x, self)
        if dtype is not None:
            try:
                return grouped_swiglu(x, counts, w1, w3, w2, dtype, self.grouped_gemm)
            except RuntimeError as err:  # e.g. a GPU generation the kernel does not support
                if self.grouped_gemm is not BF16_GROUPED_GEMM:  # fp8: try the bf16 kernel next
                    warnings.warn(f"the experts' fp8 grouped GEMM failed ({err}); running them in bf16")
                    self.grouped_gemm = BF16_GROUPED_GEMM
                    return self.forward(x, counts)
                _GROUPED_MM_FAILED = True
                warnings.warn(f"the experts' grouped GEMM failed ({err}); running experts one by one in "
                              f"{dtype}")
        return looped_swiglu(x, counts, w1, w3, w2)


def _whole(weight: torch.Tensor) -> torch.Tensor:
    return weight


def expert_counts(expert_indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """(n_experts,) int64 number of (token, slot) pairs routed to each expert.

    A scatter-add into a fixed-size vector rather than `torch.bincount`, whose output size
    depends on the data: bincount breaks the compiled graph at every MoE layer, this does not.
    Integer adds are exact, so the counts do not depend on the order the atomics land in.
    """
    flat = expert_indices.reshape(-1)
    return flat.new_zeros(n_experts).scatter_add_(0, flat, torch.ones_like(flat))


def sort_by_expert(expert_indices: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, counts) for the (token, slot) pairs of expert_indices (T, k).

    `order` lists the flattened pairs grouped by expert (stable, so tokens keep their order
    within an expert); the pair's token is order // k. `counts` (n_experts,) sizes the groups.
    """
    flat = expert_indices.reshape(-1)
    return torch.argsort(flat, stable=True), expert_counts(flat, n_experts)


def combine(sorted_out: torch.Tensor, order: torch.Tensor, expert_weights: torch.Tensor) -> torch.Tensor:
    """Undo `sort_by_expert` and sum each token's k expert outputs with their router weights."""
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    t, k = expert_weights.shape
    per_slot = sorted_out[inverse].view(t, k, -1)
    return (per_slot * expert_weights.unsqueeze(-1).to(per_slot.dtype)).sum(dim=1)


class LocalDispatcher(nn.Module):
    """Runs every routed expert on this rank (no expert parallelism)."""

    def forward(self, tokens: torch.Tensor, expert_indices: torch.Tensor, expert_weights: torch.Tensor,
                experts: RoutedExperts) -> torch.Tensor:
        order, counts = sort_by_expert(expert_indices, experts.n_experts)
        out = experts(tokens[order // expert_indices.shape[1]], counts)
        return combine(out, order, expert_weights)


# --------------------------------------------------------------------------------------------
# The MoE layer
# --------------------------------------------------------------------------------------------


class DeepSeekMoE(nn.Module):
    """Shared experts plus top-k routed experts; the `ffn` of MoE blocks.

    After each forward: `aux_loss` holds the balance loss (in the graph, already multiplied by
    aux_loss_coef; None when the coefficient is 0) for the training step to add, and
    `tokens_per_expert` the latest routing counts for monitoring. Counts also accumulate until
    `update_bias()` applies the auxiliary-loss-free update once per optimizer step.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_experts = cfg.n_routed_experts
        self.aux_loss_coef = cfg.aux_loss_coef
        self.bias_update_speed = cfg.bias_update_speed
        self.router = Router(cfg)
        self.experts = RoutedExperts(cfg.n_routed_experts, cfg.d_model, cfg.moe_ffn_dim,
                                     cfg.moe_top_k, cfg.init_std)
        self.shared_experts = (SwiGLU(cfg.d_model, cfg.n_shared_experts * cfg.moe_ffn_dim)
                               if cfg.n_shared_experts > 0 else None)
        self.dispatcher: nn.Module = LocalDispatcher()
        # Slot: sums the routing loads over the ranks that hold replicas of this router before
        # the bias update (parallel/ fills it; None: this process holds the only replica).
        self.load_sum: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
        self.register_buffer("tokens_per_expert", torch.zeros(cfg.n_routed_experts), persistent=False)
        self.register_buffer("load_since_update", torch.zeros(cfg.n_routed_experts), persistent=False)
        self.aux_loss: Optional[torch.Tensor] = None

    def reset_parameters(self) -> None:
        """Zero the routing state (after meta-device materialisation it holds garbage)."""
        for buf in (self.router.expert_bias, self.tokens_per_expert, self.load_since_update):
            if not buf.is_meta:
                buf.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        tokens = x.reshape(-1, d)
        indices, weights, scores = self.router(tokens)
        self._record_load(indices)
        self.aux_loss = self._balance_loss(scores, indices, b, s)
        out = self.dispatcher(tokens, indices, weights, self.experts)
        if self.shared_experts is not None:
            out = out + self.shared_experts(tokens)
        return out.view(b, s, d)

    @torch.no_grad()
    def _record_load(self, indices: torch.Tensor) -> None:
        counts = expert_counts(indices, self.n_experts).to(self.tokens_per_expert)
        self.tokens_per_expert.copy_(counts)
        if self.training:
            self.load_since_update += counts

    def _balance_loss(self, scores: torch.Tensor, indices: torch.Tensor, b: int, s: int) -> Optional[torch.Tensor]:
        if self.aux_loss_coef <= 0:
            return None
        probs = scores if self.router.score_func == "softmax" else scores / scores.sum(-1, keepdim=True)
        loss = sequence_balance_loss(probs.view(b, s, -1), indices.view(b, s, -1), self.n_experts)
        return self.aux_loss_coef * loss

    @torch.no_grad()
    def update_bias(self, load: Optional[torch.Tensor] = None) -> None:
        """Nudge under-loaded experts up and over-loaded ones down by bias_update_speed.

        `load` (E,) defaults to the counts accumulated since the last call; pass a load summed
        over data-parallel ranks (see update_moe_biases) so every replica moves identically.
        """
        load = self.load_since_update if load is None else load.to(self.load_since_update)
        if self.bias_update_speed > 0:
            self.router.expert_bias += self.bias_update_speed * torch.sign(load.mean() - load)
        self.load_since_update.zero_()


def collect_aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the balance losses of the latest forward (a 0-d zero when there are none)."""
    losses = [layer.aux_loss for _, layer in moe_layers(model) if layer.aux_loss is not None]
    if not losses:
        return torch.zeros((), device=next(model.parameters()).device)
    return torch.stack(losses).sum()


def update_moe_biases(model: nn.Module) -> None:
    """Apply the auxiliary-loss-free bias update to every MoE layer; call after optimizer.step().

    The accumulated loads of all layers are summed in one call of the layers' `load_sum` slot
    (over every replica of the routers, when parallel/ has filled it), so replicas of the router
    stay identical. Ranks that see the same tokens (tensor parallel peers) only scale the load,
    which leaves sign(mean - load) unchanged.
    """
    layers = [layer for _, layer in moe_layers(model)]
    if not layers:
        return
    loads = torch.stack([layer.load_since_update for layer in layers])
    if layers[0].load_sum is not None:
        loads = layers[0].load_sum(loads)
    for layer, load in zip(layers, loads):
        layer.update_bias(load)


def moe_load_stats(model: nn.Module) -> dict[str, float]:
    """Per MoE layer: max and mean tokens per expert of the latest forward, their ratio
    (1.0 is perfect balance) and the balance loss. One device-to-host copy for all layers."""
    layers = moe_layers(model)
    if not layers:
        return {}
    loads = torch.stack([layer.tokens_per_expert.float() for _, layer in layers])
    aux = torch.stack([layer.aux_loss.detach().float() if layer.aux_loss is not None
                       else loads.new_full((), float("nan")) for _, layer in layers])
    rows = torch.stack([loads.amax(1), loads.mean(1), aux.to(loads)], dim=1).tolist()
    stats: dict[str, float] = {}
    for (i, _), (max_load, mean_load, aux_loss) in zip(layers, rows):  # named as in moe_stat_names
        stats[f"moe/layer{i}/max_load"] = max_load
        stats[f"moe/layer{i}/mean_load"] = mean_load
        stats[f"moe/layer{i}/imbalance"] = max_load / mean_load if mean_load > 0 else 0.0
        if not math.isnan(aux_loss):
            stats[f"moe/layer{i}/aux_loss"] = aux_loss
    return stats


def moe_stat_names(cfg: ModelConfig) -> list[str]:
    """The names `moe_load_stats` gives, for every MoE layer of the whole model: the same list on
    every rank, whichever layers a pipeline rank holds (metrics gathered over ranks need that)."""
    kinds = ("max_load", "mean_load", "imbalance", "aux_loss")
    return [f"moe/layer{i}/{kind}" for i in range(cfg.n_layers) if cfg.is_moe_layer(i) for kind in kinds]


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


def _attention(cfg: ModelConfig) -> nn.Module:
    return MultiHeadLatentAttention(cfg) if cfg.attention == "mla" else GroupedQueryAttention(cfg)


def _ffn(cfg: ModelConfig, layer_idx: int) -> nn.Module:
    return DeepSeekMoE(cfg) if cfg.is_moe_layer(layer_idx) else SwiGLU(cfg.d_model, cfg.ffn_dim)


def build_deepseek(cfg: ModelConfig) -> CausalTransformer:
    """DeepSeek-V2/V3-style (MLA) or DeepSeekMoE-style (attention="gqa") decoder."""
    blocks = [TransformerBlock(cfg, _attention(cfg), _ffn(cfg, i)) for i in range(cfg.n_layers)]
    return CausalTransformer(cfg, blocks)


__all__ = [
    "MultiHeadLatentAttention", "Router", "RoutedExperts", "LocalDispatcher", "DeepSeekMoE",
    "build_deepseek", "collect_aux_loss", "moe_load_stats", "moe_stat_names", "update_moe_biases",
    "sequence_balance_loss", "expert_counts", "sort_by_expert", "combine", "grouped_swiglu", "looped_swiglu",
]
