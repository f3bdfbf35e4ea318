"""torch.distributed.pipelining's stages and schedules, and every difference between the torch
versions the package supports (2.11 to 2.13), in this one module.

- `return_outputs` (2.9+ `step`): False, so the last stage keeps no copy of every micro-batch's
  output (the loss is all a training step needs); older versions always keep them.
- `eval` (forward only, no backward): used where the schedule has it (taking `target` and
  `losses`), else `step` under no_grad.
- 2.12 lets stage boundaries carry DTensors and 2.13 forwards `loss_kwargs`; stages here send
  plain activations and the loss reads its denominator from its own object, so neither is needed.
- FSDP2 stages (the stage module is an FSDPModule): each supported version runs every
  micro-batch's backward without gradient sync or resharding and reduces once, after the last
  micro-batch, in `PipelineStage.perform_reduce_grad` (the schedules' REDUCE_GRAD action, torch
  2.10+); `AccumulatingStage` lets that reduction wait for the last batch of an accumulation window.

Every branch asks the installed torch what it has (a parameter in a signature, a method), never
its version string: `step` and `eval` take `**kwargs` for the model, so a keyword they do not
name would reach the model instead of failing.
"""
from __future__ import annotations

import inspect
from contextlib import nullcontext
from typing import Callable, Optional

import torch
from torch import nn
from torch.distributed import ProcessGroup
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B
from torch.distributed.pipelining.schedules import ScheduleInterleavedZeroBubble, ScheduleZBVZeroBubble

from ..pipeline_plan import MULTI_STAGE_SCHEDULES

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved_1f1b": ScheduleInterleaved1F1B,
             "interleaved_zb": ScheduleInterleavedZeroBubble, "zbv": ScheduleZBVZeroBubble}


class AccumulatingStage(PipelineStage):
    """A PipelineStage whose data-parallel gradient reduction at the end of a schedule step runs
    only when `reduce_now()` says so. torch reduces an FSDP2 stage's gradients after every step
    (`perform_reduce_grad`); inside an accumulation window whose policy defers every reduction
    ("defer_all"), the unsharded gradients instead keep accumulating (FSDP2 holds them while
    gradient sync is off, as torch's backward left it) and the window's last step reduces them
    all. torch has no switch for this (an open proposal adds one), hence the override."""

    def __init__(self, *args, reduce_now: Callable[[], bool], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.reduce_now = reduce_now

    def perform_reduce_grad(self, grad_scale_factor):
        # the schedules never scale (scale_grads=False), so skipping drops no scaling either
        if self.reduce_now():
            super().perform_reduce_grad(grad_scale_factor)


def build_stage(module: nn.Module, index: int, stages: int, device: torch.device, group: ProcessGroup,
                inputs: torch.Tensor, outputs: torch.Tensor,
                reduce_now: Callable[[], bool] = lambda: True) -> PipelineStage:
    """A stage with its micro-batch's input and output given (meta tensors): every torch version
    then skips shape inference, whose protocol changed between them (2.13 votes on static or
    dynamic inference over p2p). `reduce_now`: see AccumulatingStage."""
    return AccumulatingStage(module, index, stages, device, input_args=(inputs,), output_args=(outputs,),
                             group=group, reduce_now=reduce_now)


def build_schedule(name: str, stages: list[PipelineStage], microbatches: int,
                   loss_fn: Optional[Callable]):
    """The schedule `name` over this rank's stages. Gradients are not scaled by the micro-batch
    count (`scale_grads=False`): the loss is already divided by the batch's token count."""
    cls = SCHEDULES[name]
    if not _accepts(cls.__init__, "scale_grads"):
        from ..errors import UserError

        raise UserError(f"this torch's {cls.__name__} has no scale_grads argument: install a "
                        "torch this package supports (2.11 to 2.13) for pipeline parallelism")
    target = stages if name in MULTI_STAGE_SCHEDULES else stages[0]
    return cls(target, microbatches, loss_fn=loss_fn, scale_grads=False)


def _accepts(fn: Callable, name: str) -> bool:
    """Whether `fn` names the keyword `name` (not just `**kwargs`)."""
    return name in inspect.signature(fn).parameters


def run_schedule(schedule, args: tuple, target: Optional[torch.Tensor], losses: list,
                 train: bool) -> None:
    """One batch through the schedule: forward and backward of every micro-batch (`train`), or
    the forward only."""
    kwargs = {"target": target, "losses": losses}
    if not train and hasattr(schedule, "eval") and all(_accepts(schedule.eval, k) for k in kwargs):
        schedule.eval(*args, **kwargs)
        return
    if _accepts(schedule.step, "return_outputs"):
        kwargs["return_outputs"] = False
    with nullcontext() if train or torch.is_inference_mode_enabled() else torch.no_grad():
        schedule.step(*args, **kwargs)


__all__ = ["SCHEDULES", "AccumulatingStage", "build_stage", "build_schedule", "run_schedule"]
