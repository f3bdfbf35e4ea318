"""Parameter counts split the way parallelism splits them.

The counts come from the real model, built on the meta device (no memory is allocated), so the
planner can never drift from the code that trains. `analytic_counts` computes the same numbers
from the config alone; it is the fallback for a family whose builder is not importable and the
cross-check of the builders in the tests.

Tensor parallelism splits the >=2-D weights of attention and of dense MLPs. Norms, MLA's
latent norms, the MoE router and the shared experts are whole on every
tensor-parallel rank (tokens, not weights, are split before an MoE layer). Routed experts are
split by expert parallelism. Embedding and LM head are split over the vocabulary by tensor
parallelism, unless they are tied (one tensor, kept whole).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

from ..models.config import ModelConfig
from ..models.flops import active_matmul_params, attention_flops_per_token
from ..models.protocol import expert_modules


@dataclass(frozen=True)
class BlockCounts:
    """Parameters of one transformer block, by how parallelism treats them."""

    attention: int = 0  # >=2-D attention weights: split by tp
    attention_small: int = 0  # attention parameters tp keeps whole: norms, MLA's latent projections
    ffn_dense: int = 0  # >=2-D dense-MLP weights: split by tp
    ffn_shared: int = 0  # router and shared experts of an MoE layer: whole
    experts: int = 0  # routed experts: split by ep
    norms: int = 0  # block norms and anything else at block level: whole

    @property
    def tp_sharded(self) -> int:
        return self.attention + self.ffn_dense

    @property
    def replicated(self) -> int:
        return self.attention_small + self.ffn_shared + self.norms

    @property
    def total(self) -> int:
        return self.tp_sharded + self.replicated + self.experts

    def local(self, tp: int, ep: int) -> float:
        """Parameters of this block on one rank before any data-parallel sharding."""
        return self.tp_sharded / tp + self.replicated + self.experts / ep


@dataclass(frozen=True)
class ParamCounts:
    """Whole-model counts plus the per-block split that sharding and FSDP buffers need."""

    embedding: int
    head: int  # 0 when tied to the embedding
    other: int  # final norm and anything outside blocks, embedding and head
    blocks: tuple[BlockCounts, ...]
    buffers: int  # elements of non-parameter tensors (RoPE tables)
    active_matmul: float  # the FLOP counter's matmul parameters (experts scaled by top_k / n)
    head_matmul: int  # LM-head weights counted in active_matmul (0 when tied)
    source: str  # "model" (built on meta) or "analytic"

    @cached_property
    def experts(self) -> int:
        return sum(b.experts for b in self.blocks)

    @cached_property
    def attention(self) -> int:
        return sum(b.attention for b in self.blocks)

    @cached_property
    def tp_sharded(self) -> int:
        return sum(b.tp_sharded for b in self.blocks)

    @cached_property
    def vocab_parallel(self) -> int:
        """Embedding and LM head when tensor parallelism splits them (untied), else 0."""
        return self.embedding + self.head if self.head else 0

    @cached_property
    def replicated(self) -> int:
        """Parameters whole on every tensor- and expert-parallel rank."""
        return sum(b.replicated for b in self.blocks) + self.embedding + self.head + self.other

    @cached_property
    def block_kinds(self) -> frozenset[BlockCounts]:
        return frozenset(self.blocks)

    @cached_property
    def total(self) -> int:
        return self.tp_sharded + self.replicated + self.experts

    def active(self, cfg: ModelConfig) -> float:
        """Parameters one token touches: everything but the routed experts it is not sent to."""
        idle = 1.0 - (cfg.moe_top_k / cfg.n_routed_experts if cfg.is_moe else 1.0)
        return self.total - self.experts * idle

    def summary(self, cfg: ModelConfig, seq_len: int) -> "ModelSummary":
        return ModelSummary(total=self.total, active=self.active(cfg),
                            active_matmul=self.active_matmul,
                            flops_per_token=self.flops_per_token(cfg, seq_len), seq_len=seq_len,
                            source=self.source)

    def flops_per_token(self, cfg: ModelConfig, seq_len: int) -> float:
        """Training FLOPs per token by the package's convention (models/flops.py)."""
        return 6.0 * self.active_matmul + attention_flops_per_token(cfg, seq_len)


@dataclass(frozen=True)
class ModelSummary:
    """The headline numbers of a model at one sequence length."""

    total: int
    active: float
    active_matmul: float
    flops_per_token: float
    seq_len: int
    source: str

    def describe(self) -> str:
        return (f"parameters {self.total / 1e9:.2f}B total, {self.active / 1e9:.2f}B active per "
                f"token; {self.flops_per_token / 1e9:.1f} GFLOP per token at seq_len "
                f"{self.seq_len} (counted from the {self.source})")


# ------------------------------------------------------------------------- from the model
def _numel(params) -> int:
    return sum(p.numel() for p in params)


def _split_by_rank(params) -> tuple[int, int]:
    params = list(params)
    big = _numel(p for p in params if p.ndim >= 2)
    return big, _numel(params) - big


# Attention weights that tensor parallelism keeps whole on every rank (MLA's down-projections to
# its latents; parallel/tensor_parallel.py splits only the per-head projections).
TP_WHOLE_ATTENTION = ("wq_a", "wkv_a")


def _attention_split(attention: nn.Module) -> tuple[int, int]:
    """(weights tensor parallelism splits, parameters it keeps whole) of one attention layer."""
    named = list(attention.named_parameters())
    whole = [p for name, p in named if name.split(".")[0] in TP_WHOLE_ATTENTION]
    split, small = _split_by_rank(p for name, p in named if name.split(".")[0] not in TP_WHOLE_ATTENTION)
    return split, small + _numel(whole)


def _block_counts(block: nn.Module) -> BlockCounts:
    attention_big, attention_small = _attention_split(block.attention)
    expert_mods = expert_modules(block.ffn)
    expert_ids = {id(p) for m in expert_mods for p in m.parameters(recurse=False)}
    ffn_params = list(block.ffn.parameters())
    experts = _numel(p for p in ffn_params if id(p) in expert_ids)
    if expert_mods:
        ffn_dense, ffn_shared = 0, _numel(ffn_params) - experts
    else:
        ffn_dense, ffn_small = _split_by_rank(ffn_params)
        ffn_shared = ffn_small
    inner = {id(p) for p in block.attention.parameters()} | {id(p) for p in ffn_params}
    norms = _numel(p for p in block.parameters() if id(p) not in inner)
    return BlockCounts(attention_big, attention_small, ffn_dense, ffn_shared, experts, norms)


def count_model(model: nn.Module) -> ParamCounts:
    """Counts of a built model (any device; meta costs nothing)."""
    embedding = _numel(p for m in model.modules() if isinstance(m, nn.Embedding)
                       for p in m.parameters(recurse=False))
    embedding_ids = {id(p) for m in model.modules() if isinstance(m, nn.Embedding)
                     for p in m.parameters(recurse=False)}
    head_weight = model.output.weight
    head = 0 if id(head_weight) in embedding_ids else head_weight.numel()
    blocks = tuple(_block_counts(b) for b in model.blocks)
    total = _numel(model.parameters())
    other = total - embedding - head - sum(b.total for b in blocks)
    return ParamCounts(embedding=embedding, head=head, other=other, blocks=blocks,
                       buffers=_numel(model.buffers()), active_matmul=active_matmul_params(model),
                       head_matmul=head, source="model")


# ------------------------------------------------------------------------- from the config
ROUTING_BUFFERS_PER_EXPERT = 3  # selection bias, last load, load since the last bias update

def _swiglu(d: int, hidden: int) -> int:
    return 3 * d * hidden


def _attention_counts(cfg: ModelConfig) -> tuple[int, int, int]:
    """(weights tp splits, parameters tp keeps whole, RoPE table elements) of one attention layer."""
    d, h = cfg.d_model, cfg.n_heads
    if cfg.attention == "gqa":
        big = d * h * cfg.head_dim + 2 * d * cfg.n_kv_heads * cfg.head_dim + h * cfg.head_dim * d
        return big, 0, cfg.max_seq_len * cfg.head_dim
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    if cfg.q_lora_rank:  # wq_a and the q latent norm stay whole under tp, wq_b is split
        q_big, q_small = cfg.q_lora_rank * h * qk, d * cfg.q_lora_rank + cfg.q_lora_rank
    else:
        q_big, q_small = d * h * qk, 0
    kv_big = cfg.kv_lora_rank * h * (cfg.qk_nope_head_dim + cfg.v_head_dim)  # wkv_b
    kv_small = d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank  # wkv_a, kv norm
    out = h * cfg.v_head_dim * d
    return q_big + kv_big + out, q_small + kv_small, cfg.max_seq_len * cfg.qk_rope_head_dim


def _analytic_block(cfg: ModelConfig, layer: int) -> BlockCounts:
    attention, attention_small, _ = _attention_counts(cfg)
    norms = 2 * cfg.d_model
    if not cfg.is_moe_layer(layer):
        return BlockCounts(attention, attention_small, ffn_dense=_swiglu(cfg.d_model, cfg.ffn_dim),
                           norms=norms)
    router = cfg.n_routed_experts * cfg.d_model
    shared = _swiglu(cfg.d_model, cfg.n_shared_experts * cfg.moe_ffn_dim) if cfg.n_shared_experts else 0
    experts = cfg.n_routed_experts * _swiglu(cfg.d_model, cfg.moe_ffn_dim)
    return BlockCounts(attention, attention_small, ffn_shared=router + shared, experts=experts,
                       norms=norms)


def analytic_counts(cfg: ModelConfig) -> ParamCounts:
    """The counts of `build_model(cfg)` computed from the config alone (DeepSeek-V2 layout for
    MLA: q down/up projections with a latent norm, joint KV down projection carrying the RoPE
    key, KV up projection, output; MoE: router, shared experts as one wide SwiGLU, routed
    SwiGLU experts)."""
    blocks = tuple(_analytic_block(cfg, i) for i in range(cfg.n_layers))
    embedding = cfg.vocab_size * cfg.d_model
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model
    top_k_share = cfg.moe_top_k / cfg.n_routed_experts if cfg.is_moe else 1.0
    latents = 0  # MLA's down-projections: matmul weights that tp keeps whole
    if cfg.attention == "mla":
        latents = cfg.d_model * ((cfg.q_lora_rank or 0) + cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    active = (sum(b.attention + latents + b.ffn_dense + b.ffn_shared + b.experts * top_k_share
                  for b in blocks) + head)
    rope = _attention_counts(cfg)[2]
    moe_layers = sum(b.experts > 0 for b in blocks)
    routing_state = ROUTING_BUFFERS_PER_EXPERT * cfg.n_routed_experts * moe_layers
    return ParamCounts(embedding=embedding, head=head, other=cfg.d_model, blocks=blocks,
                       buffers=cfg.n_layers * rope + routing_state, active_matmul=float(active),
                       head_matmul=head, source="analytic")


# ------------------------------------------------------------------------- entry point
def _family_builder_missing(err: ModuleNotFoundError) -> bool:
    return (err.name or "").endswith("models.deepseek")


_CACHE: dict[tuple, ParamCounts] = {}


def _build_and_count(cfg: ModelConfig) -> ParamCounts:
    from ..models import build_model

    try:
        with torch.device("meta"):
            model = build_model(cfg)
    except ModuleNotFoundError as err:
        if not _family_builder_missing(err):
            raise
        return analytic_counts(cfg)
    return count_model(model)


def parameter_counts(cfg: ModelConfig) -> ParamCounts:
    """Counts of the model `cfg` describes, from the real builder on the meta device when the
    family's builder is importable, else from `analytic_counts`. Cached per config."""
    key = tuple(vars(cfg).values())
    if key not in _CACHE:
        _CACHE[key] = _build_and_count(cfg)
    return _CACHE[key]


__all__ = ["BlockCounts", "ParamCounts", "ModelSummary", "parameter_counts", "count_model",
           "analytic_counts"]
