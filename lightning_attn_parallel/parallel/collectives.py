"""Flat and hierarchical all-reduce of one flat buffer, and the choice between them (costed by
the package's one model, `collective_cost`).

Hierarchical all-reduce for a group spanning nodes: reduce-scatter inside the node, all-reduce of
that shard across nodes (every local rank drives its own inter-node traffic, so all NICs work at
once), all-gather inside the node. NCCL picks its own algorithms within one communicator but
cannot split a data-parallel group's traffic by link type across two communicators; hence this
file.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..collective_cost import hierarchical_is_faster
from ..hardware import ClusterSpec
from ..mesh import ReductionGroup


def choose_hierarchical(mode: str, nbytes: int, group: ReductionGroup, cluster: ClusterSpec) -> bool:
    """"always"/"never" force the choice; "auto" takes the cheaper of the two by the cost model."""
    if not group.spans_nodes or group.intra is None or mode == "never":
        return False
    if mode == "always":
        return True
    return hierarchical_is_faster(nbytes, group.intra_size, group.inter_size, cluster)


def hierarchical_all_reduce(buffer: torch.Tensor, group: ReductionGroup) -> None:
    """Sum `buffer` over `group` in place through intra-node RS, inter-node AR, intra-node AG."""
    local = group.intra_size
    padded = buffer.numel() + (-buffer.numel()) % local
    flat = F.pad(buffer, (0, padded - buffer.numel())) if padded != buffer.numel() else buffer
    shard = flat.new_empty(padded // local)
    dist.reduce_scatter_tensor(shard, flat, group=group.intra)
    dist.all_reduce(shard, group=group.inter)
    dist.all_gather_into_tensor(flat, shard, group=group.intra)
    if flat is not buffer:
        buffer.copy_(flat[: buffer.numel()])


class SumOver:
    """`SumOver(group)(t)`: the sum of `t` over `group`, as a new tensor (a slot that parallel/
    hands to code that must not know process groups, such as the module's logged loss)."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone()
        dist.all_reduce(total, group=self.group)
        return total
