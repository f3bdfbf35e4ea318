"""Optimizer steps over parameter groups that mix plain tensors and DTensors.

A plan makes some parameters DTensors (tensor, expert or sharded data parallelism) and leaves
others plain, and which ones depends on the plan. Parameter groups follow the model (weight decay
or not), not the plan, so that optimizer states and schedules saved under one plan resume under
any other. But torch's foreach and fused optimizer kernels refuse a list that mixes the two
("got mixed torch.Tensor and DTensor"). DTensor's `implicit_replication` lets them treat the plain
tensors as replicated, which they are; it is entered for the update only, after the closure (the
forward and backward, which must keep failing loudly on a real mix-up) has run.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.experimental import implicit_replication


def mixes_tensor_types(optimizer: torch.optim.Optimizer) -> bool:
    """Whether some parameter group holds both DTensors and plain tensors."""
    return any(len({isinstance(p, DTensor) for p in group["params"]}) > 1 for group in optimizer.param_groups)


def step_over_mixed_tensors(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Make `optimizer.step` run its update under implicit replication when its groups mix
    tensor types (a no-op otherwise); the closure, if any, runs first, as torch's own step would
    run it, under grad mode."""
    if not mixes_tensor_types(optimizer) or getattr(optimizer, "_steps_over_mixed_tensors", False):
        return optimizer
    update = optimizer.step  # the class's step, with its hooks and profiling

    def step(closure: Optional[Callable[[], Any]] = None, **kwargs: Any) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with implicit_replication():
            update(**kwargs)
        return loss

    optimizer.step = step
    optimizer._steps_over_mixed_tensors = True
    return optimizer


def rebind_parameters(optimizer: torch.optim.Optimizer, new_for: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Point `optimizer`'s groups at the parameters that replaced the ones it was built over.

    A plan replaces a module's parameters (FSDP2 and tensor parallelism install DTensor
    Parameters, a meta-built model is allocated anew, master weights leave compute copies in the
    module), so an optimizer created before the plan was applied, or over the compute copies,
    would update tensors nobody computes with. torch has no call for this (FSDP2 asks for the
    optimizer to be built afterwards), hence by hand; only before the first step, while the
    optimizer holds no state."""
    if optimizer.state:
        raise ValueError("the optimizer has already stepped: set it up before its first step")
    for group in optimizer.param_groups:
        group["params"] = [new_for(p) for p in group["params"]]


__all__ = ["mixes_tensor_types", "step_over_mixed_tensors", "rebind_parameters"]
