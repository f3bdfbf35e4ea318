"""What a rank processed: tokens, the sequence length that sets attention FLOPs, and the
parallel degrees that decide how per-rank counts add up to global ones."""
from __future__ import annotations

from typing import Any, Optional

import lightning as L
import torch
from torch.utils.hooks import RemovableHandle

from ..step import StepBatch


def global_seq_len(trainer: L.Trainer, tokens: torch.Tensor) -> int:
    """Full sequence length of a micro-batch.

    Under context parallelism a rank holds S / cp tokens of each sequence, but attention cost
    grows with the whole sequence; the strategy's `step_batch` (a StepBatch) then says how long
    the sequences are.
    """
    step: Optional[StepBatch] = getattr(trainer.strategy, "step_batch", None)
    return step.seq_len if step is not None else int(tokens.shape[-1])


def tensor_parallel_degree(trainer: L.Trainer) -> int:
    """Ranks of one tensor-parallel group all see the same tokens."""
    plan = getattr(trainer.strategy, "plan", None)
    return int(getattr(plan, "tp", 1) or 1)


def token_sharing_degree(trainer: L.Trainer) -> int:
    """Ranks that process the same tokens: a tensor-parallel group, times the pipeline's stages
    (every stage runs every token of its data-parallel rank's batch)."""
    plan = getattr(trainer.strategy, "plan", None)
    return tensor_parallel_degree(trainer) * int(getattr(plan, "pp", 1) or 1)


def held_layer_fraction(model: torch.nn.Module) -> float:
    """The share of the model's layers this rank runs: 1, or a pipeline stage's blocks over
    all of them (a stage keeps only its own blocks)."""
    blocks, config = getattr(model, "blocks", None), getattr(model, "config", None)
    if blocks is None or not getattr(config, "n_layers", 0):
        return 1.0
    return len(blocks) / config.n_layers


def gradient_reducer(trainer: L.Trainer) -> Any:
    """The strategy's gradient reducer (with comm_stats()), or None under other strategies."""
    return getattr(trainer.strategy, "gradient_reducer", None)


class ConsumedTokens:
    """Counts the tokens `pl_module.model` consumes on this rank, with a forward pre-hook.

    The batch that callbacks receive is the one the data loader produced; a strategy may still
    split it (context parallelism shards sequences, or the batch, inside its training_step). The
    model's own input is this rank's share whatever the strategy does. Forward passes in eval
    mode (validation) are not counted.

    Under pipeline parallelism the schedule runs the rank's stage modules, never the model's
    forward: the tokens are counted at the rank's first stage instead, once per micro-batch on
    every stage (its input is token ids on the first stage, activations (B, S, D) on the others).
    """

    def __init__(self) -> None:
        self._handle: Optional[RemovableHandle] = None
        self._pending: list[tuple[int, int]] = []

    def attach(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.detach()

        def count(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            if module.training:
                tokens = args[0] if args else kwargs["tokens"]
                self._pending.append((tokens.numel(), global_seq_len(trainer, tokens)))

        def count_stage(module: torch.nn.Module, args: tuple) -> None:
            if pl_module.training:  # a stage module's own flag does not follow the LightningModule's
                # the micro-batch's tokens as this rank holds them (after a context-parallel
                # split), not the stage's input: under sequence parallelism that is 1/tp of them
                rows, seq = pipeline.microbatch_shape
                step: Optional[StepBatch] = getattr(trainer.strategy, "step_batch", None)
                self._pending.append((rows * seq, step.seq_len if step is not None else seq))

        pipeline = getattr(trainer.strategy, "pipeline", None)
        if pipeline is not None:
            self._handle = pipeline.stage_modules[0].register_forward_pre_hook(count_stage)
        else:
            self._handle = pl_module.model.register_forward_pre_hook(count, with_kwargs=True)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._pending = []

    def take(self) -> list[tuple[int, int]]:
        """(tokens, full sequence length) of each forward since the last call."""
        pending, self._pending = self._pending, []
        return pending


class FlopsPerToken:
    """model.flops_per_token(seq_len), cached: the parameter walk is not free on large models
    and the same few sequence lengths come back every step."""

    def __init__(self) -> None:
        self._cache: dict[int, float] = {}

    def __call__(self, model: torch.nn.Module, seq_len: int) -> float:
        if seq_len not in self._cache:
            self._cache[seq_len] = float(model.flops_per_token(seq_len))
        return self._cache[seq_len]
