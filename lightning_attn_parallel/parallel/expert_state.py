"""Expert-parallel experts in state dicts: under their global names and shapes.

Under expert parallelism EP rank r keeps experts [r*L, (r+1)*L) (L = E/ep) as plain [L, ...]
tensors under the same names as the model's [E, ...] stacks, and FSDP2 may split that block
further over the expert-data-parallel (edp) ranks. Saved as they are, every EP rank's block would
claim to be the whole tensor, and a checkpoint would keep one of them. So the state dicts of
checkpoints present each expert tensor (the parameters, and the optimizer states shaped like them)
as a DTensor view of this rank's data with the global shape [E, ...], split over the ep ranks and,
inside each ep block, over the edp ranks: DCP then writes and reads each rank's slice, any layout
loads any other, and `full_tensor()` gathers the full experts for a consolidated file.

This is written by hand because DCP needs global shapes while the experts stay plain local
tensors during training: the all-to-all dispatcher and the bucketed gradient reducer work on them
directly, for speed, and only checkpoints need the global description.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

ATTRIBUTE = "expert_shard"
# Names that wrappers insert between a module and its parameters; state dicts from
# get_model_state_dict leave them out (FSDP1, activation checkpointing, torch.compile).
_WRAPPER_NAMES = {"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"}


@dataclass(frozen=True)
class ExpertShard:
    """Which block of a RoutedExperts module's experts this rank holds.

    `mesh` lays the ranks out as the global tensor is split: ep first (the contiguous expert
    blocks), then edp when FSDP2 shards each block over the expert-data-parallel ranks. It reuses
    the training groups and only describes the layout for DCP and `full_tensor()`.
    """

    group: dist.ProcessGroup
    rank: int
    degree: int
    n_experts: int
    mesh: DeviceMesh

    @property
    def n_local(self) -> int:
        return self.n_experts // self.degree


def record_expert_shard(module: nn.Module, shard: ExpertShard) -> None:
    """Attach `shard` to an experts module (the model itself knows nothing of it)."""
    setattr(module, ATTRIBUTE, shard)


def record_edp_sharding(module: nn.Module, mesh: DeviceMesh) -> None:
    """After FSDP2 has sharded `module`'s experts over edp: describe them on the (ep, edp) `mesh`."""
    setattr(module, ATTRIBUTE, replace(getattr(module, ATTRIBUTE), mesh=mesh))


def ep_edp_mesh(expert_mesh: DeviceMesh) -> DeviceMesh:
    """The expert mesh (edp, ep) seen as (ep, edp), on the same process groups (no new group):
    the ep blocks are the outer split of the global expert tensor and FSDP2's edp split is inside
    each block, so [Shard(0), Shard(0)] on this mesh matches the experts' real layout."""
    return DeviceMesh.from_group([expert_mesh.get_group("ep"), expert_mesh.get_group("edp")],
                                 expert_mesh.device_type, mesh=expert_mesh.mesh.T.contiguous(),
                                 mesh_dim_names=("ep", "edp"))


def clean_name(name: str) -> str:
    """A module path as get_model_state_dict names it: without wrapper modules."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_NAMES)


def expert_shards(model: nn.Module) -> dict[str, ExpertShard]:
    """State-dict name of every expert-parallel parameter of `model` -> its ExpertShard."""
    return {name: shard for name, (shard, _) in _expert_parameters(model).items()}


def _expert_parameters(model: nn.Module) -> dict[str, tuple[ExpertShard, torch.Size]]:
    """State-dict name -> (ExpertShard, this rank's [L, ...] shape) of every expert parameter."""
    found = {}
    for module_name, module in model.named_modules():
        shard = getattr(module, ATTRIBUTE, None)
        if shard is None:
            continue
        for name, param in module.named_parameters(recurse=False):
            found[clean_name(f"{module_name}.{name}" if module_name else name)] = (shard, param.shape)
    return found


# ---------------------------------------------------------------------------- sharded views
def global_view(tensor: torch.Tensor, shard: ExpertShard) -> DTensor:
    """This rank's block (plain [L, ...], or FSDP2's edp shard of it) as a view of [E, ...].

    Shares storage with `tensor` when it is on the mesh's device type, so DCP loads into it."""
    if isinstance(tensor, DTensor):
        if shard.mesh.ndim != 1 + tensor.device_mesh.ndim:
            raise RuntimeError("experts sharded by FSDP2 need their (ep, edp) layout recorded "
                               "(apply.shard_experts does it)")
        local, inner = tensor.to_local(), list(tensor.placements)
    else:
        local, inner = tensor, [Replicate()] * (shard.mesh.ndim - 1)
    shape = torch.Size((tensor.shape[0] * shard.degree, *tensor.shape[1:]))
    return DTensor.from_local(local, shard.mesh, [Shard(0), *inner], run_check=False,
                              shape=shape, stride=_contiguous_stride(shape))


def global_model_state(model: nn.Module, state: Mapping[str, Any]) -> dict[str, Any]:
    """`state` (from get_model_state_dict(model)) with every expert tensor as its global view."""
    shards = expert_shards(model)
    _check_names(shards, state)
    return {k: global_view(v, shards[k]) if k in shards else v for k, v in state.items()}


def global_optimizer_state(model: nn.Module, state: Mapping[str, Any]) -> dict[str, Any]:
    """`state` (from get_optimizer_state_dict(model, opt)) with every per-element state of an
    expert (exp_avg, exp_avg_sq: shaped like the parameter; not the scalar step) as a global view."""
    return _map_optimizer_state(model, state, global_view, lambda shape, local: shape == local)


def copy_back(originals: dict[str, Any], views: Mapping[str, Any]) -> None:
    """After a load into `views`, make sure `originals` hold the loaded values: a view built on
    another device, or a value the loader replaced, does not share their storage."""
    for key, view in views.items():
        original = originals.get(key)
        if isinstance(view, Mapping) and isinstance(original, dict):
            copy_back(original, view)
        elif isinstance(view, torch.Tensor) and isinstance(original, torch.Tensor):
            target = original.to_local() if isinstance(original, DTensor) else original
            source = view.to_local() if isinstance(view, DTensor) else view
            if target.data_ptr() != source.data_ptr():
                with torch.no_grad():
                    target.copy_(source)
        elif view is not original:
            originals[key] = view


# ---------------------------------------------------------------------------- full state dicts
def full_state(state: Mapping[str, Any], cpu_offload: bool = True) -> dict[str, Any]:
    """Every DTensor of a (nested) state dict gathered to its full tensor (collective: every rank
    calls it on state dicts of the same structure, so the gathers run in the same order). With
    `cpu_offload`, as torch's full state dicts: rank 0 gets the tensors on the CPU, one gathered
    tensor at a time, and the other ranks drop each one at once and get an empty dict."""
    keep = not cpu_offload or _rank() == 0

    def gather(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {k: gather(v) for k, v in value.items()}
        if isinstance(value, list):
            return [gather(v) for v in value]
        if isinstance(value, DTensor):
            value = value.full_tensor()
        if isinstance(value, torch.Tensor) and cpu_offload:
            return value.cpu() if keep else None
        return value

    gathered = gather(state)
    return gathered if keep else {}


def local_model_state(model: nn.Module, state: Mapping[str, Any]) -> dict[str, Any]:
    """A full state dict with every expert [E, ...] tensor cut to this rank's block [L, ...]."""
    shards = expert_shards(model)
    return {k: _local_block(v, shards[k]) if k in shards else v for k, v in state.items()}


def local_optimizer_state(model: nn.Module, state: Mapping[str, Any]) -> dict[str, Any]:
    """A full optimizer state dict keyed by name with every expert state cut to this rank's block."""
    return _map_optimizer_state(model, state, _local_block,
                                lambda shape, local: shape[1:] == local[1:])


# ---------------------------------------------------------------------------- helpers
def _local_block(tensor: torch.Tensor, shard: ExpertShard) -> torch.Tensor:
    if tensor.shape[:1] != (shard.n_experts,):
        return tensor  # not a full expert stack: leave the shape error to the loader
    return tensor[shard.rank * shard.n_local:(shard.rank + 1) * shard.n_local]


def _map_optimizer_state(model: nn.Module, state: Mapping[str, Any],
                         fn: Callable[[torch.Tensor, ExpertShard], torch.Tensor],
                         applies: Callable[[torch.Size, torch.Size], bool]) -> dict[str, Any]:
    """Apply `fn` to each expert's optimizer states shaped like it (`applies(shape, local shape)`);
    scalars such as Adam's step are left alone."""
    experts = _expert_parameters(model)
    if not experts or "state" not in state:
        return dict(state)
    per_param = {}
    for name, values in state["state"].items():
        if name in experts:
            shard, local = experts[name]
            values = {k: fn(v, shard) if isinstance(v, torch.Tensor) and v.ndim == len(local)
                      and applies(v.shape, local) else v for k, v in values.items()}
        per_param[name] = values
    return {**state, "state": per_param}


def _check_names(shards: Mapping[str, ExpertShard], state: Mapping[str, Any]) -> None:
    missing = [name for name in shards if name not in state]
    if missing:  # a silent miss would save every rank's experts under one name
        raise RuntimeError(f"expert parameter {missing[0]!r} is not in the model's state dict "
                           f"(keys like {next(iter(state), None)!r}): a wrapper renames it")


def _contiguous_stride(shape: torch.Size) -> tuple[int, ...]:
    stride, step = [], 1
    for size in reversed(shape):
        stride.append(step)
        step *= max(size, 1)
    return tuple(reversed(stride))


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


__all__ = ["ExpertShard", "record_expert_shard", "record_edp_sharding", "ep_edp_mesh", "clean_name",
           "expert_shards", "global_view", "global_model_state", "global_optimizer_state",
           "copy_back", "full_state", "local_model_state", "local_optimizer_state"]
