"""Building blocks shared by every model family: norms, rotary embeddings, MLPs, the local kernel.

The attention kernel is a separate module held in `attention.kernel` so that context
parallelism can replace it without the model knowing; `LocalAttentionKernel` is the default.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .document_attention import document_attention


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


class RotaryEmbedding(nn.Module):
    """RoPE tables indexed by *global* token positions, so a context-parallel shard rotates its
    tokens exactly as the unsplit sequence would."""

    def __init__(self, dim: int, max_seq_len: int, theta: float = 10000.0) -> None:
        super().__init__()
        self.dim = dim
        self.max_seq_len = max_seq_len
        self.theta = theta
        self.register_buffer("cos", torch.empty(max_seq_len, dim // 2), persistent=False)
        self.register_buffer("sin", torch.empty(max_seq_len, dim // 2), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.cos.is_meta:
            return
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.dim, 2, dtype=torch.float64) / self.dim))
        t = torch.arange(self.max_seq_len, dtype=torch.float64)
        freqs = torch.outer(t, inv_freq)
        self.cos.copy_(freqs.cos().to(self.cos.dtype))
        self.sin.copy_(freqs.sin().to(self.sin.dtype))

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate the last dim of x (B, H, S, D) by the angles of `positions`: (S,) shared by the
        batch, or (B, S) per row (packed documents restart at 0)."""
        cos = self.cos[positions].to(x.dtype)
        sin = self.sin[positions].to(x.dtype)
        if positions.dim() == 2:  # (B, S, D/2) -> (B, 1, S, D/2), broadcast over heads
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
        return out.flatten(-2)


class LocalAttentionKernel(nn.Module):
    """Causal attention of a whole, unsplit sequence through SDPA (flash/efficient on GPU).

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
        if k.shape[1] != q.shape[1]:
            rep = q.shape[1] // k.shape[1]
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal,
                                              scale=getattr(self, "scale", None))


class SwiGLU(nn.Module):
    """Gated MLP used by Llama and by DeepSeek's dense layers and experts."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)  # gate
        self.w3 = nn.Linear(dim, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, dim, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


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
