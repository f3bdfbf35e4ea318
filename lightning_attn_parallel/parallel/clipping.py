"""Gradient clipping by the norm of every gradient of the model, whatever splits it over ranks.

`torch.nn.utils.clip_grad_norm_` handles DTensors of one mesh but fails on a mix (tensor x FSDP2
parameters on a 2-D mesh beside FSDP2-only ones, experts on their own (edp, ep) mesh). So the
gradients are grouped by mesh, each group's norm is made global by DTensor (`full_tensor()` of
its norm: a sum of powers, or a max for norm_type=inf, over the mesh), and the groups' norms are
combined the same way. Plain tensors are replicated, so their local norm is already global.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float,
                    norm_type: float = 2.0, stage_group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Scale the gradients of `parameters` so that their total `norm_type` norm (over every
    shard, tensor-parallel and expert-parallel rank) is at most `max_norm`; return that total
    norm as a plain 0-dim tensor, equal on every rank. Collective when any gradient is a DTensor:
    every rank calls it with the same parameters. `stage_group`: the pipeline ranks, each holding
    other parameters (other stages), whose norms are combined as well (collective)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads and stage_group is None:
        return torch.tensor(0.0)
    norm_type = float(norm_type)
    total = total_of([_group_norm(group, norm_type) for group in _group_by_mesh(grads).values()],
                     norm_type, stage_group)
    coef = clip_coefficient(total, max_norm)
    for g in grads:
        local = g.to_local() if isinstance(g, DTensor) else g  # same storage under no_grad
        local.mul_(coef.to(local.device))
    return total


def clip_step_grad_norm_(parameters: Iterable[torch.Tensor], optimizer: torch.optim.Optimizer, max_norm: float,
                         norm_type: float = 2.0, stage_group: Optional[dist.ProcessGroup] = None,
                         master_weights=None) -> torch.Tensor:
    """`clip_grad_norm_` over `optimizer`'s `parameters`, or, while master weights' fused step
    holds their gradients as parts (parallel/master_weights.py), the parts' norm, whose
    coefficient the fused update applies. The Trainer's and Fabric's clipping both call this."""
    from .master_weights import holding

    held = holding(master_weights, optimizer)
    if held is not None:
        return held.clip_(max_norm, norm_type, stage_group=stage_group)
    return clip_grad_norm_(parameters, max_norm, norm_type, stage_group=stage_group)


def total_of(group_norms: list[torch.Tensor], norm_type: float,
             stage_group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """The total norm from the norms of groups of gradients (and of the other pipeline stages'):
    also what master weights' fused step clips by (parallel/master_weights.py `clip_`)."""
    if not group_norms and stage_group is None:
        return torch.tensor(0.0)
    device = group_norms[0].device if group_norms else _collective_device(stage_group)
    total = torch.linalg.vector_norm(torch.stack([n.to(device) for n in group_norms]), norm_type) \
        if group_norms else torch.zeros((), device=device)
    if stage_group is not None:
        total = _across_stages(total, norm_type, stage_group)
    return total


def clip_coefficient(total: torch.Tensor, max_norm: float) -> torch.Tensor:
    """What every gradient is multiplied by so that their total norm is at most `max_norm`."""
    return torch.clamp(max_norm / (total + 1e-6), max=1.0)


def _across_stages(norm: torch.Tensor, norm_type: float, group: dist.ProcessGroup) -> torch.Tensor:
    """The norm over every pipeline stage's gradients from each stage's own: a max for inf,
    else the p-th root of the summed p-th powers."""
    if norm_type == float("inf"):
        dist.all_reduce(norm, op=dist.ReduceOp.MAX, group=group)
        return norm
    powered = norm ** norm_type
    dist.all_reduce(powered, group=group)
    return powered ** (1.0 / norm_type)


def _group_by_mesh(grads: list[torch.Tensor]) -> dict[Optional[DeviceMesh], list[torch.Tensor]]:
    groups: dict[Optional[DeviceMesh], list[torch.Tensor]] = {}
    for g in grads:
        groups.setdefault(g.device_mesh if isinstance(g, DTensor) else None, []).append(g)
    return groups


def _group_norm(grads: list[torch.Tensor], norm_type: float) -> torch.Tensor:
    norm = torch.nn.utils.get_total_norm(grads, norm_type)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    # norms of low-precision gradients are combined in fp32; fp64 ones stay fp64 (rounding them
    # to fp32 would move every clipped gradient by ~1e-8)
    return norm if norm.dtype == torch.float64 else norm.float()


def _collective_device(group) -> torch.device:
    """Where a tensor must be for a collective over `group` (a rank without gradients still joins
    the stages' norm): the current GPU under NCCL, else the CPU."""
    if group is not None and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


__all__ = ["clip_grad_norm_", "clip_step_grad_norm_", "total_of", "clip_coefficient"]
