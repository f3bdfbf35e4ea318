"""The model protocol's questions, answered in one place (docs/ARCHITECTURE.md, "The model
protocol"): which modules are routed experts, which parameters are theirs, which blocks are MoE.

A module is a routed-experts module when its class sets `is_expert = True`. Everything that
treats experts differently (expert parallelism, the gradient groups, clipping, checkpoints, the
planner's counts) asks these functions, never a parameter name or a class.
"""
from __future__ import annotations

from typing import Optional

from torch import nn


def find_transformer(module: nn.Module) -> Optional[nn.Module]:
    """The sub-module that follows the model protocol (has `blocks` whose items have
    `attention`), or None for an arbitrary user model (which then gets data parallelism only)."""
    for sub in module.modules():
        blocks = getattr(sub, "blocks", None)
        if isinstance(blocks, nn.ModuleList) and len(blocks) and hasattr(blocks[0], "attention"):
            return sub
    return None


def is_expert_module(module: nn.Module) -> bool:
    """Whether `module` holds routed experts (its class sets `is_expert = True`)."""
    return bool(getattr(type(module), "is_expert", False))


def expert_modules(model: nn.Module) -> list[nn.Module]:
    """Every routed-experts module of `model`, in module order."""
    return [m for m in model.modules() if is_expert_module(m)]


def is_expert_parameter(model: nn.Module, name: str) -> bool:
    """Whether the parameter called `name` in `model.named_parameters()` belongs to routed experts."""
    owner, _, _ = name.rpartition(".")
    return is_expert_module(model.get_submodule(owner)) if owner else is_expert_module(model)


def block_indices(model: nn.Module) -> list[int]:
    """Each of `model.blocks`' index in the whole model, also where a pipeline rank keeps some
    blocks only (their `indices`, parallel/pipeline_stages.KeptBlocks)."""
    return list(getattr(model.blocks, "indices", None) or range(len(model.blocks)))


def moe_layers(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """(block index in the whole model, ffn) of every block of `model.blocks` whose ffn holds
    routed experts."""
    return [(i, block.ffn) for i, block in zip(block_indices(model), model.blocks)
            if any(is_expert_module(m) for m in block.ffn.modules())]


__all__ = ["block_indices", "find_transformer", "is_expert_module", "expert_modules", "is_expert_parameter",
           "moe_layers"]
