"""What one micro-batch processed: tokens, the sequence length that sets attention FLOPs, and
the parallel degrees that decide how per-rank counts add up to global ones."""
from __future__ import annotations

from typing import Any

import lightning as L
import torch


def batch_tokens(batch: Any) -> torch.Tensor:
    """This rank's token ids of a micro-batch: batch["input_ids"], or the batch if a tensor."""
    if isinstance(batch, dict):
        return batch["input_ids"]
    if isinstance(batch, torch.Tensor):
        return batch
    raise TypeError(f"cannot count tokens in a batch of type {type(batch).__name__}: "
                    "expected a dict with 'input_ids' or a tensor of token ids")


def global_seq_len(pl_module: L.LightningModule, input_ids: torch.Tensor) -> int:
    """Full sequence length of the micro-batch.

    Under context parallelism a rank holds S / cp tokens of each sequence, but attention cost
    grows with the whole sequence, so the module's `global_seq_len` wins when it has one.
    """
    seq_len = getattr(pl_module, "global_seq_len", None)
    return int(seq_len) if seq_len else int(input_ids.shape[-1])


def tensor_parallel_degree(trainer: L.Trainer) -> int:
    """Ranks of one tensor-parallel group all see the same tokens."""
    plan = getattr(trainer.strategy, "plan", None)
    return int(getattr(plan, "tp", 1) or 1)


def gradient_reducer(trainer: L.Trainer) -> Any:
    """The strategy's gradient reducer (with comm_stats()), or None under other strategies."""
    return getattr(trainer.strategy, "gradient_reducer", None)


class FlopsPerToken:
    """model.flops_per_token(seq_len), cached: the parameter walk is not free on large models
    and the same few sequence lengths come back every step."""

    def __init__(self) -> None:
        self._cache: dict[int, float] = {}

    def __call__(self, model: torch.nn.Module, seq_len: int) -> float:
        if seq_len not in self._cache:
            self._cache[seq_len] = float(model.flops_per_token(seq_len))
        return self._cache[seq_len]
