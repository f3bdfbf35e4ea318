"""One model description for every architecture family in the zoo.

A single dataclass (rather than one per family) lets recipes, the planner and the FLOP counter
read any model the same way; fields that a family does not use keep their defaults.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional

from .rope_scaling import SCALINGS, RopeScaling


@dataclass
class ModelConfig:
    """Shape of a Llama-style or DeepSeek-style decoder."""

    family: str = "llama"  # "llama" (GQA + SwiGLU) or "deepseek" (MLA and/or MoE)
    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # None: same as n_heads (no GQA)
    ffn_dim: int = 344
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    # RoPE scaling of published checkpoints (see models/rope.py): "none", "llama3" (Llama 3.1+)
    # or "yarn" (DeepSeek-V2/V3). Both apply at every position; the names follow config.json's
    # rope_scaling keys. max_seq_len is only the length of the tables.
    rope_scaling: str = RopeScaling.kind
    rope_factor: float = RopeScaling.factor
    rope_original_max_seq_len: int = RopeScaling.original_max_seq_len  # original_max_position_embeddings
    rope_low_freq_factor: float = RopeScaling.low_freq_factor  # llama3
    rope_high_freq_factor: float = RopeScaling.high_freq_factor  # llama3
    rope_beta_fast: float = RopeScaling.beta_fast  # yarn
    rope_beta_slow: float = RopeScaling.beta_slow  # yarn
    rope_mscale: float = RopeScaling.mscale  # yarn; 0: unset
    rope_mscale_all_dim: float = RopeScaling.mscale_all_dim  # yarn; 0: unset (DeepSeek's MLA scales its softmax by it)
    rope_attention_factor: Optional[float] = RopeScaling.attention_factor  # yarn; None: derived from factor and mscales
    rope_truncate: bool = RopeScaling.truncate  # yarn: round the ramp's ends outwards
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02

    # Multi-head latent attention (DeepSeek-V2). attention="mla" switches it on.
    attention: str = "gqa"
    q_lora_rank: Optional[int] = None  # None: q is projected directly (V2-Lite)
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0

    # Mixture of experts (DeepSeekMoE). n_routed_experts=0 means every block is dense.
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    moe_top_k: int = 0
    moe_ffn_dim: int = 0
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    score_func: str = "softmax"  # "softmax" or "sigmoid"
    n_expert_groups: int = 1
    topk_groups: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = False
    aux_loss_coef: float = 0.0
    bias_update_speed: float = 0.0  # > 0: auxiliary-loss-free balancing (DeepSeek-V3)

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def is_moe(self) -> bool:
        return self.n_routed_experts > 0

    def is_moe_layer(self, layer_idx: int) -> bool:
        """DeepSeek's rule: the first k layers are dense, then every moe_layer_freq-th is MoE."""
        return (
            self.is_moe
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    def validate(self) -> None:
        def bad(key: str, value: object, fix: str) -> None:
            raise ValueError(f"model.{key}={value!r} is invalid: {fix}")

        for key in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            if getattr(self, key) <= 0:
                bad(key, getattr(self, key), "it must be a positive integer")
        if self.attention not in ("gqa", "mla"):
            bad("attention", self.attention, "use 'gqa' or 'mla'")
        if self.attention == "gqa":
            if self.d_model % self.n_heads:
                bad("n_heads", self.n_heads, f"it must divide d_model={self.d_model}")
            if self.n_heads % self.n_kv_heads:
                bad("n_kv_heads", self.n_kv_heads, f"it must divide n_heads={self.n_heads}")
            if self.head_dim % 2:
                bad("n_heads", self.n_heads, "d_model/n_heads must be even for RoPE")
        else:
            for key in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                if getattr(self, key) <= 0:
                    bad(key, getattr(self, key), "MLA needs it positive")
            if self.qk_rope_head_dim % 2:
                bad("qk_rope_head_dim", self.qk_rope_head_dim, "it must be even for RoPE")
        self._validate_rope(bad)
        if self.is_moe:
            if not 0 < self.moe_top_k <= self.n_routed_experts:
                bad("moe_top_k", self.moe_top_k,
                    f"it must be between 1 and n_routed_experts={self.n_routed_experts}")
            if self.moe_ffn_dim <= 0:
                bad("moe_ffn_dim", self.moe_ffn_dim, "MoE layers need a positive expert width")
            if self.score_func not in ("softmax", "sigmoid"):
                bad("score_func", self.score_func, "use 'softmax' or 'sigmoid'")
            if self.n_routed_experts % self.n_expert_groups:
                bad("n_expert_groups", self.n_expert_groups,
                    f"it must divide n_routed_experts={self.n_routed_experts}")
            if not 0 < self.topk_groups <= self.n_expert_groups:
                bad("topk_groups", self.topk_groups,
                    f"it must be between 1 and n_expert_groups={self.n_expert_groups}")
            per_group = self.n_routed_experts // self.n_expert_groups
            if self.moe_top_k > self.topk_groups * per_group:
                bad("moe_top_k", self.moe_top_k,
                    f"the {self.topk_groups} chosen groups hold only {self.topk_groups * per_group} experts")

    def _validate_rope(self, bad) -> None:
        if self.rope_theta <= 1:
            bad("rope_theta", self.rope_theta, "it must be greater than 1")
        if self.rope_scaling not in SCALINGS:
            bad("rope_scaling", self.rope_scaling, "use 'none', 'llama3' or 'yarn'")
        if self.rope_scaling == "none":
            return
        if self.rope_factor < 1:
            bad("rope_factor", self.rope_factor, "a context-extension factor is at least 1")
        if self.rope_original_max_seq_len <= 0:
            bad("rope_original_max_seq_len", self.rope_original_max_seq_len,
                f"rope_scaling={self.rope_scaling} needs the pre-training length (positive)")
        if self.rope_scaling == "llama3" and not 0 < self.rope_low_freq_factor < self.rope_high_freq_factor:
            bad("rope_low_freq_factor", self.rope_low_freq_factor,
                f"it must be positive and below rope_high_freq_factor={self.rope_high_freq_factor}")
        if self.rope_scaling == "yarn":
            if not 0 < self.rope_beta_slow < self.rope_beta_fast:
                bad("rope_beta_slow", self.rope_beta_slow,
                    f"it must be positive and below rope_beta_fast={self.rope_beta_fast}")
            for key in ("rope_mscale", "rope_mscale_all_dim"):
                if getattr(self, key) < 0:
                    bad(key, getattr(self, key), "it must be 0 (unset) or positive")
            if self.rope_attention_factor is not None and self.rope_attention_factor <= 0:
                bad("rope_attention_factor", self.rope_attention_factor, "it must be positive or null")

    def shrunk(self, **overrides: object) -> "ModelConfig":
        return replace(self, **overrides)

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}


def smoke_scale(cfg: ModelConfig, d_model: int = 64, n_layers: int = 4, max_experts: int = 8,
                vocab_size: int = 256, max_seq_len: int = 256) -> ModelConfig:
    """Shrink a model while keeping its structure: head ratios, GQA ratio, MLA, MoE routing shape.

    Widths are divided by one factor, depth is capped, and the expert count is cut to
    `max_experts` with top-k and group counts kept proportional, so a 67B or 236B recipe runs a
    few steps on a laptop CPU through the very same code paths.
    """
    heads = max(1, min(cfg.n_heads, 4))
    kv_ratio = max(1, cfg.n_heads // cfg.n_kv_heads)
    kv_heads = max(1, heads // kv_ratio)
    heads = kv_heads * min(kv_ratio, heads)  # keep q heads a multiple of kv heads
    d_model = heads * max(8, (d_model // heads) // 2 * 2)  # heads divide it, even head dim
    width_ratio = d_model / cfg.d_model
    ffn = max(8, int(round(cfg.ffn_dim * width_ratio / 8)) * 8)
    layers = min(cfg.n_layers, n_layers)
    over: dict = dict(vocab_size=vocab_size, d_model=d_model, n_layers=layers, n_heads=heads,
                      n_kv_heads=kv_heads, ffn_dim=ffn, max_seq_len=min(cfg.max_seq_len, max_seq_len))
    if cfg.attention == "mla":
        over.update(q_lora_rank=None if cfg.q_lora_rank is None else 32, kv_lora_rank=16,
                    qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
    if cfg.is_moe:
        experts = min(cfg.n_routed_experts, max_experts)
        groups = max(1, min(cfg.n_expert_groups, experts // 2)) if cfg.n_expert_groups > 1 else 1
        while experts % groups:
            groups -= 1
        topk_groups = max(1, min(cfg.topk_groups, groups))
        per_group = experts // groups
        top_k = max(1, min(cfg.moe_top_k, topk_groups * per_group, experts // 2 or 1))
        over.update(n_routed_experts=experts, moe_top_k=top_k, n_expert_groups=groups,
                    topk_groups=topk_groups,
                    moe_ffn_dim=max(8, int(round(cfg.moe_ffn_dim * width_ratio / 8)) * 8),
                    first_k_dense_replace=min(cfg.first_k_dense_replace, max(0, layers - 2)))
    return replace(cfg, **over)


__all__ = ["ModelConfig", "smoke_scale"]
