"""Model and optimizer state dicts of a parallelized model, for Lightning's checkpoint hooks.

Sharded plans (FSDP2, tensor or expert parallelism) go through torch.distributed.checkpoint's
state-dict API, so a checkpoint written under one plan loads under any other. Expert-parallel
experts are plain local tensors, so each expert tensor appears with its global shape
(expert_state.py): a view of this rank's block, gathered for a full state dict.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from .expert_state import (full_state, global_model_state, global_optimizer_state, local_model_state,
                           local_optimizer_state)


def model_state(model: nn.Module, full: bool, expert_parallel: bool) -> dict[str, Any]:
    """A sharded state dict (for a checkpoint folder), or the full one (`full`, for one file)."""
    if expert_parallel:
        # Views of the live tensors, not CPU copies (DTensor.from_local would move those back to
        # the mesh's device); DCP copies to the CPU as it writes, and the full state dict is
        # gathered one tensor at a time into rank 0's CPU memory.
        state = global_model_state(model, get_model_state_dict(model))
        return full_state(state) if full else state
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=full, cpu_offload=True))


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, full: bool,
                    expert_parallel: bool) -> dict[str, Any]:
    """The optimizer's states keyed by parameter name, sharded or `full` as `model_state`."""
    if expert_parallel:
        state = global_optimizer_state(model, get_optimizer_state_dict(model, optimizer))
        return full_state(state) if full else state
    return get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=full, cpu_offload=True))


def load_full_model_state(model: nn.Module, state: Mapping[str, Any], strict: bool) -> None:
    """Load a full state dict (from one file, saved under any plan) into this plan's layout."""
    state = local_model_state(model, state)  # experts: this rank's block
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=strict))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: Mapping[str, Any],
                         sharded: bool, device: torch.device) -> None:
    """Optimizer states of a single-file checkpoint: torch's own format (parameters numbered,
    written by a replicated plan) or full states keyed by parameter name (written by a sharded
    plan). A replicated plan loads the former directly; everything else goes through
    `set_optimizer_state_dict`, which shards the full states to this plan's layout."""
    keyed_by_name = _keyed_by_name(state)
    if not sharded and not keyed_by_name:
        from lightning.fabric.utilities.optimizer import _optimizers_to_device

        optimizer.load_state_dict(state)
        _optimizers_to_device([optimizer], device)
        return
    if not keyed_by_name:
        state = _keyed_by_parameter_name(model, optimizer, state)
    state = local_optimizer_state(model, state)  # experts: this rank's block
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def _keyed_by_name(state: Mapping[str, Any]) -> bool:
    return any(isinstance(p, str) for group in state.get("param_groups", ()) for p in group["params"])


def _keyed_by_parameter_name(model: nn.Module, optimizer, state: Mapping[str, Any]) -> dict[str, Any]:
    """torch's optimizer state (parameters numbered in the optimizer's order) keyed by parameter
    name instead, the form `set_optimizer_state_dict` takes. The names, in the optimizer's
    order, come from `get_optimizer_state_dict`, which strips whatever wraps the model."""
    current = get_optimizer_state_dict(model, optimizer)
    names = [name for group in current["param_groups"] for name in group["params"]]
    numbers = [p for group in state["param_groups"] for p in group["params"]]
    if len(names) != len(numbers):
        raise ValueError(f"the checkpoint's optimizer has {len(numbers)} parameters but this run's has "
                         f"{len(names)}: resume with the configure_optimizers it was saved with")
    rename = dict(zip(numbers, names))
    return {"state": {rename[k]: v for k, v in state["state"].items()},
            "param_groups": [{**group, "params": [rename[p] for p in group["params"]]}
                             for group in state["param_groups"]]}


__all__ = ["model_state", "optimizer_state", "load_full_model_state", "load_optimizer_state"]
