"""Pipeline parallelism inside Lightning's training step.

The strategy's training step hands the batch to `PipelineRunner.training_step`, which runs the
plan's schedule over micro-batches: every forward and backward happens inside the schedule, so
the strategy's backward only runs the hooks around it. The loss is the sum of the token losses
of every micro-batch divided by the batch's token count (as without pipelining), computed on the
last stage and shared with every stage for logging and the finite checks. MoE balance losses
arise on every stage and join each micro-batch's backward there (pipeline_stages.AuxLossBackward);
their batch total is shared like the loss (`aux_loss`). Data parallelism is
reduced once per step: buckets accumulate over the micro-batches and are reduced when the
strategy's backward hook finishes them. FSDP2/HSDP stages (each stage module a root unit over its
blocks, parameters kept gathered over the micro-batches) reduce-scatter once per step, after the
last micro-batch, as torch's PipelineStage drives them; with the "defer_all" accumulation policy,
only on the last batch of an accumulation window (pipeline_schedule.AccumulatingStage).
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
    mean and their gradients to its gradient; times `multiplier` (the StepBatch's `loss_scale`:
    cp under context parallelism). Under tensor parallelism the head is split over the vocabulary
    and the model's `loss_kernel` is the vocabulary-parallel one, read at each call."""

    def __init__(self, transformer: nn.Module, chunk_tokens: Optional[int]) -> None:
        self.transformer = transformer
        self.chunk_tokens = chunk_tokens
        self.denominator: torch.Tensor = torch.ones(())
        self.multiplier = 1.0

    def __call__(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        total, _ = cross_entropy_sum(hidden, self.transformer.output, labels, self.chunk_tokens,
                                     self.transformer.loss_kernel)
        return total / self.denominator * self.multiplier


class PipelineRunner:
    """This rank's stages and the schedule that runs them."""

    def __init__(self, stages: list[tuple[int, StageModule]], transformer: nn.Module, plan: ParallelPlan,
                 meshes: ParallelMeshes, device: torch.device, chunk_tokens: Optional[int] = None,
                 activation_dtype: Optional[torch.dtype] = None) -> None:
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
        self._dtype = activation_dtype  # FSDP2's compute dtype, else the stage parameters'
        self._shape: Optional[tuple[int, int]] = None
        self.schedule = None
        self._parameters = [p for _, module in stages for p in module.parameters()]  # the last has the head
        self._held: list = []
        self._reduce = True  # whether this batch's step reduces FSDP2 gradients (AccumulatingStage)
        # the latest batch's MoE balance loss summed over the stages (0 for a dense model), on
        # every rank: the one-process step differentiates token loss + balance loss
        self.aux_loss: torch.Tensor = torch.zeros(())

    @property
    def stage_modules(self) -> list[StageModule]:
        """This rank's stage modules, in stage order (the first one sees every micro-batch's
        tokens as they enter this rank: the throughput callbacks count them there)."""
        return [module for _, module in self._modules]

    @property
    def microbatch_shape(self) -> tuple[int, int]:
        """(rows, tokens per row) of a micro-batch as this rank holds it: its share of the
        sequence under context parallelism, the whole sequence otherwise (fixed at the first batch)."""
        assert self._shape is not None, "the shape is fixed when the first batch runs"
        return self._shape

    def _schedule_for(self, input_ids: torch.Tensor):
        """The schedule for micro-batches of this shape (this rank's share of the sequence under
        context parallelism), built at the first batch: stages are given their boundary shapes
        (the shapes are fixed from then on).

        Stages exchange plain tensors (DTensors cross stages only from torch 2.12): without
        sequence parallelism the whole activation, identical on the tensor-parallel ranks; with
        it each rank's 1/tp of the sequence, which every block takes and gives as a plain
        tensor, and which the last stage's final norm gathers (parallel/tensor_parallel.py)."""
        rows, seq = input_ids.shape
        shape = (rows // self.microbatches, seq)
        tp = self.plan.tp if self.plan.sequence_parallel else 1
        if seq % tp:
            raise PlanError(f"sequence_parallel=true needs each rank's sequence length ({seq}) to be a multiple "
                            f"of tp={tp}: pad the batch, or set sequence_parallel=false")
        if self.schedule is not None:
            if shape != self._shape:
                raise PlanError(f"ParallelPlan pp={self.plan.pp} fixes the micro-batch shape at the first "
                                f"batch {self._shape}; this batch's is {shape}: use fixed-length batches "
                                "(drop_last=True) under pipeline parallelism")
            return self.schedule
        stages = []
        for index, module in self._modules:
            dtype = self._dtype or next(module.parameters()).dtype
            # activations carry gradients back across the boundary (the static metadata says so)
            hidden = lambda length: torch.empty(shape[0], length, self._width, dtype=dtype,  # noqa: E731
                                                device="meta", requires_grad=True)
            inputs = torch.empty(shape, dtype=input_ids.dtype, device="meta") if index == 0 else hidden(seq // tp)
            outputs = hidden(seq if index == self._total - 1 else seq // tp)
            stages.append(build_stage(module, index, self._total, self._device, self.group, inputs, outputs,
                                      reduce_now=lambda: self._reduce))
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
        # FSDP2 reduces at the end of the schedule unless the window defers every reduction and
        # this is not its last batch (Lightning's block_backward_sync has turned sync off)
        self._reduce = gradients is None or gradients.synced or gradients.accumulation != "defer_all"
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
        # per-row positions come with packed documents; context parallelism's (S_local,) positions
        # of its shard are the same for every row
        if step.document_ids is not None or (step.positions is not None and step.positions.dim() > 1):
            raise PlanError(f"ParallelPlan pp={self.plan.pp} does not take packed documents (batches with "
                            "document_ids or per-row positions) yet: pack without document boundaries, or set pp=1")
        rows = step.input_ids.shape[0]
        if rows % self.microbatches:
            raise PlanError(f"a batch of {rows} sequences does not split into pp_microbatches="
                            f"{self.microbatches}: use a micro-batch size that is a multiple of "
                            f"{self.microbatches}, or change pp_microbatches")
        positions = step.positions if step.positions is not None else \
            torch.arange(step.input_ids.shape[1], device=step.input_ids.device)
        for _, module in self._modules:
            module.positions = positions
            # each micro-batch's balance loss weighs 1/micro-batches of the batch's, whose
            # gradient Lightning would divide by the accumulated batches
            module.aux_scale, module.aux_total = 1.0 / (self.microbatches * scale), None
        # context parallelism: this rank's token losses over the whole sequences' token count,
        # times cp (the data-parallel average over dp x cp divides again), as without pipelining
        counted = (step.labels != IGNORE_INDEX).sum()
        self.loss.denominator = step.loss_denominator(counted) * scale
        self.loss.multiplier = step.loss_scale
        losses: list[torch.Tensor] = []
        args = (step.input_ids,) if self.has_first else ()
        run_schedule(self._schedule_for(step.input_ids), args, step.labels if self.has_last else None, losses, train)
        # only the last stage holds the loss, every stage its balance losses: (token loss, balance
        # loss) summed over the stages, in fp64 so that no precision is lost in the sharing
        local = torch.zeros(2, dtype=torch.float64, device=step.input_ids.device)
        for loss in losses:
            local[0] += loss.detach().double()
        for _, module in self._modules:
            if module.aux_total is not None:
                local[1] += module.aux_total.double() / self.microbatches
        dist.all_reduce(local, group=self.group)
        self.aux_loss = local[1]
        return step.step_loss(local[0] * scale / step.loss_scale)


def build_pipeline(module: nn.Module, transformer: nn.Module, stages: list[tuple[int, StageModule]],
                   plan: ParallelPlan, meshes: ParallelMeshes, device: torch.device,
                   master_weights: bool = False, activation_dtype: Optional[torch.dtype] = None) -> PipelineRunner:
    """The runner for the stages `split_into_stages` kept; the loss chunking is the module's
    (`loss_chunk_tokens` among its hyperparameters, as CausalLMModule has it).
    `activation_dtype`: what the stages compute and send in when FSDP2 casts their parameters
    (its MixedPrecisionPolicy's param_dtype); None: the parameters' own dtype."""
    if master_weights:
        raise PlanError(f"ParallelPlan pp={plan.pp} does not run master weights yet (their compute copies are "
                        "refreshed outside the schedule): set mixed_precision='autocast' with "
                        "precision='bf16-mixed'")
    hparams = getattr(module, "hparams", {}) or {}
    if hparams.get("fused_loss"):
        raise PlanError(f"ParallelPlan pp={plan.pp} computes the loss with the model's head and loss "
                        "kernel on the last stage: set fused_loss=false")
    return PipelineRunner(stages, transformer, plan, meshes, device, hparams.get("loss_chunk_tokens"),
                          activation_dtype)


__all__ = ["PipelineRunner", "TokenSumLoss", "build_pipeline"]
