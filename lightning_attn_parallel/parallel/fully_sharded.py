"""Sharded data parallelism with FSDP2 (`fully_shard`) and HSDP.

One `fully_shard` unit per block plus one at the root (embedding, final norm, LM head): each
block's parameters are all-gathered just before it runs and freed after, which bounds the
memory of unsharded parameters to about one block. A 2-D data mesh (dp_replicate, dp_shard)
gives HSDP: parameters sharded inside each dp_shard group and replicated across groups, with
gradients reduce-scattered inside the group and all-reduced across groups.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
    register_fsdp_forward_method,
)
from torch.distributed.tensor import DTensor

# The concrete accumulation policies (plan.ACCUMULATION_POLICIES less "auto", which the planner
# resolves to one of these).
ACCUMULATION = ("defer_all", "reduce_scatter_each", "defer_all_reduce")
PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "64-true")


def apply_fully_sharded(model: nn.Module, dp_mesh: DeviceMesh, param_dtype: Optional[torch.dtype] = None,
                        reduce_dtype: Optional[torch.dtype] = None, reshard_after_forward: bool = True,
                        cpu_offload: bool = False) -> nn.Module:
    """Shard `model` over `dp_mesh` (1-D: FSDP; 2-D (dp_replicate, dp_shard): HSDP).

    One unit per item of `model.blocks` plus the root; a model without `blocks` becomes a
    single unit (all its parameters gathered at once). A LightningModule without the model
    protocol is that root: Lightning calls its `training_step` (and the other step methods), not
    `forward`, so those methods are registered to gather the parameters as `forward` would
    (without it, the step runs on the sharded parameters: "mixed torch.Tensor and DTensor").

    Apply last, after tensor parallelism and activation checkpointing. With tensor parallelism,
    `dp_mesh` must be a sub-mesh of the same parent mesh as the TP mesh, so the parameters
    become 2-D DTensors. `param_dtype` is the compute dtype (None keeps the parameters' own,
    e.g. fp32), `reduce_dtype` the gradient-reduction dtype; sharded master weights stay in the
    parameters' dtype. The optimizer must be created after this call (it sees the sharded
    parameters). `mixed_precision_for(precision)` gives both dtypes for a Lightning precision.
    """
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    kwargs = dict(mesh=dp_mesh, mp_policy=policy, offload_policy=offload)
    for block in getattr(model, "blocks", ()):
        fully_shard(block, reshard_after_forward=reshard_after_forward, **kwargs)
    # The root's parameters (embedding, final norm, LM head) stay gathered after the forward:
    # the loss applies `model.output` outside the model's forward, and the backward needs them
    # right away, so freeing them would only add an all-gather.
    fully_shard(model, reshard_after_forward=False, **kwargs)
    for method in STEP_METHODS:
        if callable(getattr(model, method, None)):
            register_fsdp_forward_method(model, method)
    return model


STEP_METHODS = ("training_step", "validation_step", "test_step", "predict_step")


@dataclass
class GradientFixup:
    """Gradients that FSDP2's own reduction leaves unfinished, finished once they are final (after
    the backward of a step's last micro-batch): summed over `sum_over` (the local shards of the
    same rows on each rank of that group), then multiplied by `scale`."""

    params: list[nn.Parameter]
    scale: float = 1.0
    sum_over: Optional[dist.ProcessGroup] = None

    @torch.no_grad()
    def apply(self) -> None:
        # One small all-reduce per parameter: these are routers and shared experts, a few tensors
        # per MoE layer, so bucketing them would not pay for its complexity.
        for param in self.params:
            if param.grad is None:
                continue
            local = param.grad.to_local() if isinstance(param.grad, DTensor) else param.grad
            if self.sum_over is not None:
                dist.all_reduce(local, group=self.sum_over)
            if self.scale != 1.0:
                local.mul_(self.scale)


def set_gradient_sync(model: nn.Module, enabled: bool, accumulation: str = "defer_all") -> None:
    """Gradient reduction for the coming backward: `enabled` on a step's last micro-batch, off on
    the micro-batches that only accumulate, which then send what `accumulation` says:

    - "defer_all": nothing. FSDP2 accumulates unsharded gradients locally (their full memory,
      fp32 under "-mixed") and the last backward reduces everything at once: fewest collectives.
    - "reduce_scatter_each": everything, every micro-batch (reduce-scatter, and under HSDP the
      all-reduce across replicas); only sharded gradients are ever kept.
    - "defer_all_reduce": the reduce-scatter every micro-batch (usually inside a node), while
      HSDP's all-reduce across replicas (usually between nodes) waits for the last one; FSDP2
      keeps the reduce-scattered partial sums, a sharded size. Without replicas it equals
      "reduce_scatter_each".
    """
    if accumulation not in ACCUMULATION:
        raise ValueError(f"accumulation={accumulation!r} is unknown: use one of {', '.join(ACCUMULATION)}")
    reduce_scatter = enabled or accumulation != "defer_all"
    all_reduce = enabled or accumulation == "reduce_scatter_each"
    for module in model.modules():
        if isinstance(module, FSDPModule):
            # set_requires_gradient_sync also turns the all-reduce back on: set it first.
            module.set_requires_gradient_sync(reduce_scatter, recurse=False)
            module.set_requires_all_reduce(all_reduce, recurse=False)


def casts_parameters(plan: Any, precision: str) -> bool:
    """Whether FSDP2 manages the parameters: always when they are sharded, and for a "-mixed"
    precision on replicated parameters when the plan asks for mixed_precision="cast_params".

    The latter is FSDP2 over a shard dimension of size 1 (HSDP across replicas): nothing is
    sharded, but its MixedPrecisionPolicy runs every unit on low-precision copies of the fp32
    master weights, cast once per unit and forward, so the residual stream, norms and
    element-wise work run in bf16 too (autocast keeps them in fp32 and casts at every matmul),
    and gradients are upcast and reduced in fp32. This reuses FSDP2's exact, tested casts and
    hooks rather than a hand-written master-weight optimizer wrapper; gradients are then
    reduced by FSDP2's all-reduce instead of the bucketed, hierarchical reducer.
    """
    return plan.dp_shard > 1 or (precision.endswith("-mixed") and plan.mixed_precision == "cast_params")


def mixed_precision_for(precision: str) -> MixedPrecisionPolicy:
    """FSDP2 policy for a Lightning precision string.

    "-mixed": fp32 sharded master weights, low-precision compute (the all-gathered copy),
    fp32 gradient reduction so summing many ranks loses nothing. "-true": the parameters
    themselves are already in that dtype (Lightning converts the module), so FSDP casts
    nothing and reduces in that dtype too.
    """
    if precision == "bf16-mixed":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if precision == "16-mixed":
        return MixedPrecisionPolicy(param_dtype=torch.float16, reduce_dtype=torch.float32)
    if precision in PRECISIONS:
        return MixedPrecisionPolicy()
    raise ValueError(f"precision={precision!r} is not supported with sharded data parallelism: "
                     f"use one of {', '.join(PRECISIONS)}")


__all__ = ["apply_fully_sharded", "set_gradient_sync", "ACCUMULATION", "casts_parameters", "GradientFixup",
           "mixed_precision_for", "PRECISIONS"]
