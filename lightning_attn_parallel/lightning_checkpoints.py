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

    @property
    def _state_split_over_ranks(self) -> bool:
        from .parallel.state_dict import split_over_ranks

        # pipeline stages hold different parameters as plain tensors: a folder gathers them all
        return self.model is not None and (split_over_ranks(self.model) or getattr(self, "pipeline", None) is not None)

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
            if not self._state_split_over_ranks:
                return super().lightning_module_state_dict()
            return model_state(self.model, full=not self._save_distributed_checkpoint)

    def optimizer_state(self, optimizer) -> dict[str, Any]:
        from .parallel.state_dict import optimizer_state

        with self.masters_in_place():
            if not self._state_split_over_ranks:
                return super().optimizer_state(optimizer)
            return optimizer_state(self.model, getattr(optimizer, "_optimizer", optimizer),
                                   full=not self._save_distributed_checkpoint)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Optional[Any] = None) -> None:
        """Write to a temporary name and rename, so an interrupted save never destroys the last
        good checkpoint. Split plans write a torch.distributed.checkpoint folder."""
        from .checkpoint import save_file, save_lightning_checkpoint

        path = Path(self.broadcast(str(filepath)))
        checkpoint = settle_fit_loop_state(checkpoint)
        if self._state_split_over_ranks and self._save_distributed_checkpoint:
            save_lightning_checkpoint(path, checkpoint, is_rank_zero=self.is_global_zero)
            self.barrier()
        else:
            save_file(path, checkpoint, is_writer=self.is_global_zero)

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
