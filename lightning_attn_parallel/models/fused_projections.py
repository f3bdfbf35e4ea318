"""One GEMM for the projections that read the same input: q|k|v, gate|up, MLA's down projections.

Why concatenate at each forward instead of storing one fused weight: the parameters stay the
model's own (`wq`, `wk`, `wv`, `w1`, `w3`), so state dicts, DCP checkpoints, Hugging Face load and
export, tensor parallelism's column shards and FSDP2's shards are the same with or without
fusion. The concatenation copies the weights once per forward (about 10 MB a layer for a 1B
Llama, a few microseconds), and its backward hands each parameter its slice of the fused
gradient. The one GEMM has N = the sum of the widths, which keeps the small K and V projections
of grouped-query attention (N = 256 at 4 KV heads) off the GEMM's inefficient narrow shapes.

Fusion applies where the weights are plain tensors of plain `nn.Linear` layers without bias;
anything else (tensor-parallel DTensors, torchao's Float8Linear, a layer with hooks of its own)
runs each projection through its own module, exactly as without fusion.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def fusable(linears: Sequence[nn.Module]) -> bool:
    """Whether `linears` can run as one GEMM without changing what any of them computes."""
    for layer in linears:
        # a plain tensor's data (a DTensor's is a DTensor: its layout is tensor parallelism's)
        if type(layer) is not nn.Linear or layer.bias is not None or type(layer.weight.data) is not torch.Tensor:
            return False
        if layer._forward_hooks or layer._forward_pre_hooks:
            return False
    return True


def project(x: torch.Tensor, linears: Sequence[nn.Module], fuse: bool) -> tuple[torch.Tensor, ...]:
    """Each of `linears` applied to `x`: as one GEMM over their concatenated weights when `fuse`
    and they allow it, else one call each."""
    if not fuse or not fusable(linears):
        return tuple(layer(x) for layer in linears)
    weights = [layer.weight for layer in linears]
    out = F.linear(x, torch.cat(weights))
    return out.split([w.shape[0] for w in weights], dim=-1)


def set_fused_projections(model: nn.Module, fuse: bool) -> int:
    """Switch fusion on or off for every module of `model` that has the slot; how many have it."""
    count = 0
    for sub in model.modules():
        if hasattr(sub, "fuse_projections"):
            sub.fuse_projections = fuse
            count += 1
    return count


__all__ = ["fusable", "project", "set_fused_projections"]
