"""The one alpha-beta cost model of collectives, over the links of a `ClusterSpec`.

The gradient reducer's flat-or-hierarchical choice and the planner's step-time model both cost
communication here. A group is described by its size and how it lies on the nodes: `per_node`
members on each of `nodes` nodes. `efficiency` is the fraction of link bandwidth a collective
reaches (the planner calibrates it; a choice between two forms on the same links can leave it 1).
"""
from __future__ import annotations

from .hardware import ClusterSpec

GB = 1e9
ALL_REDUCE = 2.0  # a ring all-reduce moves 2 (n-1)/n of the buffer per rank, in 2 (n-1) steps
REDUCE_SCATTER = ALL_GATHER = 1.0  # (n-1)/n of the buffer, in n-1 steps


def ring_time(nbytes: float, n: int, factor: float, gbps: float, alpha_s: float,
              efficiency: float = 1.0, steps_per_rank: int = 0) -> float:
    """alpha x steps + bytes x factor x (n-1)/n / bandwidth, for a ring over n ranks.
    `steps_per_rank` defaults to `factor` (rounds of n-1 steps)."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    steps = steps_per_rank or int(factor)
    return steps * (n - 1) * alpha_s + factor * (n - 1) / n * nbytes / (gbps * GB * efficiency)


def flat_time(nbytes: float, size: int, nodes: int, cluster: ClusterSpec, factor: float = ALL_REDUCE,
              efficiency: float = 1.0) -> float:
    """One ring over the whole group: at the speed of its slowest link (the network once it
    spans nodes)."""
    if nodes <= 1:
        return ring_time(nbytes, size, factor, cluster.intra_node_gbps, cluster.intra_node_alpha_s,
                         efficiency)
    return ring_time(nbytes, size, factor, cluster.inter_node_gbps, cluster.inter_node_alpha_s,
                     efficiency)


def hierarchical_time(nbytes: float, per_node: int, nodes: int, cluster: ClusterSpec,
                      factor: float = ALL_REDUCE, efficiency: float = 1.0) -> float:
    """Reduce-scatter inside the node, the collective across nodes on a 1/per_node shard (every
    local rank drives its own NIC), all-gather inside the node (the two intra-node steps only
    for an all-reduce: `factor` 2)."""
    inside = factor * ring_time(nbytes, per_node, 1.0, cluster.intra_node_gbps,
                                cluster.intra_node_alpha_s, efficiency, 1)
    across = ring_time(nbytes / per_node, nodes, factor, cluster.inter_node_gbps,
                       cluster.inter_node_alpha_s, efficiency)
    return inside + across


def hierarchical_is_faster(nbytes: float, per_node: int, nodes: int, cluster: ClusterSpec,
                           factor: float = ALL_REDUCE, efficiency: float = 1.0) -> bool:
    """Whether the hierarchical form beats one flat ring for this group."""
    if nodes <= 1 or per_node <= 1:
        return False
    return (hierarchical_time(nbytes, per_node, nodes, cluster, factor, efficiency)
            < flat_time(nbytes, per_node * nodes, nodes, cluster, factor, efficiency))


def collective_time(nbytes: float, size: int, per_node: int, nodes: int, cluster: ClusterSpec,
                    factor: float = ALL_REDUCE, efficiency: float = 1.0) -> float:
    """The cheaper of the flat and hierarchical forms (as the reducer's "auto" mode picks)."""
    flat = flat_time(nbytes, size, nodes, cluster, factor, efficiency)
    if nodes <= 1 or per_node <= 1:
        return flat
    return min(flat, hierarchical_time(nbytes, per_node, nodes, cluster, factor, efficiency))


def all_to_all_time(nbytes: float, size: int, per_node: int, nodes: int, cluster: ClusterSpec,
                    efficiency: float = 1.0) -> float:
    """An all-to-all where each rank holds `nbytes` spread evenly over the group: the node-local
    share goes over NVLink while the rest crosses the network concurrently."""
    if size <= 1 or nbytes <= 0:
        return 0.0
    inside = nbytes * (per_node - 1) / size / (cluster.intra_node_gbps * GB * efficiency)
    across = nbytes * (size - per_node) / size / (cluster.inter_node_gbps * GB * efficiency)
    alpha = cluster.inter_node_alpha_s if nodes > 1 else cluster.intra_node_alpha_s
    return (size - 1) * alpha + max(inside, across)


__all__ = ["ALL_REDUCE", "REDUCE_SCATTER", "ALL_GATHER", "ring_time", "flat_time", "hierarchical_time",
           "hierarchical_is_faster", "collective_time", "all_to_all_time"]
