"""The one state representation of a parallelized model, for checkpoints, exports and loads.

Whatever splits a tensor over ranks (FSDP2/HSDP shards, tensor parallelism, expert parallelism)
makes it a DTensor, so "is this state split over ranks" is "is it a DTensor", and
torch.distributed.checkpoint's state-dict API describes every tensor by its parameter name and
global shape: a sharded state dict for a checkpoint folder (DCP reshards it to any other plan),
or the full one, gathered to rank 0's CPU one tensor at a time, for a single file or an export.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.tensor import DTensor


# Names that wrappers insert between a module and its parameters; state dicts from
# get_model_state_dict leave them out (FSDP1, activation checkpointing, torch.compile).
_WRAPPER_NAMES = {"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"}


def state_dict_name(name: str) -> str:
    """A parameter's name as get_model_state_dict gives it: without the wrappers' modules."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_NAMES)


def split_over_ranks(model: nn.Module) -> bool:
    """Whether some parameter of `model` is split over ranks (a DTensor)."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def model_state(model: nn.Module, full: bool) -> dict[str, Any]:
    """A sharded state dict (for a checkpoint folder), or the full one (`full`: rank 0 holds every
    tensor gathered on its CPU, the other ranks an empty dict; under pipeline parallelism rank 0
    also receives the other stages' tensors; collective)."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=full, cpu_offload=True))
    if full:
        from .pipeline_stages import gather_stages_to_rank0, holds_stages

        if holds_stages(model):
            state = gather_stages_to_rank0(model, state)
    return state


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, full: bool) -> dict[str, Any]:
    """The optimizer's states keyed by parameter name, sharded or `full` as `model_state`."""
    return get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=full, cpu_offload=True))


def load_full_model_state(model: nn.Module, state: Mapping[str, Any], strict: bool) -> None:
    """Load a full state dict (from one file, saved under any plan) into this plan's layout."""
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


__all__ = ["state_dict_name", "split_over_ranks", "model_state", "optimizer_state", "load_full_model_state",
           "load_optimizer_state"]
