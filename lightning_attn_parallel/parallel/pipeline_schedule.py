"""torch.distributed.pipelining's stages and schedules, and every difference between the torch
versions the package supports (2.11 to 2.13), in this one module.

- `return_outputs` (2.9+ `step`): False, so the last stage keeps no copy of every micro-batch's
  output (the loss is all a training step needs); older versions always keep them.
- `eval` (forward only, no backward): used where the schedule has it, else `step` under no_grad.
- 2.12 lets stage boundaries carry DTensors and 2.13 forwards `loss_kwargs`; stages here send
  plain activations and the loss reads its denominator from its own object, so neither is needed.
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


def build_stage(module: nn.Module, index: int, stages: int, device: torch.device, group: ProcessGroup,
                inputs: torch.Tensor, outputs: torch.Tensor) -> PipelineStage:
    """A stage with its micro-batch's input and output given (meta tensors): every torch version
    then skips shape inference, whose protocol changed between them (2.13 votes on static or
    dynamic inference over p2p)."""
    return PipelineStage(module, index, stages, device, input_args=(inputs,), output_args=(outputs,),
                         group=group)


def build_schedule(name: str, stages: list[PipelineStage], microbatches: int,
                   loss_fn: Optional[Callable]):
    """The schedule `name` over this rank's stages. Gradients are not scaled by the micro-batch
    count (`scale_grads=False`): the loss is already divided by the batch's token count."""
    cls = SCHEDULES[name]
    target = stages if name in MULTI_STAGE_SCHEDULES else stages[0]
    return cls(target, microbatches, loss_fn=loss_fn, scale_grads=False)


def run_schedule(schedule, args: tuple, target: Optional[torch.Tensor], losses: list,
                 train: bool) -> None:
    """One batch through the schedule: forward and backward of every micro-batch (`train`), or
    the forward only."""
    kwargs = {"target": target, "losses": losses}
    if "return_outputs" in inspect.signature(schedule.step).parameters:
        kwargs["return_outputs"] = False
    if train:
        schedule.step(*args, **kwargs)
        return
    if hasattr(schedule, "eval"):
        kwargs.pop("return_outputs", None)
        schedule.eval(*args, **kwargs)
        return
    with torch.no_grad() if not torch.is_inference_mode_enabled() else nullcontext():
        schedule.step(*args, **kwargs)


__all__ = ["SCHEDULES", "build_stage", "build_schedule", "run_schedule"]
