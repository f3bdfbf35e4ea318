"""Checkpoints that load under any plan, and a consolidated export that needs no plugin.

Distributed checkpoints are torch.distributed.checkpoint (DCP) folders: every rank writes its own
shards, and the tensors are keyed by parameter name with their global shapes, so a checkpoint
saved by tp=2 x dp_shard=2 on 4 ranks loads into dp_shard=2 on 2 ranks or into one process (DCP
reads whichever slices each rank's current layout needs). Model and optimizer state go through
`get_model_state_dict` / `get_optimizer_state_dict`, which name everything by its plain
parameter name whatever wraps the model (FSDP, activation checkpointing, torch.compile).

Folder layout: DCP's files (`.metadata`, `*.distcp`) holding {"model": ..., "optimizers":
{"0": ..., "1": ...}}, plus `extra.pt` (anything else: step counters, loop state) written by
rank 0 with torch.save. Every file is read weights-only (safe_load.py): a file that would run
code when unpickled is refused with an UnsafeCheckpointError naming it.

Every tensor split over ranks is a DTensor (FSDP2 shards, tensor- and expert-parallel ones), so
the state dicts are torch's own (parallel/state_dict.py) and experts reshard like everything else.

Every save goes to `<path>.tmp` first and is renamed into place once complete, so an
interrupted save never destroys the checkpoint already at `path`. Before writing, the free space
of the target's file system is checked against the checkpoint's size (the tensors' bytes); a
save that fails anyway (a disk filling up meanwhile, a rank's write error) removes what it wrote,
and every rank raises the same CheckpointError naming the path and the free space.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

from .errors import first_line, rank
from .parallel.state_dict import model_state as full_or_sharded_model_state
from .parallel.state_dict import state_dict_name
from .safe_load import UnsafeCheckpointError
from .safe_load import load as safe_load
from .storage import describe, existing_folder, why_not_writable

PathLike = Union[str, os.PathLike]
Optimizers = Union[Optimizer, Iterable[Optimizer], None]

EXTRA_FILE = "extra.pt"
METADATA_FILE = ".metadata"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, corrupt, or saved from a different model."""


# ---------------------------------------------------------------------------- distributed
def save_distributed(path: PathLike, model: nn.Module, optimizers: Optimizers,
                     extra: Optional[dict] = None) -> None:
    """Save model and optimizer state as a resharding DCP folder at `path` (collective).

    Every rank must call it. `extra` (picklable) is written by rank 0 and returned by
    `load_distributed`.
    """
    optim_states = [get_optimizer_state_dict(model, opt) for opt in _as_list(optimizers)]
    _write(Path(path), get_model_state_dict(model), optim_states, extra or {})


def load_distributed(path: PathLike, model: nn.Module, optimizers: Optimizers = None,
                     part_of_model: bool = False) -> dict:
    """Load a `save_distributed` folder into `model` (and `optimizers`) in place; return `extra`.

    Every rank must call it. The model may be parallelized differently from the one that saved
    (or not at all); its parameter names and global shapes must match the checkpoint's, which is
    checked first so a wrong model fails with the name of the first mismatch. `part_of_model`:
    `model` holds some of the checkpoint's parameters (a pipeline stage), which must match.
    """
    path = Path(path)
    metadata = _read_metadata(path)
    optimizers = _as_list(optimizers)
    model_state = get_model_state_dict(model)
    _check_model_matches(path, metadata, model_state, whole=not part_of_model)
    _check_optimizer_count(path, metadata, len(optimizers))
    extra = read_extra(path)
    optim_states = [get_optimizer_state_dict(model, opt) for opt in optimizers]
    held = [[list(group["params"]) for group in s["param_groups"]] for s in optim_states]
    # each shared tensor's other names are read apart, to check that the checkpoint agrees
    probes = {name: torch.empty_like(model_state[name]) for names in _shared_names(model, model_state)
              for name in names[1:]}
    state = {"model": {**model_state, **probes}, "optimizers": {str(i): s for i, s in enumerate(optim_states)}}
    try:
        dcp.load(state, checkpoint_id=str(path))
    except (Exception, dcp.CheckpointException) as err:  # DCP gathers every rank's failure
        raise CheckpointError(f"checkpoint {path} is corrupt or incomplete ({first_line(err, with_type=True)}): "
                              "restore it from a copy or load an earlier checkpoint") from err
    check_shared_tensors(path, model, state["model"])
    set_model_state_dict(model, model_state)  # DCP loaded in place; this also re-ties what is shared
    if part_of_model:
        _own_group_names(path, optim_states, held)
    for opt, opt_state in zip(optimizers, optim_states):
        set_optimizer_state_dict(model, opt, opt_state)
    return extra


def _own_group_names(path: Path, optim_states: list[dict], held: list[list[list[str]]]) -> None:
    """A folder keeps one rank's list of each parameter group's names (the lists are not tensors:
    one writer), so under pipeline parallelism it names one stage's parameters, and
    `set_optimizer_state_dict`, which finds a rank's groups by those names, finds none on the
    other stages. A stage's groups are the saved ones in order (the model decides the groups, not
    the plan): each loaded group gets this stage's names back, its hyper-parameters stay loaded."""
    for state, groups in zip(optim_states, held):
        if len(state["param_groups"]) != len(groups):
            raise CheckpointError(f"checkpoint {path} has {len(state['param_groups'])} optimizer parameter groups "
                                  f"but this run's optimizer has {len(groups)}: resume with the "
                                  "configure_optimizers it was saved with")
        for group, names in zip(state["param_groups"], groups):
            group["params"] = names


def save_lightning_checkpoint(path: PathLike, checkpoint: dict[str, Any], is_rank_zero: bool) -> None:
    """Save a Lightning checkpoint dict whose "state_dict" and "optimizer_states" are sharded
    state dicts (parallel/state_dict.py) in the same folder format; the rest of the dict (loops,
    callbacks, epoch...) goes to `extra.pt`."""
    rest = dict(checkpoint)
    model_state = rest.pop("state_dict")
    optim_states = rest.pop("optimizer_states", [])
    _write(Path(path), model_state, optim_states, rest, is_rank_zero)


def load_lightning_checkpoint(path: PathLike, model: nn.Module, optimizers: Optimizers,
                              part_of_model: bool = False) -> dict:
    """Load a checkpoint folder into the (already parallelized) model and optimizers in place.

    Returns the rest of the Lightning checkpoint dict, without "state_dict" and
    "optimizer_states": their contents are already in the model and optimizers.
    """
    return load_distributed(path, model, optimizers, part_of_model)


def read_checkpoint_file(path: PathLike) -> dict:
    """torch.load of a single-file checkpoint on the CPU, with a clear error when it is unusable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist: check the path")
    try:
        return safe_load(path)
    except UnsafeCheckpointError:
        raise
    except Exception as err:
        raise CheckpointError(f"checkpoint {path} cannot be read ({first_line(err, with_type=True)}): it is "
                              "corrupt or truncated; load an earlier checkpoint") from err


def saved_hyperparameters(path: PathLike) -> dict:
    """The hyperparameters a checkpoint was saved with, read from its metadata only: a folder's
    `.metadata` (every shard file it names must exist at its full size) and `extra.pt`, or a
    single .ckpt file memory-mapped. A CheckpointError (its message starting with the path) says
    what is missing, truncated or unreadable."""
    path = Path(path)
    if not path.is_dir():
        try:
            checkpoint = safe_load(path, mmap=True)
        except UnsafeCheckpointError:
            raise
        except Exception as err:  # noqa: BLE001 - any failure to read means the file is damaged
            raise CheckpointError(f"{str(path)!r} cannot be read ({first_line(err)}): it is truncated or "
                                  "not a checkpoint") from None
        if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
            raise CheckpointError(f"{str(path)!r} is not a Lightning checkpoint (no state_dict)")
        return checkpoint.get("hyper_parameters") or {}
    if not (path / METADATA_FILE).is_file():
        raise CheckpointError(f"{str(path)!r} is a folder without a {METADATA_FILE} file, so it is not a "
                              "complete sharded checkpoint")
    try:
        metadata = dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"{str(path)!r} has unreadable metadata ({first_line(err)})") from None
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{str(path)!r} is incomplete: its shard {name} is missing")
        if file.stat().st_size < size:
            raise CheckpointError(f"{str(path)!r} is incomplete: its shard {name} has "
                                  f"{file.stat().st_size} bytes of {size} (truncated)")
    if not (path / EXTRA_FILE).is_file():
        return {}
    try:
        state = safe_load(path / EXTRA_FILE)
    except UnsafeCheckpointError:
        raise
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"{str(path)!r} has an unreadable {EXTRA_FILE} ({first_line(err)})") from None
    return state.get("hyper_parameters") or {} if isinstance(state, dict) else {}


# ---------------------------------------------------------------------------- consolidated
def export_consolidated(path: PathLike, model: nn.Module) -> None:
    """Write the full, unsharded fp32 state dict of `model` to one torch.save file (collective).

    Pass the protocol model (e.g. CausalTransformer), not a LightningModule around it, so the
    keys are the ones a plain model's `load_state_dict` expects; the file then loads without
    this package. Only rank 0 holds the gathered tensors and writes.
    """
    state = full_or_sharded_model_state(model, full=True)
    if rank() == 0:
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    save_file(path, state, is_writer=rank() == 0)


def load_consolidated(path: PathLike, model: nn.Module, strict: bool = True) -> None:
    """Load an `export_consolidated` file into `model`, parallelized or not, in place."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"consolidated checkpoint {path} does not exist: check the path")
    try:
        state = safe_load(path)
    except UnsafeCheckpointError:
        raise
    except Exception as err:
        raise CheckpointError(f"consolidated checkpoint {path} cannot be read "
                              f"({first_line(err, with_type=True)}): re-export it") from err
    expected = {k: tuple(v.shape) for k, v in get_model_state_dict(model).items()}  # global shapes
    _raise_on_mismatch(path, {k: tuple(v.shape) for k, v in state.items()}, expected, strict)
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=strict))


# ---------------------------------------------------------------------------- checks
def _read_metadata(path: Path) -> Any:
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist: check the path (a save "
                              f"interrupted while replacing it leaves the previous checkpoint as "
                              f"{path.name}.old beside it: rename that back; {path.name}.tmp is an "
                              "unfinished save and not loadable)")
    if not path.is_dir() or not (path / METADATA_FILE).is_file() or not (path / EXTRA_FILE).is_file():
        raise CheckpointError(f"checkpoint {path} is not a complete distributed checkpoint (it "
                              f"needs {METADATA_FILE} and {EXTRA_FILE}): the save did not finish or "
                              "the folder was damaged; load an earlier checkpoint")
    try:
        return dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as err:
        raise CheckpointError(f"checkpoint {path} has unreadable metadata ({first_line(err, with_type=True)}): it "
                              "is corrupt; load an earlier checkpoint") from err


def _check_model_matches(path: Path, metadata: Any, model_state: Mapping[str, Any], whole: bool = True) -> None:
    saved = {key[len("model."):]: tuple(meta.size) for key, meta in metadata.state_dict_metadata.items()
             if key.startswith("model.") and hasattr(meta, "size")}
    expected = {k: tuple(v.shape) for k, v in model_state.items() if isinstance(v, torch.Tensor)}
    if not whole:  # a part of the model: the checkpoint's other parameters are someone else's
        saved = {k: v for k, v in saved.items() if k in expected}
    _raise_on_mismatch(path, saved, expected, strict=True)


def _raise_on_mismatch(path: Path, saved: Mapping[str, tuple], expected: Mapping[str, tuple],
                       strict: bool) -> None:
    """Name the first parameter that differs in name or shape, and the fix."""
    fix = ("build the model with the configuration the checkpoint was saved with, or load it "
           "into the model it came from")
    for name, shape in expected.items():
        if name not in saved:
            if strict:
                raise CheckpointError(f"checkpoint {path} was saved from a different model: it has "
                                      f"no parameter {name!r} {list(shape)}; {fix}")
        elif saved[name] != shape:
            raise CheckpointError(f"checkpoint {path} was saved from a different model: {name!r} "
                                  f"has shape {list(saved[name])} there but {list(shape)} in this "
                                  f"model; {fix}")
    unexpected = [name for name in saved if name not in expected]
    if unexpected and strict:
        raise CheckpointError(f"checkpoint {path} was saved from a different model: its parameter "
                              f"{unexpected[0]!r} does not exist in this model; {fix}")


def _shared_names(model: nn.Module, state: Mapping[str, Any]) -> list[list[str]]:
    """The state-dict names of each tensor `model` shares (tied embeddings), present in `state`."""
    from .models.materialize import shared_parameter_names

    groups = [[n for n in map(state_dict_name, names) if n in state] for names in shared_parameter_names(model)]
    return [names for names in groups if len(names) > 1]


def check_shared_tensors(path: PathLike, model: nn.Module, state: Mapping[str, Any]) -> None:
    """A checkpoint must hold one value under every name of a tensor the model shares (tied
    embeddings); loading one of two values that trained apart would silently drop the other.
    Collective when the state holds DTensors (each rank compares its shards)."""
    for first, *others in _shared_names(model, state):
        for other in others:
            a, b = (_local(state[n]).detach().float() for n in (first, other))
            difference = (a - b).abs().max() if a.numel() else torch.zeros(())
            if _distributed() and isinstance(state[first], DTensor):
                dist.all_reduce(difference, op=dist.ReduceOp.MAX)
            if difference.item() > 0:
                raise CheckpointError(
                    f"checkpoint {path} holds {other!r} and {first!r} as two different tensors (max abs "
                    f"difference {difference.item():.3g}) but this model ties them: it was saved while "
                    "they trained apart; build the model untied (tie_embeddings=False) to keep both, or "
                    "export it with --untie-embeddings")


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _check_optimizer_count(path: Path, metadata: Any, wanted: int) -> None:
    saved = {key.split(".")[1] for key in metadata.state_dict_metadata if key.startswith("optimizers.")}
    if wanted > len(saved):
        raise CheckpointError(f"checkpoint {path} holds {len(saved)} optimizer state(s) but "
                              f"{wanted} optimizer(s) were given: pass the optimizers it was saved "
                              "with, or none to load the model only")


def read_extra(path: Path) -> dict:
    """A checkpoint folder's extra file (weights only), or one CheckpointError line naming it."""
    try:
        return safe_load(path / EXTRA_FILE)
    except UnsafeCheckpointError:
        raise
    except Exception as err:
        raise CheckpointError(f"checkpoint {path} has an unreadable {EXTRA_FILE} "
                              f"({first_line(err, with_type=True)}): it is corrupt; load an earlier checkpoint") from err


# ---------------------------------------------------------------------------- writing
def _write(path: Path, model_state: dict, optim_states: list, extra: dict,
           is_rank_zero: Optional[bool] = None) -> None:
    """DCP-save into `<path>.tmp`, then rank 0 adds extra.pt and renames it over `path`. Refused
    before writing when the file system lacks the room; on any rank's failure the partial folder
    is removed and every rank raises the same CheckpointError."""
    leader = rank() == 0 if is_rank_zero is None else is_rank_zero
    tmp = path.with_name(path.name + ".tmp")
    state = {"model": model_state, "optimizers": {str(i): s for i, s in enumerate(optim_states)}}
    error = None
    try:
        check_free_space(path, state_bytes(state) + state_bytes(extra))  # writable, with room
        if leader:
            _remove(tmp)  # leftovers of an interrupted save
            tmp.mkdir(parents=True)
    except Exception as err:  # noqa: BLE001 - shared with every rank below
        error = _save_error(path, err)
    _raise_if_any(error, tmp if leader else None)  # every rank agrees before DCP starts
    try:
        dcp.save(state, checkpoint_id=str(tmp))
        if leader:
            torch.save(extra, tmp / EXTRA_FILE)
            _replace(tmp, path)
    except (Exception, dcp.CheckpointException) as err:  # DCP gathers every rank's failure
        error = _save_error(path, err)
    _raise_if_any(error, tmp if leader else None)


def save_file(path: PathLike, obj: Any, is_writer: Optional[bool] = None) -> None:
    """torch.save `obj` to `path` through `<path>.tmp` and a rename, by the writer (rank 0
    unless given). Collective when distributed: every rank raises the writer's CheckpointError
    (no room, a write error), and the .tmp is removed whatever went wrong."""
    writer = rank() == 0 if is_writer is None else is_writer
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    error = None
    if writer:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            check_free_space(path, state_bytes(obj))
            torch.save(obj, tmp)
            os.replace(tmp, path)
        except Exception as err:  # noqa: BLE001 - shared with every rank below
            error = _save_error(path, err)
    _raise_if_any(error, tmp if writer else None)


def state_bytes(obj: Any) -> int:
    """Bytes of the tensors in a (nested) state: DTensors by their global size (what a DCP
    folder holds once), plain tensors by their own."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()  # a DTensor's numel is the global one
    if isinstance(obj, Mapping):
        return sum(state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_bytes(v) for v in obj)
    return 0


def check_free_space(path: PathLike, needed: int) -> None:
    """Refuse a save of about `needed` bytes to `path` when its folder cannot be written (read-only,
    not permitted) or its file system has less room (with 5% and 1 MiB to spare for file headers
    and metadata)."""
    path = Path(path)
    folder = existing_folder(path)
    unwritable = why_not_writable(folder)
    if unwritable is not None:
        raise CheckpointError(f"cannot save checkpoint {path}: {folder} cannot be written, {unwritable} "
                              f"({_human(shutil.disk_usage(folder).free)} free)")
    need = int(needed * 1.05) + (1 << 20)
    free = shutil.disk_usage(folder).free
    if free < need:
        raise CheckpointError(f"not enough space to save checkpoint {path}: it needs about "
                              f"{_human(need)} ({need} bytes) but {folder} has {_human(free)} "
                              f"({free} bytes) free: free space there or save elsewhere")


def _save_error(path: Path, err: BaseException) -> str:
    if isinstance(err, CheckpointError):
        return str(err)
    folder = existing_folder(path)
    free = shutil.disk_usage(folder).free
    why = describe(err) or "free space there or save elsewhere"
    return (f"could not write checkpoint {path} ({first_line(err, with_type=True)}); {folder} has {_human(free)} "
            f"({free} bytes) free; {why} (the partial save was removed; the previous checkpoint is unchanged)")


def _raise_if_any(error: Optional[str], partial: Optional[Path]) -> None:
    """Share this rank's error (or None) with every rank (this is the save's barrier); if any rank
    failed, remove `partial` and raise the first error on every rank."""
    errors = [error]
    if _distributed():
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
    first = next((e for e in errors if e is not None), None)
    if first is None:
        return
    if partial is not None:
        _remove(partial)
    raise CheckpointError(first)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"


def _replace(tmp: Path, path: Path) -> None:
    """Move `tmp` to `path`; an existing `path` is set aside until the move has succeeded."""
    if not path.exists():
        os.replace(tmp, path)
        return
    old = path.with_name(path.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(path, old)
    os.replace(tmp, path)
    if old.is_dir():
        shutil.rmtree(old)
    else:
        old.unlink()


# ---------------------------------------------------------------------------- helpers
def _as_list(optimizers: Optimizers) -> list[Optimizer]:
    if optimizers is None:
        return []
    # Lightning wraps optimizers; the state dict helpers need the torch optimizer itself.
    single = isinstance(optimizers, Optimizer) or hasattr(optimizers, "_optimizer")
    return [getattr(opt, "_optimizer", opt) for opt in ([optimizers] if single else optimizers)]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()




__all__ = ["CheckpointError", "UnsafeCheckpointError", "save_distributed", "load_distributed", "export_consolidated",
           "load_consolidated", "save_lightning_checkpoint", "load_lightning_checkpoint",
           "read_checkpoint_file", "save_file", "check_free_space", "state_bytes", "check_shared_tensors",
           "saved_hyperparameters"]
