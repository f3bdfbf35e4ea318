"""Pipeline parallelism inside Lightning's training step.

The strategy's training step hands the batch to `PipelineRunner.training_step`, which runs the
plan's schedule over micro-batches: every forward and backward happens inside the schedule, so
the strategy's backward only runs the hooks around it. The loss is the sum of the token losses
of every micro-batch divided by the batch's token count (as without pipelining), computed on the
last stage and shared with every stage for logging and the finite checks. Data parallelism is
reduced once per step: buckets accumulate over the micro-batches and are reduced when the
strategy's backward hook finishes them.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..mesh import PIPELINE_DIM, ParallelMeshes
from ..models.loss import cross_entropy_sum
from ..pipeline_plan import microbatches, num_stages
from ..plan import ParallelPlan, PlanError
from ..step import IGNORE_INDEX, StepBatch
from .data_parallel import DataParallelGradients
from .pipeline_schedule import build_schedule, build_stage, run_schedule
from .pipeline_stages import StageModule


class TokenSumLoss:
    """The last stage's loss of one micro-batch: the sum of its token losses over the batch's
    token count (`denominator`, set per batch), so the micro-batches' losses add up to the batch
    mean and their gradients to its gradient."""

    def __init__(self, transformer: nn.Module, chunk_tokens: Optional[int]) -> None:
        self.transformer = transformer
        self.chunk_tokens = chunk_tokens
        self.denominator: torch.Tensor = torch.ones(())

    def __call__(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        total, _ = cross_entropy_sum(hidden, self.transformer.output, labels, self.chunk_tokens,
                                     self.transformer.loss_kernel)
        return total / self.denominator


class PipelineRunner:
    """This rank's stages and the schedule that runs them."""

    def __init__(self, stages: list[tuple[int, StageModule]], transformer: nn.Module, plan: ParallelPlan,
                 meshes: ParallelMeshes, device: torch.device, chunk_tokens: Optional[int] = None) -> None:
        self.plan = plan
        self.group = meshes.group(PIPELINE_DIM)
        self.microbatches = microbatches(plan)
        total = num_stages(plan)
        self.stage_indices = [s for s, _ in stages]
        self.has_first = 0 in self.stage_indices
        self.has_last = total - 1 in self.stage_indices
        self.loss = TokenSumLoss(transformer, chunk_tokens)
        self._modules = stages
        self._device = device
        self._total = total
        self._width = transformer.config.d_model
        self._shape: Optional[tuple[int, int]] = None
        self.schedule = None
        self._parameters = [p for _, module in stages for p in module.parameters()] + \
            ([p for p in transformer.output.parameters()] if self.has_last else [])
        self._held: list = []

    @property
    def stage_modules(self) -> list[StageModule]:
        """This rank's stage modules, in stage order (the first one sees every micro-batch's
        tokens as they enter this rank: the throughput callbacks count them there)."""
        return [module for _, module in self._modules]

    def _schedule_for(self, input_ids: torch.Tensor):
        """The schedule for micro-batches of this shape, built at the first batch: stages are
        given their boundary shapes (the shapes are fixed from then on)."""
        rows, seq = input_ids.shape
        shape = (rows // self.microbatches, seq)
        if self.schedule is not None:
            if shape != self._shape:
                raise PlanError(f"ParallelPlan pp={self.plan.pp} fixes the micro-batch shape at the first "
                                f"batch {self._shape}; this batch's is {shape}: use fixed-length batches "
                                "(drop_last=True) under pipeline parallelism")
            return self.schedule
        stages = []
        for index, module in self._modules:
            dtype = next(module.parameters()).dtype
            # activations carry gradients back across the boundary (the static metadata says so)
            hidden = torch.empty(*shape, self._width, dtype=dtype, device="meta", requires_grad=True)
            inputs = torch.empty(shape, dtype=input_ids.dtype, device="meta") if index == 0 else hidden
            stages.append(build_stage(module, index, self._total, self._device, self.group, inputs, hidden))
        self.stages, self._shape = stages, shape
        # every rank gets the loss function: torch runs a rank's backward only when it has one
        self.schedule = build_schedule(self.plan.pp_schedule, stages, self.microbatches, self.loss)
        return self.schedule

    def training_step(self, batch: Any, gradients: Optional[DataParallelGradients],
                      zero_grad: bool, accumulate: int = 1) -> torch.Tensor:
        """Forward and backward of every micro-batch; the batch's mean token loss, on every rank.
        `zero_grad`: the batch opens an accumulation window, whose gradients start from zero;
        `accumulate`: batches per optimizer step, whose gradients are averaged (Lightning divides
        the loss it differentiates by this; here the schedule differentiates it).
        Data-parallel gradients accumulate over the micro-batches and are reduced once, when the
        strategy's backward hook calls `gradients.after_backward()`."""
        if zero_grad:
            for p in self._parameters:
                p.grad = None
        if gradients is not None:
            gradients.before_backward()
        with gradients.accumulating() if gradients is not None else nullcontext():
            loss = self._run(batch, train=True, scale=accumulate)
        self._held = [(p, p.grad) for p in self._parameters if p.grad is not None]
        return loss

    def restore_gradients(self) -> None:
        """Put back the gradients `training_step` computed. Lightning zeroes the gradients of a
        window's first batch between its training step and its backward (the backward would come
        after), so the training step zeroes them itself first, and the strategy's backward hook
        calls this to undo Lightning's zeroing."""
        for p, grad in self._held:
            p.grad = grad
        self._held = []

    def validation_step(self, batch: Any) -> torch.Tensor:
        return self._run(batch, train=False)

    def _run(self, batch: Any, train: bool, scale: int = 1) -> torch.Tensor:
        step = StepBatch.of(batch)
        if step.document_ids is not None or step.positions is not None:
            raise PlanError(f"ParallelPlan pp={self.plan.pp} does not take packed documents (batches with "
                            "positions or document_ids) yet: pack without document boundaries, or set pp=1")
        rows = step.input_ids.shape[0]
        if rows % self.microbatches:
            raise PlanError(f"a batch of {rows} sequences does not split into pp_microbatches="
                            f"{self.microbatches}: use a micro-batch size that is a multiple of "
                            f"{self.microbatches}, or change pp_microbatches")
        self.loss.denominator = (step.labels != IGNORE_INDEX).sum().clamp_min(1) * scale
        losses: list[torch.Tensor] = []
        args = (step.input_ids,) if self.has_first else ()
        run_schedule(self._schedule_for(step.input_ids), args, step.labels if self.has_last else None, losses, train)
        # only the last stage holds the loss; fp64 so that no precision is lost in the sharing
        local = torch.zeros((), dtype=torch.float64, device=step.input_ids.device)
        for loss in losses:
            local += loss.detach().double()
        dist.all_reduce(local, group=self.group)
        return local * scale


def build_pipeline(module: nn.Module, transformer: nn.Module, stages: list[tuple[int, StageModule]],
                   plan: ParallelPlan, meshes: ParallelMeshes, device: torch.device,
                   master_weights: bool = False) -> PipelineRunner:
    """The runner for the stages `split_into_stages` kept; the loss chunking is the module's
    (`loss_chunk_tokens` among its hyperparameters, as CausalLMModule has it)."""
    if master_weights:
        raise PlanError(f"ParallelPlan pp={plan.pp} does not run master weights yet (their compute copies are "
                        "refreshed outside the schedule): set mixed_precision='autocast' with "
                        "precision='bf16-mixed'")
    hparams = getattr(module, "hparams", {}) or {}
    if hparams.get("fused_loss"):
        raise PlanError(f"ParallelPlan pp={plan.pp} computes the loss with the model's head and loss "
                        "kernel on the last stage: set fused_loss=false")
    return PipelineRunner(stages, transformer, plan, meshes, device, hparams.get("loss_chunk_tokens"))


__all__ = ["PipelineRunner", "TokenSumLoss", "build_pipeline"]
