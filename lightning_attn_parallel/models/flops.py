"""FLOPs per token by TorchTitan's convention, so MFU figures compare with published ones.

6 x (matmul parameters: embeddings excluded, LM head included, MoE counting only the active
experts) + 6 x layers x heads x seq_len x (qk_dim + v_dim), which is the familiar
12 x layers x heads x head_dim x seq_len when qk_dim == v_dim (MLA has them differ).
"""
from __future__ import annotations

from torch import nn


def active_matmul_params(model: nn.Module) -> float:
    """Matmul weights a token passes through; a module's `active_fraction` scales its own
    parameters (routed experts set it to top_k / n_experts)."""
    seen: set[int] = set()
    total = 0.0
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            seen.update(id(p) for p in module.parameters(recurse=False))
            continue
        fraction = float(getattr(module, "active_fraction", 1.0))
        for param in module.parameters(recurse=False):
            if id(param) in seen or param.ndim < 2:
                continue
            seen.add(id(param))
            total += param.numel() * fraction
    return total


def attention_dims(cfg) -> tuple[int, int]:
    """(qk head dim, v head dim) of one attention head."""
    if cfg.attention == "mla":
        return cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    return cfg.head_dim, cfg.head_dim


def attention_flops_per_token(cfg, seq_len: int) -> float:
    qk, v = attention_dims(cfg)
    return 6.0 * cfg.n_layers * cfg.n_heads * seq_len * (qk + v)


# A pipeline stage's model holds only its own blocks; the whole model's matmul parameters are
# recorded on it under this name before the other stages' blocks are dropped
# (parallel/pipeline_stages.py), so FLOPs per token stay the whole model's.
WHOLE_MODEL_MATMUL_PARAMS = "whole_model_matmul_params"


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token at sequence length `seq_len`, of the whole
    model (also on a pipeline stage, which holds only part of it)."""
    matmul = getattr(model, WHOLE_MODEL_MATMUL_PARAMS, None)
    if matmul is None:
        matmul = active_matmul_params(model)
    return 6.0 * matmul + attention_flops_per_token(model.config, seq_len)
