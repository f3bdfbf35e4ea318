"""Both front-ends' checkpoints over the package's one state representation.

Whatever splits a tensor over ranks is a DTensor (parallel/state_dict.py), so a plan whose state is
split writes a torch.distributed.checkpoint folder (or, with save_distributed_checkpoint=False,
one file of full state dicts) that loads under any other plan; a replicated plan writes Lightning's
own single file. Every save goes through a temporary name and a rename (checkpoint.py).

The Trainer's strategy mixes in `SplitStateCheckpoints` (Lightning's hooks); Fabric's calls
`save_fabric_state` / `load_fabric_state`, which write and read the same checkpoint: a protocol
model's states carry the names a `CausalLMModule` gives them ("model.<name>"), so a run of either
front-end resumes the other's and `python -m lightning_attn_parallel.export` reads both.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import lightning
import torch
from torch import nn
from torch.optim import Optimizer

from .errors import UserError
from .lightning_workarounds import settle_fit_loop_state


# ---------------------------------------------------------------------------- shared by both
def model_state_of(model: nn.Module, split: bool, distributed: bool) -> dict[str, Any]:
    """A sharded state dict for a checkpoint folder, the full one for a file (split plans), or
    the module's own (replicated plans)."""
    from .parallel.state_dict import model_state

    return model_state(model, full=not distributed) if split else model.state_dict()


def optimizer_state_of(model: nn.Module, optimizer: Optimizer, split: bool, distributed: bool) -> dict[str, Any]:
    """As `model_state_of`, for an optimizer (states keyed by parameter name on split plans)."""
    from .parallel.state_dict import optimizer_state

    optimizer = getattr(optimizer, "_optimizer", optimizer)
    return optimizer_state(model, optimizer, full=not distributed) if split else optimizer.state_dict()


def write_checkpoint(path: Path, checkpoint: dict[str, Any], folder: bool, is_rank_zero: bool,
                     barrier: Callable[[], None]) -> None:
    """A torch.distributed.checkpoint folder (`folder`: the states are sharded) or one file."""
    from .checkpoint import save_file, save_lightning_checkpoint

    if folder:
        save_lightning_checkpoint(path, checkpoint, is_rank_zero=is_rank_zero)
        barrier()
    else:
        save_file(path, checkpoint, is_writer=is_rank_zero)


def load_model_file_state(model: nn.Module, state: Mapping[str, Any], strict: bool) -> None:
    """A single file's model state (saved under any plan) into this plan's layout."""
    from .parallel.state_dict import load_full_model_state, split_over_ranks

    if split_over_ranks(model):
        load_full_model_state(model, state, strict)
    else:
        model.load_state_dict(state, strict=strict)


def load_optimizer_file_states(model: nn.Module, optimizers: list, states: list, device: torch.device) -> None:
    """A single file's optimizer states (saved under any plan), in order."""
    from .parallel.state_dict import load_optimizer_state, split_over_ranks

    split = split_over_ranks(model)
    for optimizer, state in zip(optimizers, states):
        load_optimizer_state(model, getattr(optimizer, "_optimizer", optimizer), state, split, device)


class SplitStateCheckpoints:
    """Mixed into the strategy: Lightning's checkpoint hooks (state dicts, save, load). The
    strategy provides `masters_in_place()`: checkpoints hold master weights, never the compute
    copies."""

    _save_distributed_checkpoint: bool = True
    _state_loaded_in_place: bool = False
    _async_checkpoint: bool = False
    _async_saves: Any = None  # async_checkpoint.AsyncSaves once the first asynchronous save starts

    @property
    def _state_split_over_ranks(self) -> bool:
        from .parallel.state_dict import split_over_ranks

        # pipeline stages hold different parameters as plain tensors: a folder gathers them all
        return self.model is not None and (split_over_ranks(self.model) or getattr(self, "pipeline", None) is not None)

    @property
    def _writes_folder(self) -> bool:
        """Checkpoints are folders: asynchronous ones always, split states unless told otherwise."""
        return self._async_checkpoint or (self._state_split_over_ranks and self._save_distributed_checkpoint)

    @property
    def _states_by_name(self) -> bool:
        """States go through torch's state-dict functions (keyed by parameter name): split plans,
        and asynchronous saves under any plan."""
        return self._async_checkpoint or self._state_split_over_ranks

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True

    @property
    def lightning_restore_optimizer(self) -> bool:
        """Lightning restores optimizer states through `load_optimizer_state_dict` (any plan,
        any single-file format), except after a checkpoint folder, which `load_checkpoint` has
        already loaded into the model and the optimizers."""
        return not self._state_loaded_in_place

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """Split plans: a sharded state dict for a checkpoint folder, or the full one for a file.
        Under master weights, the masters (`masters_in_place`, the strategy's)."""
        with self.masters_in_place():
            return model_state_of(self.model, self._states_by_name, self._writes_folder)

    def optimizer_state(self, optimizer) -> dict[str, Any]:
        with self.masters_in_place():
            return optimizer_state_of(self.model, optimizer, self._states_by_name, self._writes_folder)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Optional[Any] = None) -> None:
        """Write to a temporary name and rename, so an interrupted save never destroys the last
        good checkpoint. Split plans write a torch.distributed.checkpoint folder."""
        path = Path(self.broadcast(str(filepath)))
        checkpoint = settle_fit_loop_state(checkpoint)
        if self._async_checkpoint:  # a folder under any plan, written in the background
            from .async_checkpoint import AsyncSaves

            self._async_saves = self._async_saves or AsyncSaves()
            rest = dict(checkpoint)
            state = {"model": rest.pop("state_dict"),
                     "optimizers": {str(i): s for i, s in enumerate(rest.pop("optimizer_states", []))}}
            self._async_saves.save(path, state, rest, leader=self.is_global_zero)
        else:
            write_checkpoint(path, checkpoint, self._writes_folder, self.is_global_zero, self.barrier)

    def remove_checkpoint(self, filepath) -> None:
        """A checkpoint retired (ModelCheckpoint's top-k, an older last) goes once the save in
        flight is complete, so a failed save never leaves fewer checkpoints than before."""
        if self._async_saves is None or not self._async_saves.remove_later(filepath):
            super().remove_checkpoint(filepath)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """A background save that failed is raised here, on every rank; one complete is renamed."""
        if self._async_saves is not None:
            self._async_saves.poll()
        super().on_train_batch_start(batch, batch_idx)

    def finish_checkpoints(self) -> None:
        """Complete the save in flight (training ends; the strategy's teardown)."""
        saves, self._async_saves = self._async_saves, None
        if saves is not None:
            saves.close()

    def load_checkpoint(self, checkpoint_path, weights_only: Optional[bool] = None) -> dict[str, Any]:
        """A checkpoint folder (saved under any plan) is loaded into the model and optimizers in
        place and the rest of the Lightning dict is returned; a single file is read and applied
        by `load_model_state_dict` and `load_optimizer_state_dict`."""
        from .checkpoint import check_shared_tensors, load_lightning_checkpoint, read_checkpoint_file

        path = Path(self.broadcast(str(checkpoint_path)))
        self._state_loaded_in_place = path.is_dir()
        if self._state_loaded_in_place:
            with self.masters_in_place():
                return load_lightning_checkpoint(path, self.model, self.optimizers,
                                                 part_of_model=getattr(self, "pipeline", None) is not None)
        checkpoint = read_checkpoint_file(path)
        check_shared_tensors(path, self.lightning_module, checkpoint.get("state_dict", {}))
        return checkpoint

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        if "state_dict" not in checkpoint:
            return  # a checkpoint folder was loaded in place by load_checkpoint
        with self.masters_in_place():
            load_model_file_state(self.model, checkpoint["state_dict"], strict)

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        """Optimizer states of a single file, saved under any plan (parallel/state_dict.py)."""
        if "optimizer_states" not in checkpoint:
            return  # a checkpoint folder was loaded in place by load_checkpoint
        with self.masters_in_place():
            load_optimizer_file_states(self.model, self.optimizers, checkpoint["optimizer_states"],
                                       self.root_device)


# ---------------------------------------------------------------------------- Fabric's
def _named(model: nn.Module) -> nn.Module:
    """`model` as a CausalLMModule names it: a bare protocol model under "model."."""
    from .models.protocol import find_transformer

    if find_transformer(model) is not model:
        return model
    holder = nn.Module()
    holder.model = model
    return holder


def _split_state(state: Mapping[str, Any]) -> tuple[nn.Module, list[Optimizer], dict[str, Any]]:
    models = [v for v in state.values() if isinstance(v, nn.Module)]
    if len(models) != 1:
        raise UserError(f"the checkpoint state holds {len(models)} models but attn_hybrid saves one: "
                        "pass {'model': model, 'optimizer': optimizer, ...}")
    optimizers = [v for v in state.values() if isinstance(v, Optimizer)]
    rest = {k: v for k, v in state.items() if not isinstance(v, (nn.Module, Optimizer))}
    return models[0], optimizers, rest


def save_fabric_state(path: Path, state: Mapping[str, Any], distributed: bool, is_rank_zero: bool,
                      barrier: Callable[[], None]) -> None:
    """`fabric.save(path, state)` in the Trainer's format: the model's and optimizers' states
    (in `state`'s order), everything else as given (stateful objects by their state dicts), and
    the model's configuration as the hyper-parameters an export reads."""
    from .models.protocol import find_transformer
    from .parallel.state_dict import split_over_ranks

    model, optimizers, rest = _split_state(state)
    split = split_over_ranks(model)
    named = _named(model)
    checkpoint = {k: v.state_dict() if hasattr(v, "state_dict") else v for k, v in rest.items()}
    config = getattr(find_transformer(model), "config", None)
    if config is not None and "hyper_parameters" not in checkpoint:
        checkpoint["hyper_parameters"] = {"model": asdict(config)}
    checkpoint.setdefault("pytorch-lightning_version", lightning.__version__)  # what the Trainer reads first
    checkpoint["state_dict"] = model_state_of(named, split, distributed)
    checkpoint["optimizer_states"] = [optimizer_state_of(named, o, split, distributed) for o in optimizers]
    write_checkpoint(path, checkpoint, split and distributed, is_rank_zero, barrier)


def load_fabric_state(path: Path, state: dict[str, Any], strict: bool, device: torch.device) -> dict[str, Any]:
    """`fabric.load(path, state)`: a checkpoint of either front-end, saved under any plan, into
    `state`'s model and optimizers in place; its other entries are restored from the checkpoint
    (stateful objects through load_state_dict). Returns what the checkpoint holds beyond them."""
    from .checkpoint import check_shared_tensors, load_distributed, read_checkpoint_file

    model, optimizers, rest = _split_state(state)
    named = _named(model)
    if path.is_dir():
        extra = load_distributed(path, named, optimizers)
    else:
        extra = read_checkpoint_file(path)
        check_shared_tensors(path, named, extra.get("state_dict", {}))
        if "state_dict" in extra:
            load_model_file_state(named, extra["state_dict"], strict)
        load_optimizer_file_states(named, optimizers, extra.get("optimizer_states", []), device)
        extra = {k: v for k, v in extra.items() if k not in ("state_dict", "optimizer_states")}
    for key, value in rest.items():
        if key not in extra:
            if strict:
                raise UserError(f"checkpoint {path} holds no {key!r}: load it with the state it was saved "
                                f"with, or pass strict=False")
            continue
        if hasattr(value, "load_state_dict"):
            value.load_state_dict(extra.pop(key))
        else:
            state[key] = extra.pop(key)
    return extra


__all__ = ["SplitStateCheckpoints", "load_fabric_state", "load_model_file_state", "load_optimizer_file_states",
           "model_state_of",
           "optimizer_state_of", "save_fabric_state", "write_checkpoint"]
