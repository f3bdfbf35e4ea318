"""Expert parallelism: each rank of an EP group keeps E/ep routed experts and tokens travel to them.

A forward through an MoE layer then runs: sort this rank's (token, slot) pairs by expert, which
also groups them by the rank that owns the expert; exchange per-expert counts (one small
all-to-all); exchange the token rows (a variable-split all-to-all); regroup the received rows by
local expert and run them; send the results back by the inverse exchange; undo the sort and
combine with the router weights. Both token exchanges are autograd Functions whose backward is
the opposite exchange, so gradients are exact. Everything else (router, shared experts,
attention) stays replicated and is untouched.

The experts' placement lives in their tensors (ExpertParallel makes them DTensors), so nothing
else in the package needs to know which experts a rank holds.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_module
from torch.distributed.tensor.parallel import ParallelStyle, parallelize_module

from ..models.deepseek import DeepSeekMoE, RoutedExperts, combine, sort_by_expert
from ..plan import divisors
from .collectives import SumOver


def _exchange(rows: torch.Tensor, out_splits: list[int], in_splits: list[int],
              group: dist.ProcessGroup) -> torch.Tensor:
    out = rows.new_empty((sum(out_splits),) + tuple(rows.shape[1:]))
    dist.all_to_all_single(out, rows.contiguous(), out_splits, in_splits, group=group)
    return out


class _RowExchange(torch.autograd.Function):
    """Variable-split all-to-all of rows; its gradient is the same exchange run backwards."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, out_splits: list[int], in_splits: list[int],
                group: dist.ProcessGroup) -> torch.Tensor:
        ctx.splits = (out_splits, in_splits)
        ctx.group = group
        return _exchange(rows, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_splits, in_splits = ctx.splits
        return _exchange(grad, in_splits, out_splits, ctx.group), None, None, None


def all_to_all_rows(rows: torch.Tensor, out_splits: list[int], in_splits: list[int],
                    group: dist.ProcessGroup) -> torch.Tensor:
    """Send rows[in_splits[j] block] to rank j of `group`; receive out_splits[j] rows from j."""
    return _RowExchange.apply(rows, out_splits, in_splits, group)


def expert_major_order(counts_by_source: torch.Tensor) -> torch.Tensor:
    """Permutation that regroups received rows, laid out by (source rank, local expert), into
    (local expert, source rank) order so each local expert's rows are contiguous."""
    n_src, n_local = counts_by_source.shape
    segment = torch.repeat_interleave(torch.arange(n_src * n_local, device=counts_by_source.device),
                                      counts_by_source.reshape(-1))
    key = (segment % n_local) * n_src + segment // n_local
    return torch.argsort(key, stable=True)


class AllToAllDispatcher(nn.Module):
    """Sends each (token, slot) pair to the EP rank owning its expert and brings results back.

    Experts are owned in contiguous blocks: EP rank r holds experts [r*L, (r+1)*L), L = E/ep,
    which is why sorting by global expert id also sorts by destination rank.
    """

    def __init__(self, group: dist.ProcessGroup) -> None:
        super().__init__()
        self.group = group
        self.ep = dist.get_world_size(group)

    def _exchange_counts(self, counts: torch.Tensor, n_local: int) -> tuple[torch.Tensor, list[int], list[int]]:
        """(counts by source (ep, L) for my experts, rows I send per rank, rows I receive per rank)."""
        received = torch.empty_like(counts)
        dist.all_to_all_single(received, counts, group=self.group)
        by_source = received.view(self.ep, n_local)
        send, recv = torch.stack([counts.view(self.ep, n_local).sum(1), by_source.sum(1)]).tolist()
        return by_source, send, recv

    def forward(self, tokens: torch.Tensor, expert_indices: torch.Tensor, expert_weights: torch.Tensor,
                experts: RoutedExperts) -> torch.Tensor:
        order, counts = sort_by_expert(expert_indices, experts.n_experts)
        by_source, send, recv = self._exchange_counts(counts, experts.n_experts // self.ep)
        rows = all_to_all_rows(tokens[order // expert_indices.shape[1]], recv, send, self.group)
        regroup = expert_major_order(by_source)
        local_out = experts(rows[regroup], by_source.sum(0))
        back = torch.empty_like(regroup)
        back[regroup] = torch.arange(regroup.numel(), device=regroup.device)
        out = all_to_all_rows(local_out[back], send, recv, self.group)
        return combine(out, order, expert_weights)


class ExpertParallel(ParallelStyle):
    """Routed experts sharded over a 1-D `ep` mesh: each stacked weight (E, ...) becomes a DTensor
    `Shard(0)`, rank r holding the contiguous block of experts [r*L, (r+1)*L), L = E/ep.

    The placement is then part of the tensor: checkpoints, full state dicts, clipping norms and
    FSDP2 (over the expert-data-parallel ranks) read it like any other DTensor. Each rank keeps
    its block of the weights it already holds (all ranks built the same model), so applying the
    style sends nothing and works on the meta device."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(module, device_mesh, partition_fn=_shard_experts)


def _shard_experts(name: str, module: nn.Module, mesh: DeviceMesh) -> None:
    if not isinstance(module, RoutedExperts):
        return
    ep, rank = mesh.size(), mesh.get_local_rank()
    for param_name, param in list(module.named_parameters(recurse=False)):
        n_local = param.shape[0] // ep
        block = param.detach()[rank * n_local:(rank + 1) * n_local].clone()
        local = DTensor.from_local(block, mesh, [Shard(0)], run_check=False, shape=param.shape,
                                   stride=param.stride())
        module.register_parameter(param_name, nn.Parameter(local, requires_grad=param.requires_grad))
    module.local_view = _local_block


def _local_block(weight: torch.Tensor) -> torch.Tensor:
    """The experts' `local_view` slot under expert parallelism: the block of experts this rank
    holds (differentiable: gradients flow back into the DTensor parameter's local shard)."""
    return weight.to_local() if isinstance(weight, DTensor) else weight


def _check_degree(layers: list[DeepSeekMoE], ep: int) -> None:
    for layer in layers:
        if layer.experts.n_experts % ep:
            n = layer.experts.n_experts
            choices = divisors(n)
            raise ValueError(
                f"expert parallel degree ep={ep} does not divide model.n_routed_experts={n}: "
                f"choose ep from {choices} (plan.ep) or change the expert count")
        if isinstance(layer.experts.w1, DTensor):
            raise ValueError("apply_expert_parallel was already applied to this model: apply it once")


def apply_expert_parallel(model: nn.Module, ep_mesh: Union[dist.ProcessGroup, DeviceMesh],
                          token_split_group: Optional[dist.ProcessGroup] = None) -> nn.Module:
    """Shard every MoE layer's routed experts over `ep_mesh` (ExpertParallel) and swap in the
    all-to-all dispatcher.

    `ep_mesh` is a 1-D DeviceMesh or a process group. Every layer is checked before any is
    changed, so a bad degree leaves the model intact. Expert weights must later have their
    gradients reduced over the expert-data-parallel group (ranks holding the same experts),
    everything else over the dense data-parallel group. `token_split_group`: the tensor-parallel
    group whose ranks hold the same tokens; each then feeds its own slice of them to the MoE
    layers (parallel/moe_token_split.py), so the all-to-all carries every token once.
    """
    if not isinstance(ep_mesh, DeviceMesh):
        ep_mesh = DeviceMesh.from_group(ep_mesh, _device_type(model, ep_mesh))
    layers = [m for m in model.modules() if isinstance(m, DeepSeekMoE)]
    _check_degree(layers, ep_mesh.size())
    if ep_mesh.size() == 1:
        return model
    for layer in layers:
        parallelize_module(layer.experts, ep_mesh, ExpertParallel())
        layer.dispatcher = AllToAllDispatcher(ep_mesh.get_group())
    share_routing_loads(model)
    if token_split_group is not None:
        from .moe_token_split import split_moe_tokens

        split_moe_tokens(model, token_split_group)
    return model


def share_routing_loads(model: nn.Module, group: Optional[dist.ProcessGroup] = None) -> None:
    """Fill every MoE layer's `load_sum` slot with a sum over `group` (default: every rank,
    which all hold a replica of each router), so the bias updates of all replicas agree."""
    for layer in model.modules():
        if isinstance(layer, DeepSeekMoE):
            layer.load_sum = SumOver(group or dist.group.WORLD)


def _device_type(model: nn.Module, group: dist.ProcessGroup) -> str:
    """Device type for the experts' DeviceMesh: the parameters', or the backend's on meta."""
    device = next(model.parameters()).device.type
    if device != "meta":
        return device
    return "cuda" if dist.get_backend(group) == "nccl" else "cpu"


__all__ = ["AllToAllDispatcher", "ExpertParallel", "all_to_all_rows", "apply_expert_parallel",
           "expert_major_order", "share_routing_loads"]
