"""Tensor-parallel attention feeding expert-parallel MoE layers.

Under tensor parallelism every TP rank holds the same tokens after attention. Running the MoE on
all of them would make each TP rank send the same tokens to the experts. Instead each TP rank
takes its own slice of the sequence into the MoE, and the full sequence is gathered back after
it, so the expert all-to-all carries every token once.

Gradients: a token's MoE output is computed on one TP rank only. So the gradient flowing back
into the MoE input is gathered from the ranks' slices, and the gradient of the gathered output
(identical on every TP rank, since what follows is replicated) is simply sliced. The router and
shared-expert weights then see only their slice's tokens, so their gradients must be summed over
the TP ranks too (`token_split_parameters`): the replicated reducer reduces them over every rank
(the mesh's "moe-token-split" group), FSDP2 over the data-parallel ranks, after which
`token_split_fixup` adds the TP slices.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..models.protocol import expert_modules, moe_layers
from .fully_sharded import GradientFixup


def _gather_slices(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=1)


class _TakeSlice(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        return x.chunk(size, dim=1)[rank].contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _gather_slices(grad, ctx.group), None


class _GatherSlices(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _gather_slices(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        size, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        return grad.chunk(size, dim=1)[rank].contiguous(), None


def split_moe_tokens(model: nn.Module, tp_group: dist.ProcessGroup) -> nn.Module:
    """Make every MoE `ffn` of `model.blocks` process only this TP rank's sequence slice."""
    size = dist.get_world_size(tp_group)
    for _, ffn in moe_layers(model):
        original = ffn.forward

        def forward(x: torch.Tensor, _original=original) -> torch.Tensor:
            if x.shape[1] % size:
                raise ValueError(f"sequence length {x.shape[1]} is not divisible by tp={size}, which "
                                 "tensor-parallel attention with expert-parallel MoE layers needs: "
                                 f"use a sequence length that is a multiple of {size}")
            return _GatherSlices.apply(_original(_TakeSlice.apply(x, tp_group)), tp_group)

        ffn.forward = forward
    return model


def token_split_parameters(model: nn.Module) -> list[nn.Parameter]:
    """MoE parameters replicated on every rank but fed only a TP slice of the tokens (router,
    shared experts): their gradients must be summed over TP as well as averaged over dp x cp."""
    params = []
    for _, ffn in moe_layers(model):
        experts = {id(p) for m in expert_modules(ffn) for p in m.parameters()}
        params += [p for p in ffn.parameters() if id(p) not in experts]
    return params


def token_split_fixup(model: nn.Module, tp_group: dist.ProcessGroup) -> GradientFixup:
    """Under FSDP2, which reduces over the data-parallel ranks only: sum the TP slices'
    contributions to the router and shared experts' gradients once they are final."""
    return GradientFixup(token_split_parameters(model), sum_over=tp_group)
