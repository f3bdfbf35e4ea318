"""One GEMM for the projections that read the same input: q|k|v, gate|up, MLA's down projections.

Why concatenate at each forward instead of storing one fused weight: the parameters stay the
model's own (`wq`, `wk`, `wv`, `w1`, `w3`), so state dicts, DCP checkpoints, Hugging Face load and
export, tensor parallelism's column shards and FSDP2's shards are the same with or without
fusion. The concatenation copies the weights once per forward (about 10 MB a layer for a 1B
Llama, a few microseconds), and its backward hands each parameter its slice of the fused
gradient. The one GEMM has N = the sum of the widths, which keeps the small K and V projections
of grouped-query attention (N = 256 at 4 KV heads) off the GEMM's inefficient narrow shapes.

Fusion applies where the weights are plain tensors of layers of one class without bias, and that
class has a fused GEMM here: `nn.Linear` (F.linear over the concatenation), and whatever registers one
(`register_fused_gemm`; fp8 training registers torchao's Float8Linear, whose fused GEMM casts the
input once for the whole group). Anything else (tensor-parallel DTensors, a layer with hooks of
its own, a class without a fused GEMM) runs each projection through its own module, exactly as
without fusion.

Compiled, a plain group's GEMM runs under a selective checkpoint that recomputes only the
concatenation: otherwise the partitioner keeps each group's concatenated weight for the backward
(56.6 MB a block on the 1B Llama, counted by benchmarks/fused_projection_graphs.py) beside the
parameters it copies. In eager the GEMM keeps it: a checkpoint there costs the host more per
call than the copy is worth.

`projection_groups` is where each module says which of its projections share an input, so that
a parallelism choosing per layer (fp8's filter) can judge a group by the GEMM it becomes.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts


# (input, the group's weights, its first layer) -> the outputs side by side: how a class runs a group
FusedGemm = Callable[[torch.Tensor, Sequence[torch.Tensor], nn.Module], torch.Tensor]


def _recompute_concatenations(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Selective checkpoint policy: redo the concatenation in the backward, keep the rest."""
    return CheckpointPolicy.PREFER_RECOMPUTE if op is torch.ops.aten.cat.default else CheckpointPolicy.MUST_SAVE


def _linear_over_concatenation(x: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
    return F.linear(x, torch.cat(weights))


def _plain_fused_gemm(x: torch.Tensor, weights: Sequence[torch.Tensor], _first: nn.Module) -> torch.Tensor:
    """nn.Linear's fused GEMM: under compile, the concatenation is recomputed, not kept."""
    if not (torch.compiler.is_compiling() and torch.is_grad_enabled()):
        return _linear_over_concatenation(x, *weights)
    return checkpoint(_linear_over_concatenation, x, *weights, use_reentrant=False,
                      context_fn=partial(create_selective_checkpoint_contexts, _recompute_concatenations))


_FUSED_GEMMS: dict[type, FusedGemm] = {nn.Linear: _plain_fused_gemm}


def register_fused_gemm(cls: type, gemm: FusedGemm) -> None:
    """Let groups of `cls` layers fuse: `gemm(x, weights, first_layer)` must compute, side by side
    on the last dimension, what each layer's own forward computes. Layers of one group must also
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
    out = _FUSED_GEMMS[type(linears[0])](x, weights, linears[0])
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
