"""Rotary position embeddings (RoPE) and the context-extension scalings of published checkpoints.

Published models change RoPE in two ways, both at every position (not only beyond the
pre-training length):
- `llama3` (Llama 3.1 and later) divides the low frequencies by `factor` and blends the middle
  band smoothly between scaled and unscaled;
- `yarn` (DeepSeek-V2/V3, arXiv:2309.00071) blends interpolated and extrapolated frequencies by a
  linear ramp between the `beta_fast`/`beta_slow` rotation counts, multiplies cos/sin by an
  attention factor, and DeepSeek's MLA also multiplies its softmax scale by
  mscale(factor, mscale_all_dim)^2.
The formulas follow transformers' `modeling_rope_utils` (the reference every published config is
read by), computed here in float64 so that the tables are exact to the model's dtype.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .rope_scaling import SCALINGS, RopeScaling  # noqa: F401 - re-exported

def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction 0.1 * mscale * ln(factor) + 1 (1 when not extending)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _llama3(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    low_wavelen = s.original_max_seq_len / s.low_freq_factor
    high_wavelen = s.original_max_seq_len / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_seq_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


def _yarn(dim: int, theta: float, s: RopeScaling) -> torch.Tensor:
    def correction_dim(rotations: float) -> float:
        return dim * math.log(s.original_max_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as the reference: avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    interpolation = extrapolation / s.factor
    keep = 1 - ramp  # 1: keep the original (high) frequency, 0: interpolate fully
    return interpolation * (1 - keep) + extrapolation * keep


def inverse_frequencies(dim: int, theta: float, scaling: RopeScaling = RopeScaling()) -> torch.Tensor:
    """(dim/2,) float64 angular frequencies of the rotary pairs under `scaling`."""
    if scaling.kind == "yarn":
        return _yarn(dim, theta, scaling)
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    return _llama3(inv_freq, scaling) if scaling.kind == "llama3" else inv_freq


def rotation_scale(scaling: RopeScaling) -> float:
    """The factor YaRN multiplies cos and sin by (1 for other kinds)."""
    if scaling.kind != "yarn":
        return 1.0
    if scaling.attention_factor is not None:
        return scaling.attention_factor
    if scaling.mscale and scaling.mscale_all_dim:
        return yarn_mscale(scaling.factor, scaling.mscale) / yarn_mscale(scaling.factor, scaling.mscale_all_dim)
    return yarn_mscale(scaling.factor)


def softmax_scale_factor(scaling: RopeScaling) -> float:
    """DeepSeek MLA's extra softmax-scale factor mscale(factor, mscale_all_dim)^2 under scaling."""
    if scaling.kind == "none" or not scaling.mscale_all_dim:
        return 1.0
    return yarn_mscale(scaling.factor, scaling.mscale_all_dim) ** 2


class RotaryEmbedding(nn.Module):
    """RoPE tables indexed by *global* token positions, so a context-parallel shard rotates its
    tokens exactly as the unsplit sequence would. Pairs are interleaved: (x0, x1), (x2, x3)..."""

    def __init__(self, dim: int, max_seq_len: int, theta: float = 10000.0,
                 scaling: RopeScaling = RopeScaling()) -> None:
        super().__init__()
        self.dim = dim
        self.max_seq_len = max_seq_len
        self.theta = theta
        self.scaling = scaling
        self.register_buffer("cos", torch.empty(max_seq_len, dim // 2), persistent=False)
        self.register_buffer("sin", torch.empty(max_seq_len, dim // 2), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.cos.is_meta:
            return
        inv_freq = inverse_frequencies(self.dim, self.theta, self.scaling)
        freqs = torch.outer(torch.arange(self.max_seq_len, dtype=torch.float64), inv_freq)
        scale = rotation_scale(self.scaling)
        self.cos.copy_((freqs.cos() * scale).to(self.cos.dtype))
        self.sin.copy_((freqs.sin() * scale).to(self.sin.dtype))

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


__all__ = ["RopeScaling", "RotaryEmbedding", "SCALINGS", "inverse_frequencies", "rotation_scale",
           "softmax_scale_factor", "yarn_mscale"]
