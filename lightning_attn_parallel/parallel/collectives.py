"""Flat and hierarchical all-reduce of one flat buffer, and the cost model that chooses between them.

Hierarchical all-reduce for a group spanning nodes: reduce-scatter inside the node, all-reduce of
that shard across nodes (every local rank drives its own inter-node traffic, so all NICs work at
once), all-gather inside the node. NCCL picks its own algorithms within one communicator but
cannot split a data-parallel group's traffic by link type across two communicators; hence this
file.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..mesh import ReductionGroup


@dataclass(frozen=True)
class LinkModel:
    """Alpha-beta link parameters: latency in seconds, bandwidth in bytes per second."""

    intra_alpha: float = 5e-6
    intra_bw: float = 450e9
    inter_alpha: float = 15e-6
    inter_bw: float = 50e9


def ring_allreduce_time(nbytes: int, ranks: int, alpha: float, bw: float) -> float:
    if ranks <= 1:
        return 0.0
    return 2 * (ranks - 1) * alpha + 2 * (ranks - 1) / ranks * nbytes / bw


def flat_time(nbytes: int, group: ReductionGroup, links: LinkModel) -> float:
    """A ring over the whole group runs at the speed of its slowest (inter-node) link."""
    if not group.spans_nodes:
        return ring_allreduce_time(nbytes, group.size, links.intra_alpha, links.intra_bw)
    return ring_allreduce_time(nbytes, group.size, links.inter_alpha, links.inter_bw)


def hierarchical_time(nbytes: int, group: ReductionGroup, links: LinkModel) -> float:
    local, nodes = group.intra_size, group.inter_size
    # reduce-scatter + all-gather inside the node move (local-1)/local of the buffer each.
    intra = 2 * ((local - 1) * links.intra_alpha + (local - 1) / local * nbytes / links.intra_bw)
    inter = ring_allreduce_time(nbytes // max(local, 1), nodes, links.inter_alpha, links.inter_bw)
    return intra + inter


def choose_hierarchical(mode: str, nbytes: int, group: ReductionGroup, links: LinkModel) -> bool:
    """"always"/"never" force the choice; "auto" takes the cheaper of the two by the cost model."""
    if not group.spans_nodes or group.intra is None or mode == "never":
        return False
    if mode == "always":
        return True
    return hierarchical_time(nbytes, group, links) < flat_time(nbytes, group, links)


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
