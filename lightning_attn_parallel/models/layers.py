"""Building blocks shared by every model family: norms, MLPs, the local kernel (RoPE: rope.py).

The attention kernel is a separate module held in `attention.kernel` so that context
parallelism can replace it without the model knowing; `LocalAttentionKernel` is the default.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import sdpa_kernel

from .attention_backend import sdpa_backends
from .document_attention import document_attention
from .fused_projections import project


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Llama, DeepSeek); F.rms_norm picks the fused kernel."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class LocalAttentionKernel(nn.Module):
    """Causal attention of a whole, unsplit sequence through SDPA, with the fused backends of
    attention_backend.py (cuDNN first on sm90+, then flash) and native GQA: K/V heads are never
    copied to every query head.

    q: (B, Hq, S, D), k: (B, Hkv, S, D), v: (B, Hkv, S, Dv); Hq a multiple of Hkv (GQA).
    `positions` are unused here: the local sequence is contiguous from its first token.
    With `document_ids` (B, S) the mask is causal within each packed document only
    (models/document_attention.py).
    """

    causal = True

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                positions: Optional[torch.Tensor] = None,
                document_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        if document_ids is not None:
            return document_attention(q, k, v, document_ids, scale=getattr(self, "scale", None))
        backends = sdpa_backends(q.device.type)
        with sdpa_kernel(list(backends), set_priority=True) if backends else nullcontext():
            return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal,
                                                  scale=getattr(self, "scale", None),
                                                  enable_gqa=k.shape[1] != q.shape[1])


class SwiGLU(nn.Module):
    """Gated MLP used by Llama and by DeepSeek's dense layers and experts."""

    projection_groups = (("w1", "w3"),)  # what `fuse_projections` runs as one GEMM

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)  # gate
        self.w3 = nn.Linear(dim, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, dim, bias=False)  # down
        self.fuse_projections = False  # gate|up as one GEMM (models/fused_projections.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = project(x, (self.w1, self.w3), self.fuse_projections)
        return self.w2(F.silu(gate) * up)


def init_linear_weights(module: nn.Module, std: float) -> None:
    """Deterministic init of every sub-module: normal(0, std) for Linear/Embedding weights, the
    module's own `reset_parameters` for the rest (norms, RoPE tables, stacked experts)."""
    for sub in module.modules():
        if isinstance(sub, (nn.Linear, nn.Embedding)):
            nn.init.normal_(sub.weight, mean=0.0, std=std)
            if getattr(sub, "bias", None) is not None:
                nn.init.zeros_(sub.bias)
        elif sub is not module and callable(getattr(sub, "reset_parameters", None)):
            sub.reset_parameters()
