"""The Trainer strategy's checkpoint hooks over the package's one state representation.

Whatever splits a tensor over ranks is a DTensor (parallel/state_dict.py), so a plan whose state is
split writes a torch.distributed.checkpoint folder (or, with save_distributed_checkpoint=False,
one file of full state dicts) that loads under any other plan; a replicated plan writes Lightning's
own single file. Every save goes through a temporary name and a rename (checkpoint.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

from .lightning_workarounds import settle_fit_loop_state


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

        return self.model is not None and split_over_ranks(self.model)

    @property
    def _writes_folder(self) -> bool:
        """Checkpoints are folders: asynchronous ones always, split states unless told otherwise."""
        return self._async_checkpoint or (self._state_split_over_ranks and self._save_distributed_checkpoint)

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
        from .parallel.state_dict import model_state

        with self.masters_in_place():
            if not self._state_split_over_ranks and not self._async_checkpoint:
                return super().lightning_module_state_dict()
            return model_state(self.model, full=not self._writes_folder)

    def optimizer_state(self, optimizer) -> dict[str, Any]:
        from .parallel.state_dict import optimizer_state

        with self.masters_in_place():
            if not self._state_split_over_ranks and not self._async_checkpoint:
                return super().optimizer_state(optimizer)
            return optimizer_state(self.model, getattr(optimizer, "_optimizer", optimizer),
                                   full=not self._writes_folder)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Optional[Any] = None) -> None:
        """Write to a temporary name and rename, so an interrupted save never destroys the last
        good checkpoint. Split plans write a torch.distributed.checkpoint folder."""
        from .checkpoint import save_file, save_lightning_checkpoint

        path = Path(self.broadcast(str(filepath)))
        checkpoint = settle_fit_loop_state(checkpoint)
        if self._async_checkpoint:  # a folder under any plan, written in the background
            from .async_checkpoint import AsyncSaves

            self._async_saves = self._async_saves or AsyncSaves()
            rest = dict(checkpoint)
            state = {"model": rest.pop("state_dict"),
                     "optimizers": {str(i): s for i, s in enumerate(rest.pop("optimizer_states", []))}}
            self._async_saves.save(path, state, rest, leader=self.is_global_zero)
        elif self._state_split_over_ranks and self._save_distributed_checkpoint:
            save_lightning_checkpoint(path, checkpoint, is_rank_zero=self.is_global_zero)
            self.barrier()
        else:
            save_file(path, checkpoint, is_writer=self.is_global_zero)

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
                return load_lightning_checkpoint(path, self.model, self.optimizers)
        checkpoint = read_checkpoint_file(path)
        check_shared_tensors(path, self.lightning_module, checkpoint.get("state_dict", {}))
        return checkpoint

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        if "state_dict" not in checkpoint:
            return  # a checkpoint folder was loaded in place by load_checkpoint
        from .parallel.state_dict import load_full_model_state

        with self.masters_in_place():
            if not self._state_split_over_ranks:
                return super().load_model_state_dict(checkpoint, strict=strict)
            load_full_model_state(self.model, checkpoint["state_dict"], strict)

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        """Optimizer states of a single file, saved under any plan (parallel/state_dict.py)."""
        if "optimizer_states" not in checkpoint:
            return  # a checkpoint folder was loaded in place by load_checkpoint
        from .parallel.state_dict import load_optimizer_state

        with self.masters_in_place():
            for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"]):
                load_optimizer_state(self.model, getattr(optimizer, "_optimizer", optimizer), state,
                                     self._state_split_over_ranks, self.root_device)


__all__ = ["SplitStateCheckpoints"]
