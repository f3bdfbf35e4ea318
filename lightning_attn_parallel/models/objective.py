"""The causal-LM training objective of a protocol model on one micro-batch, for every front-end.

The Trainer's module (module.py) and a Fabric loop (fabric.py's `training_loss`) both call this,
so a step computes the same loss whichever front-end runs it: the token losses summed by the
model's own loss kernel (vocabulary-parallel under tensor parallelism), divided by the step's
token count, scaled by what the batch layout says (context parallelism), plus the MoE layers'
balance losses.
"""
from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import nn

from ..step import StepBatch
from .deepseek import collect_aux_loss
from .fused_loss import fused_cross_entropy_sum
from .loss import cross_entropy_sum


def causal_lm_loss(model: nn.Module, batch: Union[StepBatch, dict[str, Any]],
                   loss_chunk_tokens: Optional[int] = None,
                   fused: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to differentiate, mean token loss of the whole step to log) of `model` (a protocol
    model, e.g. `build_model(cfg)`) on `batch` (a loader's dict, or the StepBatch the strategy
    laid out). `fused`: liger's fused head + cross-entropy where it can run."""
    step = StepBatch.of(batch)
    max_len = model.config.max_seq_len
    if step.seq_len > max_len:
        raise ValueError(f"batch sequence length {step.seq_len} exceeds the model's max_seq_len={max_len}: "
                         "raise model.max_seq_len or lower data.seq_len")
    hidden = model(step.input_ids, step.positions, step.document_ids)
    loss_fn = fused_cross_entropy_sum if fused else cross_entropy_sum
    loss_sum, count = loss_fn(hidden, model.output, step.labels, loss_chunk_tokens, model.loss_kernel)
    mean = loss_sum / step.loss_denominator(count)
    loss = mean * step.loss_scale
    if model.config.is_moe:  # the balance losses of the MoE layers' latest forward
        loss = loss + collect_aux_loss(model)
    return loss, step.step_loss(mean)


__all__ = ["causal_lm_loss"]
