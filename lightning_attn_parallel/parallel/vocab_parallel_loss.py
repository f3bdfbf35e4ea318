"""The loss over a vocabulary split by tensor parallelism: the kernel that `apply_tensor_parallel`
puts in the model's `loss_kernel` slot, so that logits are never gathered."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from ..models.loss import IGNORE_INDEX, at_least_fp32


class VocabParallelLoss(nn.Module):
    """Sum of token losses of logits sharded over the vocabulary (last dim) on a 1-D mesh."""

    def forward(self, logits: DTensor, targets: torch.Tensor) -> torch.Tensor:
        mesh = logits.device_mesh
        if mesh.ndim != 1 or logits.placements[0] != Shard(logits.ndim - 1):
            raise ValueError(f"logits placed {logits.placements} on a {mesh.ndim}-D mesh: the loss "
                             "takes logits sharded over the vocabulary on one mesh dimension")
        vocab = logits.shape[-1]
        per_rank = -(-vocab // mesh.size())  # DTensor shards like torch.chunk
        start = min(mesh.get_local_rank() * per_rank, vocab)
        return VocabParallelCrossEntropy.apply(at_least_fp32(logits.to_local()), targets, start,
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


__all__ = ["VocabParallelLoss", "VocabParallelCrossEntropy"]
