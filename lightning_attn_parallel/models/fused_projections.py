"""One GEMM for the projections that read the same input: q|k|v, gate|up, MLA's down projections.

Why concatenate at each forward instead of storing one fused weight: the parameters stay the
model's own (`wq`, `wk`, `wv`, `w1`, `w3`), so state dicts, DCP checkpoints, Hugging Face load and
export, tensor parallelism's column shards and FSDP2's shards are the same with or without
fusion. The concatenation copies the weights once per forward (about 10 MB a layer for a 1B
Llama, a few microseconds), and its backward hands each parameter its slice of the fused
gradient. The one GEMM has N = the sum of the widths, which keeps the small K and V projections
of grouped-query attention (N = 256 at 4 KV heads) off the GEMM's inefficient narrow shapes.

Fusion applies where the weights are plain tensors of layers of one class without bias, and that
class has a fused GEMM here: `nn.Linear` (F.linear), and whatever registers one
(`register_fused_gemm`; fp8 training registers torchao's Float8Linear, whose fused GEMM casts the
input once for the whole group). Anything else (tensor-parallel DTensors, a layer with hooks of
its own, a class without a fused GEMM) runs each projection through its own module, exactly as
without fusion.

`projection_groups` is where each module says which of its projections share an input, so that
a parallelism choosing per layer (fp8's filter) can judge a group by the GEMM it becomes.
"""
from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn


# (input, concatenated weight, the group's first layer) -> output: how a class runs a group
FusedGemm = Callable[[torch.Tensor, torch.Tensor, nn.Module], torch.Tensor]
_FUSED_GEMMS: dict[type, FusedGemm] = {nn.Linear: lambda x, weight, _first: F.linear(x, weight)}


def register_fused_gemm(cls: type, gemm: FusedGemm) -> None:
    """Let groups of `cls` layers fuse: `gemm(x, cat(weights), first_layer)` must compute what
    each layer's own forward computes on its rows of the weight. Layers of one group must also
    agree on `config` (None for plain layers), which the GEMM reads from the first."""
    _FUSED_GEMMS[cls] = gemm


def fusable(linears: Sequence[nn.Module]) -> bool:
    """Whether `linears` can run as one GEMM without changing what any of them computes."""
    cls = type(linears[0])
    if cls not in _FUSED_GEMMS:
        return False
    config = getattr(linears[0], "config", None)
    for layer in linears:
        # a plain tensor's data (a DTensor's is a DTensor: its layout is tensor parallelism's)
        if type(layer) is not cls or layer.bias is not None or type(layer.weight.data) is not torch.Tensor:
            return False
        if layer._forward_hooks or layer._forward_pre_hooks:
            return False
        own = getattr(layer, "config", None)
        if own is not config and own != config:  # one config object is shared as a rule
            return False
    return True


def project(x: torch.Tensor, linears: Sequence[nn.Module], fuse: bool) -> tuple[torch.Tensor, ...]:
    """Each of `linears` applied to `x`: as one GEMM over their concatenated weights when `fuse`
    and they allow it, else one call each."""
    if not fuse or not fusable(linears):
        return tuple(layer(x) for layer in linears)
    weights = [layer.weight for layer in linears]
    out = _FUSED_GEMMS[type(linears[0])](x, torch.cat(weights), linears[0])
    return out.split([w.shape[0] for w in weights], dim=-1)


def projection_groups(model: nn.Module) -> Iterator[tuple[str, ...]]:
    """The qualified names of each group of projections that `project` runs as one GEMM when
    fusion is on: what each module with the slot lists in its `projection_groups` attribute
    (names of its children; a name the module lacks drops out of the group)."""
    for prefix, sub in model.named_modules():
        for group in getattr(sub, "projection_groups", ()):
            names = tuple(f"{prefix}.{n}" if prefix else n for n in group if hasattr(sub, n))
            if len(names) > 1:
                yield names


def set_fused_projections(model: nn.Module, fuse: bool) -> int:
    """Switch fusion on or off for every module of `model` that has the slot; how many have it."""
    count = 0
    for sub in model.modules():
        if hasattr(sub, "fuse_projections"):
            sub.fuse_projections = fuse
            count += 1
    return count


__all__ = ["FusedGemm", "fusable", "project", "projection_groups", "register_fused_gemm", "set_fused_projections"]
