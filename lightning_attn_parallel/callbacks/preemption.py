"""Preemption: a scheduler's SIGTERM or SIGUSR1 ends the run with a checkpoint and a requeue code.

Schedulers (SLURM, Kubernetes, torchrun's agent) send a signal and kill a little later. The
handler only notes the signal: a save from inside a handler would start collectives in the middle
of a step. At the end of every optimizer step the ranks agree with one all-reduce of that note
on the CPU (a gloo group, so no GPU wait), which every rank reaches at the same step whichever
ranks got the signal; then every rank takes part in one checkpoint save (the strategy's, so
distributed and atomic), training stops, and `exit_code` (128 + the signal, which Kubernetes'
ExitCode restart policy and torchrun treat as retryable) tells the launcher to start it again.
Resume with `ckpt_path=last` (the checkpoint is ModelCheckpoint's `last.ckpt`).

Under Lightning's `SLURMEnvironment(auto_requeue=True)` the save and the requeue are Lightning's
own: its SLURM handler runs at the agreed step instead of inside the signal, writing the `hpc`
checkpoint that a requeued `fit` loads by itself and calling `scontrol requeue`.

Lightning's own SIGTERM handling (stop at the next batch and exit with code 0, without a
checkpoint) is replaced for the signals handled here, and given back when training ends.
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Any, Optional, Sequence, Union

import lightning as L
import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback, ModelCheckpoint


class Preemption(Callback):
    """Checkpoint and stop at the end of the step in which any rank got one of `signals`.

    Args:
        signals: signal names or numbers to handle (SIGTERM and SIGUSR1 by default).
        dirpath: where `last.ckpt` goes; default: the ModelCheckpoint's folder, else
            `<default_root_dir>/checkpoints`.
        exit_code: what `requested_exit_code` says once preempted (default 128 + the signal).
    """

    def __init__(self, signals: Sequence[Union[str, int]] = ("SIGTERM", "SIGUSR1"),
                 dirpath: Optional[str] = None, exit_code: Optional[int] = None) -> None:
        try:
            self.signals = [signal.Signals[s] if isinstance(s, str) else signal.Signals(s) for s in signals]
        except (KeyError, ValueError) as err:
            from ..errors import UserError

            raise UserError(f"preemption signals={list(signals)!r} holds an unknown signal ({err}): use "
                            "names such as SIGTERM, SIGUSR1") from None
        self.dirpath, self.exit_code = dirpath, exit_code
        self.received: Optional[int] = None  # the signal this rank got (set by the handler)
        self.preempted: Optional[int] = None  # the signal the ranks agreed on, once saved
        self.saved_path: Optional[str] = None
        self._group: Any = None
        self._previous: dict[int, Any] = {}
        self._last_step = -1

    @property
    def requested_exit_code(self) -> Optional[int]:
        """None when not preempted; else the code to exit with so that the run is started again."""
        if self.preempted is None:
            return None
        return self.exit_code if self.exit_code is not None else 128 + self.preempted

    # ---------------------------------------------------------------- set-up
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if dist.is_available() and dist.is_initialized() and dist.get_backend() != "gloo":
            self._group = dist.new_group(backend="gloo")  # collective: every rank is here

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After Lightning's handlers are in place (trainer._run), so these replace them."""
        self._last_step = trainer.global_step
        if threading.current_thread() is not threading.main_thread():
            return  # Python lets only the main thread set handlers
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._note)

    def _note(self, signum: int, frame: Any) -> None:
        self.received = signum

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    # ---------------------------------------------------------------- every step
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self._last_step or self.preempted is not None:
            return  # gradients are still accumulating
        self._last_step = trainer.global_step
        signum = self._agree()
        if signum:
            self._checkpoint_and_stop(trainer, signum)

    def _agree(self) -> int:
        """The largest signal any rank noted (0: none); the same answer on every rank."""
        note = torch.tensor([self.received or 0], dtype=torch.int64)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(note, op=dist.ReduceOp.MAX, group=self._group)
        return int(note.item())

    def _checkpoint_and_stop(self, trainer: L.Trainer, signum: int) -> None:
        environment = getattr(trainer.strategy, "cluster_environment", None)
        slurm = getattr(trainer, "_signal_connector", None)
        if isinstance(environment, SLURMEnvironment) and environment.auto_requeue and slurm is not None:
            # Lightning's own SLURM hook: the hpc checkpoint (found by the requeued fit) and the requeue
            self.saved_path = trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir)
            slurm._slurm_sigusr_handler_fn(signum, None)
        else:
            self.saved_path = os.path.join(self._dirpath(trainer), ModelCheckpoint.CHECKPOINT_NAME_LAST
                                           + ModelCheckpoint.FILE_EXTENSION)
            trainer.save_checkpoint(self.saved_path)
            callback = trainer.checkpoint_callback
            if isinstance(callback, ModelCheckpoint):
                callback.last_model_path = self.saved_path
        self.preempted = signum
        trainer.should_stop = True
        if trainer.is_global_zero:
            print(f"preempted by {signal.Signals(signum).name} after step {trainer.global_step}: checkpoint "
                  f"{self.saved_path} written; resume with ckpt_path=last (exit code "
                  f"{self.requested_exit_code})", flush=True)

    def _dirpath(self, trainer: L.Trainer) -> str:
        if self.dirpath:
            return self.dirpath
        callback = trainer.checkpoint_callback
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            return str(callback.dirpath)
        return os.path.join(trainer.default_root_dir, "checkpoints")


__all__ = ["Preemption"]
