"""Named profiler ranges around each block's attention and feed-forward modules.

The profiler sees operators, not layers; ranges opened and closed by module hooks let a trace
be summed per layer type. Forward hooks cover the forward pass (and its recomputation under
activation checkpointing); full backward hooks cover the backward pass, which autograd runs
outside any forward range. Ranges are named "lap/<kind>" and "lap/<kind>/backward".
"""
from __future__ import annotations

from typing import Callable

from torch import nn
from torch.autograd.profiler import record_function
from torch.utils.hooks import RemovableHandle

RANGE_PREFIX = "lap/"
BACKWARD_SUFFIX = "/backward"


def block_kinds(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, kind) for every block's attention and ffn; kind is attention, mlp or moe."""
    config = getattr(model, "config", None)
    pairs: list[tuple[nn.Module, str]] = []
    for index, block in enumerate(model.blocks):
        moe = config is not None and config.is_moe_layer(index)
        pairs += [(block.attention, "attention"), (block.ffn, "moe" if moe else "mlp")]
    return pairs


def _range_hooks(name: str) -> tuple[Callable, Callable]:
    """An opener and a closer sharing one stack (a module can nest under recomputation)."""
    stack: list[record_function] = []

    def open_range(*_args) -> None:
        rf = record_function(name)
        rf.__enter__()
        stack.append(rf)

    def close_range(*_args) -> None:
        if stack:
            stack.pop().__exit__(None, None, None)

    return open_range, close_range


def add_layer_ranges(model: nn.Module, backward: bool = True) -> list[RemovableHandle]:
    """Install the ranges; remove them with `handle.remove()` when profiling ends."""
    handles: list[RemovableHandle] = []
    for module, kind in block_kinds(model):
        opener, closer = _range_hooks(RANGE_PREFIX + kind)
        handles += [module.register_forward_pre_hook(opener), module.register_forward_hook(closer)]
        if backward:
            opener, closer = _range_hooks(RANGE_PREFIX + kind + BACKWARD_SUFFIX)
            handles += [module.register_full_backward_pre_hook(opener),
                        module.register_full_backward_hook(closer)]
    return handles
