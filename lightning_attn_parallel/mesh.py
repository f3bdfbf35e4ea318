"""Device meshes and process groups for a ParallelPlan.

Dense layers live on the mesh (dp_replicate, dp_shard, cp, tp), tp innermost so a tensor-parallel
group sits on consecutive ranks of one node. Experts live on (edp, ep), a second view of the same
ranks (Megatron-Core's "MoE parallel folding"), so the expert layout is independent of the
attention layout. Gradient groups and the node/local split for hierarchical all-reduce are made
here too, so that every rank creates every group in the same order.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from .plan import ParallelPlan

DENSE_DIMS = ("dp_replicate", "dp_shard", "cp", "tp")
PIPELINE_DIM = "pp"  # outermost: a stage's ranks are consecutive, stages meet over p2p sends
EXPERT_DIMS = ("edp", "ep")


@dataclass
class ReductionGroup:
    """A process group over which some gradients are reduced, with its node split.

    `scale` multiplies the summed gradient (1/size for a plain average; expert gradients use
    1/(dense data-parallel size) because each expert already sums the tokens of its EP group).
    `intra`/`inter` exist when the group spans nodes: the ranks of this group on my node, and the
    ranks of this group that have my local index on the other nodes.
    """

    name: str
    group: Optional[dist.ProcessGroup]
    ranks: list[int]
    scale: float
    intra: Optional[dist.ProcessGroup] = None
    inter: Optional[dist.ProcessGroup] = None
    intra_size: int = 1
    inter_size: int = 1

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def spans_nodes(self) -> bool:
        return self.inter_size > 1


def groups_along(layout: torch.Tensor, dims: Sequence[int]) -> list[list[int]]:
    """All rank lists obtained by varying `dims` of a rank layout and fixing the others."""
    keep = [d for d in range(layout.ndim) if d not in dims]
    moved = layout.permute(*keep, *dims).reshape(-1, int(torch.tensor([layout.shape[d] for d in dims]).prod()))
    return [row.tolist() for row in moved]


def new_groups(partition: list[list[int]], backend: Optional[str] = None) -> Optional[dist.ProcessGroup]:
    """Create one process group per rank list (collectively, same order on all ranks); return mine."""
    mine = None
    rank = dist.get_rank()
    for ranks in partition:
        group = dist.new_group(ranks, backend=backend)
        if rank in ranks:
            mine = group
    return mine


def node_split(ranks: list[int], ranks_per_node: int) -> tuple[list[list[int]], list[list[int]]]:
    """(per-node lists, per-local-index lists) of a group's ranks; ranks on a node are consecutive."""
    by_node: dict[int, list[int]] = {}
    for r in ranks:
        by_node.setdefault(r // ranks_per_node, []).append(r)
    nodes = list(by_node.values())
    width = len(nodes[0])
    if any(len(n) != width for n in nodes):
        return [ranks], [[r] for r in ranks]  # ragged split: no hierarchy possible
    by_local = [[n[i] for n in nodes] for i in range(width)]
    return nodes, by_local


def make_reduction_groups(partition: list[list[int]], name: str, scale: float,
                          ranks_per_node: int, backend: Optional[str] = None) -> ReductionGroup:
    """Build the groups of a partition and, where a group spans nodes, its intra/inter-node
    subgroups for the hierarchical all-reduce. Every partition has the same shape, so every rank
    takes the same branches and creates the same groups in the same order."""
    rank = dist.get_rank()
    mine = next(r for r in partition if rank in r)
    group = new_groups(partition, backend) if len(mine) > 1 else None
    my_nodes, _ = node_split(mine, ranks_per_node)
    result = ReductionGroup(name=name, group=group, ranks=mine, scale=scale)
    if len(my_nodes) > 1 and len(my_nodes[0]) > 1:
        splits = [node_split(ranks, ranks_per_node) for ranks in partition]
        result.intra = new_groups([n for nodes, _ in splits for n in nodes], backend)
        result.inter = new_groups([l for _, locs in splits for l in locs], backend)
        result.intra_size, result.inter_size = len(my_nodes[0]), len(my_nodes)
    return result


@dataclass
class ParallelMeshes:
    plan: ParallelPlan
    dense: DeviceMesh
    expert: Optional[DeviceMesh]
    dense_grads: ReductionGroup
    expert_grads: Optional[ReductionGroup]
    ranks_per_node: int
    token_split_grads: Optional[ReductionGroup] = None
    extra: dict = field(default_factory=dict)
    # pp > 1: the whole mesh (pp, dp_replicate, dp_shard, cp, tp); `dense` is this stage's slice
    pipeline: Optional[DeviceMesh] = None
    # pp > 1: every rank of this pipeline rank's stages (its sub-world), which hold the same layers
    stage_world: Optional[dist.ProcessGroup] = None

    def coordinate(self, dim: str) -> int:
        return self.dense.get_local_rank(dim)

    @property
    def dp_rank(self) -> int:
        return self.coordinate("dp_replicate") * self.plan.dp_shard + self.coordinate("dp_shard")

    @property
    def dp_size(self) -> int:
        return self.plan.dp

    def group(self, dim: str) -> dist.ProcessGroup:
        if dim == PIPELINE_DIM:
            assert self.pipeline is not None, "this plan has no pipeline stages"
            return self.pipeline.get_group(PIPELINE_DIM)
        if dim in DENSE_DIMS:
            return self.dense.get_group(dim)
        assert self.expert is not None, "this plan has no expert mesh"
        return self.expert.get_group(dim)

    def submesh(self, *dims: str) -> DeviceMesh:
        return self.dense[dims] if len(dims) > 1 else self.dense[dims[0]]


def build_meshes(plan: ParallelPlan, device_type: str, ranks_per_node: int) -> ParallelMeshes:
    """Create every mesh and gradient group of `plan` (a resolved plan) on this world."""
    world = dist.get_world_size()
    assert plan.world_size == world, "resolve the plan against the world size first"
    shape = (plan.dp_replicate, plan.dp_shard, plan.cp, plan.tp)
    pipeline = None
    if plan.pp > 1:
        pipeline = init_device_mesh(device_type, (plan.pp, *shape), mesh_dim_names=(PIPELINE_DIM, *DENSE_DIMS))
        dense = pipeline[DENSE_DIMS]
    else:
        dense = init_device_mesh(device_type, shape, mesh_dim_names=DENSE_DIMS)
    # groups are created collectively over the whole layout (every stage's), pp dimension fixed
    layout, first = (pipeline.mesh, 1) if pipeline is not None else (dense.mesh, 0)
    # Dense gradients are averaged over every rank that holds a different part of the data:
    # dp_replicate x dp_shard x cp (TP ranks hold the same tokens). FSDP handles dp_shard itself,
    # so the replicated reducer only ever sees this group when dp_shard == 1.
    dense_partition = groups_along(layout, (first, first + 1, first + 2))
    dense_grads = make_reduction_groups(dense_partition, "dense", 1.0 / len(dense_partition[0]),
                                        ranks_per_node)
    stage_world = None
    if pipeline is not None:
        stage_world = new_groups(groups_along(layout, tuple(range(1, layout.ndim))))
    return ParallelMeshes(plan=plan, dense=dense, expert=None, dense_grads=dense_grads,
                          expert_grads=None, ranks_per_node=ranks_per_node, pipeline=pipeline,
                          stage_world=stage_world)


def add_expert_mesh(meshes: ParallelMeshes) -> None:
    """Create the expert mesh on demand (every rank reaches this at the same point). Under
    pipeline parallelism it is built inside each pipeline rank's sub-world, (pp, edp, ep) with
    pp outermost as for the dense mesh, so a stage's experts live on that stage's ranks."""
    if meshes.expert is not None:
        return
    plan = meshes.plan
    whole = init_device_mesh(meshes.dense.device_type, (plan.pp, plan.edp, plan.ep),
                             mesh_dim_names=(PIPELINE_DIM, *EXPERT_DIMS)) if plan.pp > 1 else \
        init_device_mesh(meshes.dense.device_type, (plan.edp, plan.ep), mesh_dim_names=EXPERT_DIMS)
    meshes.expert = whole[EXPERT_DIMS] if plan.pp > 1 else whole
    # expert gradients are reduced over edp: the ranks of the same stage holding the same experts
    meshes.expert_grads = make_reduction_groups(groups_along(whole.mesh, (whole.ndim - 2,)), "expert",
                                                plan.expert_gradient_scale, meshes.ranks_per_node)
    if plan.tp > 1:  # router and shared experts fed a TP slice of the tokens (parallel/moe_token_split.py)
        meshes.token_split_grads = make_reduction_groups(groups_along(meshes.dense.mesh, (0, 1, 2, 3)),
                                                         "moe-token-split", 1.0 / plan.gradient_ranks,
                                                         meshes.ranks_per_node)
