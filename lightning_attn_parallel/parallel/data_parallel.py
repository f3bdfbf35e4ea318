"""Data parallelism, applied last: FSDP2/HSDP (sharded, or cast parameters) or the bucketed
reducer (replicated), and the backward's data-parallel side for the strategy.

It comes after every other parallelism because it must see the final parameters: FSDP2 shards
them (tensor- and expert-parallel DTensors become 2-D), and the reducer lays their gradients into
buckets. Which group reduces a gradient follows from the parameter: dense ones over dp x cp,
experts over edp (scaled by `ParallelPlan.expert_gradient_scale`), and under tp x ep the router
and shared experts over tp as well (parallel/moe_token_split.py).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import nn

from ..hardware import ClusterSpec
from ..mesh import ParallelMeshes
from ..models.protocol import expert_modules, is_expert_parameter
from ..plan import ParallelPlan
from .fully_sharded import GradientFixup, casts_parameters
from .gradient_reducer import GradientReducer, broadcast_parameters
from .master_weights import MasterWeights
from .moe_token_split import token_split_fixup, token_split_parameters


@dataclass
class DataParallelGradients:
    """The data-parallel side of every backward pass, whichever form the plan took: the
    replicated reducer's buckets, or FSDP2 with its accumulation policy and gradient fix-ups."""

    model: nn.Module
    reducer: Optional[GradientReducer]
    fully_sharded: bool
    accumulation: str
    fixups: tuple = ()  # FSDP2 gradients to finish once reduced (experts' scale, tp x ep token split)
    synced: bool = True  # False while micro-batches only accumulate
    masters: Optional[MasterWeights] = None  # replicated master weights (parallel/master_weights.py)
    param_dtype: Optional[torch.dtype] = None  # what FSDP2 computes in (None: the parameters' dtype)

    def before_backward(self) -> None:
        if self.reducer is not None:
            self.reducer.prepare_for_backward()

    def after_backward(self) -> None:
        if self.masters is not None and self.synced:
            self.masters.flush()  # gradients still held by the compute copies
        if self.reducer is not None:
            self.reducer.finish()
        if self.synced:  # reduced (final) on this micro-batch: finish them once
            for fixup in self.fixups:
                fixup.apply()

    @contextmanager
    def accumulating(self) -> Iterator[None]:
        """Micro-batches that only accumulate send nothing (the replicated reducer), or what the
        plan's accumulation policy says (FSDP2/HSDP; see fully_sharded.set_gradient_sync).
        Nests (a pipeline's micro-batches inside Lightning's accumulation): the state before it
        comes back."""
        previous = self.synced
        self._sync(False)
        try:
            yield
        finally:
            self._sync(previous)

    def _sync(self, enabled: bool) -> None:
        self.synced = enabled
        if self.masters is not None:
            self.masters.synced = enabled
        if self.reducer is not None:
            self.reducer.sync_enabled = enabled
        if self.fully_sharded:
            from .fully_sharded import set_gradient_sync

            set_gradient_sync(self.model, enabled, self.accumulation)


def apply_data_parallel(module: nn.Module, transformer: Optional[nn.Module], plan: ParallelPlan,
                        meshes: ParallelMeshes, precision: str, cluster: ClusterSpec,
                        materialize: Callable[[], None],
                        compute_dtype: Optional[torch.dtype] = None,
                        stages: Sequence[nn.Module] = ()) -> DataParallelGradients:
    """FSDP2 (sharded plans, or "-mixed" with mixed_precision="cast_params") or the bucketed
    reducer; `materialize` allocates a meta-built model once its parameters have their final
    layout (FSDP2: after sharding, so a rank allocates only its shards).

    `compute_dtype` (master weights: the parameters are the masters, computed with in this
    dtype): FSDP2 casts sharded parameters itself; replicated ones get compute copies
    (MasterWeights) whose gradients reach the reducer's buckets in the masters' dtype.

    `stages` (pipeline parallelism): this rank's stage modules, each made an FSDP2 root over its
    blocks (the embedding, final norm and head go with the first and last stage's root), since
    the schedule calls them and never the transformer. They stay gathered after the forward:
    torch's PipelineStage gathers them once per step and reshards after the step's reduction."""
    if not casts_parameters(plan, precision):
        materialize()
        reducer = _build_reducer(module, transformer, plan, meshes, cluster)
        masters = None
        if compute_dtype is not None:
            masters = MasterWeights(module, compute_dtype, grad_ready=reducer.grad_ready,
                                    accumulate=plan.accumulate_grads_in)
        return DataParallelGradients(module, reducer, False, plan.accumulation, masters=masters)
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from .fully_sharded import apply_fully_sharded, mixed_precision_for

    policy = (mixed_precision_for(precision) if compute_dtype is None else
              MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=next(module.parameters()).dtype))
    if not plan.sharded and not any(p.is_meta for p in module.parameters()):
        # replicas must start equal: nothing else would make them so (a meta model is filled
        # from the same folder on every rank); experts are equal within their edp group
        groups = _parameters_by_group(module, transformer, plan, meshes)
        for params, group in groups:
            broadcast_parameters(params, group)
    fixups = shard_experts(transformer, meshes, policy) if plan.ep > 1 else []
    mesh = sharding_mesh(meshes)
    # Over a shard dimension of one rank (cast_params on replicated parameters) resharding
    # after the forward frees only the bf16 copy, and the backward would cast the fp32
    # masters again: keep the copy (2 bytes a parameter) and cast once a step.
    for root in stages or [transformer if transformer is not None else module]:
        apply_fully_sharded(root, mesh, policy.param_dtype, policy.reduce_dtype,
                            reshard_after_forward=mesh.size(mesh.ndim - 1) > 1 and not stages)
    if plan.ep > 1 and plan.tp > 1:
        fixups.append(token_split_fixup(transformer, meshes.group("tp")))
    materialize()
    return DataParallelGradients(module, None, True, plan.accumulation, tuple(fixups),
                                 param_dtype=policy.param_dtype)


def sharding_mesh(meshes: ParallelMeshes):
    """The FSDP2 mesh: dp_shard (x cp, since context-parallel ranks hold different tokens and
    their gradients must be reduced too), with dp_replicate in front for HSDP."""
    plan = meshes.plan
    shard_dim = "dp_shard"
    if plan.cp > 1:
        meshes.dense["dp_shard", "cp"]._flatten("dp_shard_cp")  # DeviceMesh has no public flatten
        shard_dim = "dp_shard_cp"
    if plan.dp_replicate > 1:
        return meshes.dense["dp_replicate", shard_dim]
    return meshes.dense[shard_dim]


def shard_experts(transformer: nn.Module, meshes: ParallelMeshes, policy) -> list[GradientFixup]:
    """FSDP2 for each MoE layer's experts over the expert-data-parallel ranks (edp), before the
    blocks are sharded over the dense mesh (which then leaves the experts alone).

    The experts are already DTensors `Shard(0)` over ep; FSDP2 shards them further along dim 1
    (`Shard(1)` over edp), so each keeps a regular 2-D placement on the (edp, ep) mesh that DCP
    and `full_tensor()` read directly, with no strided sharding of dim 0.

    FSDP2 averages over edp; the expert rule (`ParallelPlan.expert_gradient_scale`) is finished
    by a GradientFixup scaling by edp x that. One mechanism for every edp: FSDP2's own custom
    divide factor needs ReduceOp.PREMUL_SUM, which gloo lacks, and over a one-rank group (edp = 1)
    torch applies it inconsistently across versions (twice, in float64, on 2.13).
    """
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    plan = meshes.plan
    edp = meshes.expert["edp"]
    scaled: list[nn.Parameter] = []
    for experts in expert_modules(transformer):
        # as the dense units: over one edp rank nothing is freed by resharding, only re-cast
        fully_shard(experts, mesh=edp, mp_policy=policy, reshard_after_forward=edp.size() > 1,
                    shard_placement_fn=lambda param: Shard(1))
        scaled += list(experts.parameters())
    return [GradientFixup(scaled, scale=plan.edp * plan.expert_gradient_scale)] if scaled else []


def _parameters_by_group(module: nn.Module, transformer: Optional[nn.Module], plan: ParallelPlan,
                         meshes: ParallelMeshes) -> list:
    """Trainable parameters with the reduction group of their gradients: dense over dp x cp,
    experts over edp, and (under tp x ep) the router and shared experts over every rank."""
    split_ids = ({id(p) for p in token_split_parameters(transformer)}
                 if plan.ep > 1 and plan.tp > 1 else set())
    dense, experts, split = [], [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if plan.ep > 1 and is_expert_parameter(module, name):
            experts.append(p)
        else:
            (split if id(p) in split_ids else dense).append(p)
    groups = [(dense, meshes.dense_grads)]
    if experts:
        groups.append((experts, meshes.expert_grads))
    if split:
        groups.append((split, meshes.token_split_grads))
    return groups


def _build_reducer(module: nn.Module, transformer: Optional[nn.Module], plan: ParallelPlan,
                   meshes: ParallelMeshes, cluster: ClusterSpec) -> GradientReducer:
    groups = _parameters_by_group(module, transformer, plan, meshes)
    for params, group in groups:
        broadcast_parameters(params, group)
    return GradientReducer(groups, bucket_mb=plan.bucket_mb, hierarchical=plan.hierarchical,
                           cluster=cluster)


__all__ = ["DataParallelGradients", "apply_data_parallel", "sharding_mesh", "shard_experts"]
