"""Activation checkpointing policies applied to a model that follows the block protocol.

- "none": keep every activation;
- "attention": recompute only each block's attention sub-module (its softmax inputs dominate
  memory at long sequence lengths without flash kernels);
- "block": recompute whole blocks, keeping only each block's input;
- "selective": recompute whole blocks but keep the outputs of matmuls (torch's
  selective-checkpoint policy), so only cheap element-wise work (norms, activations, RoPE) is
  redone; attention kernel outputs are kept too.
`every_n` applies the policy to every n-th block only.
torch.utils.checkpoint does the work; this file only decides where.
"""
from __future__ import annotations

from contextlib import nullcontext
from functools import partial
from typing import Callable, ContextManager

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from ..models.protocol import block_indices
from ..plan import CHECKPOINT_POLICIES

_SAVE_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
}


def _keep_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_forward(module: nn.Module, selective: bool = False) -> None:
    """Make `module` recompute its forward in the backward pass.

    The forward is replaced on the instance instead of wrapping the module, so parameter names,
    state dicts and checkpoints are the same under every policy.
    """
    original = module.forward

    def forward(*args, **kwargs):
        if not torch.is_grad_enabled():
            return original(*args, **kwargs)
        extra = {}
        if selective:
            extra["context_fn"] = partial(create_selective_checkpoint_contexts, _keep_matmuls)
        return checkpoint(original, *args, use_reentrant=False, **extra, **kwargs)

    module.forward = forward
    module.activation_checkpointed = "selective" if selective else "full"


def apply_activation_checkpointing(model: nn.Module, policy: str = "block", every_n: int = 1) -> nn.Module:
    """Wrap the chosen sub-modules of `model.blocks` in place and return the model."""
    if policy not in CHECKPOINT_POLICIES:
        raise ValueError(f"activation_checkpointing={policy!r} is unknown: choose one of "
                         f"{', '.join(CHECKPOINT_POLICIES)}")
    if every_n < 1:
        raise ValueError(f"ac_every_n={every_n} is invalid: it must be >= 1")
    if policy == "none":
        return model
    # a pipeline rank keeps some blocks under their indices in the whole model (KeptBlocks): every
    # n-th is counted over the whole model, so the same blocks are checkpointed under any pp
    for idx, block in zip(block_indices(model), model.blocks):
        if idx % every_n:
            continue
        target = block.attention if policy == "attention" else block
        checkpoint_forward(target, selective=policy == "selective")
    return model


def activation_offload(enabled: bool, device: torch.device) -> Callable[[], ContextManager]:
    """The context a training step runs in: with `enabled` (ParallelPlan.offload_activations)
    the activations saved for backward go to host memory (pinned on CUDA) and come back for the
    backward pass (torch.autograd.graph.save_on_cpu); otherwise nothing."""
    if not enabled:
        return nullcontext
    return partial(torch.autograd.graph.save_on_cpu, pin_memory=device.type == "cuda")
