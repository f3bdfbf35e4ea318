"""Expert parallelism: each rank of an EP group keeps E/ep routed experts and tokens travel to them.

A forward through an MoE layer then runs: sort this rank's (token, slot) pairs by expert, which
also groups them by the rank that owns the expert; exchange per-expert counts (one small
all-to-all); exchange the token rows (a variable-split all-to-all); regroup the received rows by
local expert and run them; send the results back by the inverse exchange; undo the sort and
combine with the router weights. Both token exchanges are autograd Functions whose backward is
the opposite exchange, so gradients are exact. Everything else (router, shared experts,
attention) stays replicated and is untouched.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from ..models.deepseek import DeepSeekMoE, RoutedExperts, combine, sort_by_expert
from ..models.protocol import expert_modules
from ..plan import divisors
from .collectives import SumOver

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


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
        by_source, send, recv = self._exchange_counts(counts, experts.n_local)
        rows = all_to_all_rows(tokens[order // expert_indices.shape[1]], recv, send, self.group)
        regroup = expert_major_order(by_source)
        local_out = experts(rows[regroup], by_source.sum(0))
        back = torch.empty_like(regroup)
        back[regroup] = torch.arange(regroup.numel(), device=regroup.device)
        out = all_to_all_rows(local_out[back], send, recv, self.group)
        return combine(out, order, expert_weights)


def _keep_local_experts(experts: RoutedExperts, ep_rank: int, ep: int) -> None:
    """Replace the stacked weights by this rank's contiguous block (new Parameters, so an
    optimizer built afterwards sees only the local slice)."""
    n_local = experts.n_experts // ep
    start = ep_rank * n_local
    for name, param in list(experts.named_parameters(recurse=False)):
        local = param.detach()[start:start + n_local].clone()
        setattr(experts, name, nn.Parameter(local, requires_grad=param.requires_grad))


def _check_degree(layers: list[DeepSeekMoE], ep: int) -> None:
    for layer in layers:
        if layer.experts.n_experts % ep:
            n = layer.experts.n_experts
            choices = divisors(n)
            raise ValueError(
                f"expert parallel degree ep={ep} does not divide model.n_routed_experts={n}: "
                f"choose ep from {choices} (plan.ep) or change the expert count")
        if layer.experts.n_local != layer.experts.n_experts:
            raise ValueError("apply_expert_parallel was already applied to this model: apply it once")


def apply_expert_parallel(model: nn.Module, ep_group: Union[dist.ProcessGroup, "DeviceMesh"]) -> nn.Module:
    """Shard every MoE layer's routed experts over `ep_group` and swap in the all-to-all dispatcher.

    `ep_group` is a process group or a 1-D DeviceMesh. Every layer is checked before any is
    changed, so a bad degree leaves the model intact. Expert weights must later have their
    gradients reduced over the expert-data-parallel group (ranks holding the same experts),
    everything else over the dense data-parallel group. Each experts module records which block it
    holds (an ExpertShard), so checkpoints can present the experts with their global shapes.
    """
    from torch.distributed.device_mesh import DeviceMesh

    from .expert_state import ExpertShard, record_expert_shard

    group = ep_group.get_group() if hasattr(ep_group, "get_group") else ep_group
    ep = dist.get_world_size(group)
    layers = [m for m in model.modules() if isinstance(m, DeepSeekMoE)]
    _check_degree(layers, ep)
    if ep == 1:
        return model
    ep_rank = dist.get_rank(group)
    mesh = ep_group if isinstance(ep_group, DeviceMesh) else DeviceMesh.from_group(
        group, _device_type(model, group))
    for layer in layers:
        shard = ExpertShard(group=group, rank=ep_rank, degree=ep, n_experts=layer.experts.n_experts,
                            mesh=mesh)
        _keep_local_experts(layer.experts, ep_rank, ep)
        record_expert_shard(layer.experts, shard)
        layer.dispatcher = AllToAllDispatcher(group)
    share_routing_loads(model)
    return model


def share_routing_loads(model: nn.Module, group: Optional[dist.ProcessGroup] = None) -> None:
    """Fill every MoE layer's `load_sum` slot with a sum over `group` (default: every rank,
    which all hold a replica of each router), so the bias updates of all replicas agree."""
    for layer in model.modules():
        if isinstance(layer, DeepSeekMoE):
            layer.load_sum = SumOver(group or dist.group.WORLD)


def clip_model_grad_norm_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip `model`'s gradients by their global norm. Expert-parallel experts (plain tensors,
    each EP rank holding other experts) count over their EP group; everything else is handled
    by `clip_grad_norm_` (DTensors by mesh, plain tensors as replicated)."""
    from .expert_state import ATTRIBUTE
    from .fully_sharded import clip_grad_norm_

    experts: list[nn.Parameter] = []
    group = None
    for module in expert_modules(model):
        shard = getattr(module, ATTRIBUTE, None)
        if shard is not None:
            experts += list(module.parameters())
            group = shard.group
    split = {id(p) for p in experts}
    others = [p for p in model.parameters() if id(p) not in split]
    return clip_grad_norm_(others, max_norm, split=experts, split_group=group)


def _device_type(model: nn.Module, group: dist.ProcessGroup) -> str:
    """Device type for the experts' DeviceMesh: the parameters', or the backend's on meta."""
    device = next(model.parameters()).device.type
    if device != "meta":
        return device
    return "cuda" if dist.get_backend(group) == "nccl" else "cpu"


__all__ = ["AllToAllDispatcher", "all_to_all_rows", "apply_expert_parallel", "expert_major_order",
           "share_routing_loads", "clip_model_grad_norm_"]
