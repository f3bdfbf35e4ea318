"""Allocate a model built on the meta device, keeping the tensors its modules share.

`nn.Module.to_empty` gives every module a new Parameter of its own, so a parameter that two modules
share (tied embeddings: the LM head's weight *is* the embedding's) comes back as two tensors, which
a loader fills alike and training then updates apart. `materialize` is the one way the project
allocates a meta-built model: it records which (module, attribute) slots hold one tensor,
allocates, points every slot back at one tensor, and fills the buffers no checkpoint holds.
"""
from __future__ import annotations

from typing import Union

import torch
from torch import nn

Slot = tuple[nn.Module, str, str]  # (owner module, "_parameters" or "_buffers", attribute name)


def shared_slots(module: nn.Module) -> list[list[Slot]]:
    """Groups of two or more slots of `module` that hold the same tensor (by identity)."""
    by_tensor: dict[int, list[Slot]] = {}
    for owner in module.modules():
        for kind in ("_parameters", "_buffers"):
            for name, tensor in getattr(owner, kind).items():
                if tensor is not None:
                    slots = by_tensor.setdefault(id(tensor), [])
                    if not any(o is owner and n == name for o, _, n in slots):
                        slots.append((owner, kind, name))
    return [slots for slots in by_tensor.values() if len(slots) > 1]


def shared_parameter_names(module: nn.Module) -> list[list[str]]:
    """Groups of parameter names of `module` that are one tensor (tied embeddings:
    ["tok_embeddings.weight", "output.weight"]), as its state dict names them."""
    by_tensor: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(param), []).append(name)
    return [names for names in by_tensor.values() if len(names) > 1]


def retie(groups: list[list[Slot]]) -> None:
    """Point every slot of each group at the tensor its first slot holds now."""
    for (owner, kind, name), *others in groups:
        tensor = getattr(owner, kind)[name]
        for other, other_kind, other_name in others:
            getattr(other, other_kind)[other_name] = tensor


def reset_buffers(model: nn.Module) -> None:
    """Fill what a checkpoint does not hold (RoPE tables, routing counters) after allocation."""
    from .deepseek import DeepSeekMoE
    from .rope import RotaryEmbedding

    for module in model.modules():
        if isinstance(module, (RotaryEmbedding, DeepSeekMoE)):
            module.reset_parameters()


def materialize(module: nn.Module, device: Union[str, torch.device]) -> nn.Module:
    """Allocate `module` (built on the meta device, possibly parallelized) on `device`, uninitialized
    except for the buffers no checkpoint holds; shared parameters and buffers stay shared."""
    groups = shared_slots(module)
    module.to_empty(device=device)
    retie(groups)
    reset_buffers(module)
    return module


__all__ = ["materialize", "reset_buffers", "shared_slots", "shared_parameter_names", "retie"]
