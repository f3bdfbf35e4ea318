"""Causal-LM cross-entropy that need not materialise the full fp32 logits.

Returns the *sum* of token losses and the token count so callers can average over any group
(data-parallel ranks, context-parallel shards) by the global token count.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Shard
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _chunk_loss_sum(hidden: torch.Tensor, targets: torch.Tensor, head: Callable) -> torch.Tensor:
    logits = head(hidden)
    if isinstance(logits, DTensor):  # a vocabulary-parallel head: reduce without gathering
        return _vocab_sharded_loss_sum(logits, targets)
    return F.cross_entropy(_at_least_fp32(logits), targets, ignore_index=IGNORE_INDEX,
                           reduction="sum")


def _at_least_fp32(logits: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits are upcast for the softmax; fp64 ones (exactness tests) stay fp64."""
    return logits if logits.dtype == torch.float64 else logits.float()


def _vocab_sharded_loss_sum(logits: DTensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of token losses of logits sharded over the vocabulary (last dim) on a 1-D mesh."""
    mesh = logits.device_mesh
    if mesh.ndim != 1 or logits.placements[0] != Shard(logits.ndim - 1):
        raise ValueError(f"logits placed {logits.placements} on a {mesh.ndim}-D mesh: the loss "
                         "takes logits sharded over the vocabulary on one mesh dimension")
    vocab = logits.shape[-1]
    per_rank = -(-vocab // mesh.size())  # DTensor shards like torch.chunk
    start = min(mesh.get_local_rank() * per_rank, vocab)
    return VocabParallelCrossEntropy.apply(_at_least_fp32(logits.to_local()), targets, start,
                                           mesh.get_group())


class VocabParallelCrossEntropy(torch.autograd.Function):
    """Cross-entropy sum of logits whose vocabulary is split over `group`, exact, without
    gathering them: a max, a sum of exponentials and the target's logit are all-reduced
    (three (N,) vectors), and the gradient, softmax minus one-hot, is formed locally.

    Written by hand because torch's `loss_parallel` needs the backward pass to run inside its
    context manager, which Lightning's loop (backward outside training_step) does not allow.
    """

    @staticmethod
    def forward(ctx, local: torch.Tensor, targets: torch.Tensor, start: int,
                group: dist.ProcessGroup) -> torch.Tensor:
        valid = targets != IGNORE_INDEX
        local_ids = targets - start
        owned = valid & (local_ids >= 0) & (local_ids < local.shape[-1])
        local_ids = local_ids.clamp(0, local.shape[-1] - 1)
        peak = local.max(dim=-1).values
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
        exp = (local - peak.unsqueeze(-1)).exp()
        total = exp.sum(dim=-1)
        dist.all_reduce(total, group=group)
        target = (local.gather(-1, local_ids.unsqueeze(-1)).squeeze(-1) - peak) * owned
        dist.all_reduce(target, group=group)
        loss = ((total.log() - target) * valid).sum()
        ctx.save_for_backward(exp.div_(total.unsqueeze(-1)), local_ids, owned, valid)
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        softmax, local_ids, owned, valid = ctx.saved_tensors
        out = softmax.clone()
        out.scatter_add_(-1, local_ids.unsqueeze(-1), -owned.to(out.dtype).unsqueeze(-1))
        out.mul_((valid.to(out.dtype) * grad).unsqueeze(-1))
        return out, None, None, None


def cross_entropy_sum(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor],
                      targets: torch.Tensor,
                      chunk_tokens: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of losses, number of counted tokens) of `head(hidden)` (the LM head) against `targets`.

    With `chunk_tokens`, the tokens are processed in chunks whose logits are recomputed in the
    backward pass (torch.utils.checkpoint), so only one chunk's logits exist at a time: for a
    32k vocabulary and 16k tokens that is the difference between 2 GiB of fp32 logits and a few MiB.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    count = (targets != IGNORE_INDEX).sum()
    if not chunk_tokens or hidden.shape[0] <= chunk_tokens:
        return _chunk_loss_sum(hidden, targets, head), count
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_tokens):
        end = start + chunk_tokens
        total = total + checkpoint(_chunk_loss_sum, hidden[start:end], targets[start:end], head,
                                   use_reentrant=False)
    return total, count
