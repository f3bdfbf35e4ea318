"""Causal-LM cross-entropy that need not materialise the full fp32 logits.

Returns the *sum* of token losses and the token count so callers can average over any group
(data-parallel ranks, context-parallel shards) by the global token count.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..step import IGNORE_INDEX  # defined beside the batch layout, which the data layer shares



class TokenCrossEntropy(nn.Module):
    """Sum of the token losses of whole logits: the local default of the model's `loss_kernel`
    slot (under tensor parallelism parallel/ puts a vocabulary-parallel kernel there)."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(at_least_fp32(logits), targets, ignore_index=IGNORE_INDEX,
                               reduction="sum")


def at_least_fp32(logits: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits are upcast for the softmax; fp64 ones (exactness tests) stay fp64."""
    return logits if logits.dtype == torch.float64 else logits.float()


def _chunk_loss_sum(hidden: torch.Tensor, targets: torch.Tensor, head: Callable,
                    kernel: Callable) -> torch.Tensor:
    return kernel(head(hidden), targets)


def chunks_recomputed(tokens: float, chunk_tokens: Optional[int]) -> bool:
    """Whether `cross_entropy_sum` splits `tokens` into checkpointed chunks (the head and the loss
    kernel then run their forward again in the backward): only when they exceed one chunk. The
    planner times the loss by this same rule."""
    return bool(chunk_tokens) and tokens > chunk_tokens


def cross_entropy_sum(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor],
                      targets: torch.Tensor, chunk_tokens: Optional[int] = None,
                      kernel: Optional[Callable] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of losses, number of counted tokens) of `head(hidden)` (the LM head) against `targets`.

    `kernel(logits, targets)` sums the token losses: the model's `loss_kernel` slot, by default
    TokenCrossEntropy.

    With `chunk_tokens`, the tokens are processed in chunks whose logits are recomputed in the
    backward pass (torch.utils.checkpoint), so only one chunk's logits exist at a time: for a
    32k vocabulary and 16k tokens that is the difference between 2 GiB of fp32 logits and a few MiB.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    count = (targets != IGNORE_INDEX).sum()
    kernel = kernel or TokenCrossEntropy()
    if not chunks_recomputed(hidden.shape[0], chunk_tokens):
        return _chunk_loss_sum(hidden, targets, head, kernel), count
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_tokens):
        end = start + chunk_tokens
        total = total + checkpoint(_chunk_loss_sum, hidden[start:end], targets[start:end], head,
                                   kernel, use_reentrant=False)
    return total, count
