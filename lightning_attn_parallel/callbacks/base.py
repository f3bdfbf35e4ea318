"""Shared skeleton of the metric callbacks: windows of optimizer steps and where values go.

A window is `log_every_n_steps` optimizer steps (Lightning's own setting unless given). The
callbacks measure inside the window without any collective or device synchronisation, then
gather and log once when it closes. Every emitted value is also kept in `history`, so the run
report can plot a run without reading the logger back.
"""
from __future__ import annotations

from abc import ABCMeta, abstractmethod
from typing import Any, Optional

import lightning as L
from lightning.pytorch.callbacks import Callback

from .accounting import ConsumedTokens
from .timing import WindowTimer


class WindowedMetrics(Callback, metaclass=ABCMeta):
    """Subclasses implement `window_metrics` and, as needed, the per-micro-batch and
    per-optimizer-step hooks; the base class finds step and window boundaries."""

    def __init__(self, log_every_n_steps: Optional[int] = None) -> None:
        self.log_every_n_steps = log_every_n_steps
        self.history: list[tuple[int, dict[str, float]]] = []
        self.timer = WindowTimer()
        self._every = 1
        self._last_step = 0
        self._steps_in_window = 0
        self._paused_for_validation = False

    # -- hooks for subclasses -------------------------------------------------------------
    def start_window(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Reset the window's accumulators (the timer is restarted by the base class)."""

    def micro_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Account for one micro-batch (its forward and backward have run)."""

    def optimizer_step_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Account for one completed optimizer step."""

    @abstractmethod
    def window_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule,
                       steps: int) -> dict[str, float]:
        """The window's metrics; called on every rank at the same point (collectives allowed)."""

    def after_emit(self, pl_module: L.LightningModule, metrics: dict[str, float]) -> None:
        """Called after a window closed inside a training batch hook (where self.log works)."""

    # -- Lightning hooks ------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._every = self.log_every_n_steps or trainer.log_every_n_steps or 1
        self._last_step = trainer.global_step
        self._steps_in_window = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        if not self.timer.running:
            self._open(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        self.micro_batch_end(trainer, pl_module)
        if trainer.global_step == self._last_step:
            return  # gradients are still accumulating
        self._last_step = trainer.global_step
        self._steps_in_window += 1
        self.optimizer_step_end(trainer, pl_module)
        if trainer.global_step % self._every == 0:
            metrics = self.flush(trainer, pl_module)
            if metrics:
                self.after_emit(pl_module, metrics)
            self._open(trainer, pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._paused_for_validation = self.timer.running
        self.timer.pause()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._paused_for_validation:
            self.timer.resume()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.flush(trainer, pl_module)

    # -- window bookkeeping ---------------------------------------------------------------
    def flush(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Close the current window if it holds any step: gather, log, keep in history.

        Must be called on every rank at the same point. Idempotent: a second call finds an
        empty window and does nothing, so the run report can flush before reading history.
        """
        if self._steps_in_window == 0:
            return {}
        metrics = self.window_metrics(trainer, pl_module, self._steps_in_window)
        self._steps_in_window = 0
        self.timer.pause()
        if metrics:
            self.emit(trainer, metrics)
        return metrics

    def emit(self, trainer: L.Trainer, metrics: dict[str, float]) -> None:
        step = trainer.global_step
        self.history.append((step, dict(metrics)))
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    def _open(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start_window(trainer, pl_module)
        self.timer.start(pl_module.device)


class TokenCountingMetrics(WindowedMetrics):
    """Windowed metrics that also count the tokens the model really consumed on this rank
    (after any context-parallel split), through accounting.ConsumedTokens."""

    def __init__(self, log_every_n_steps: Optional[int] = None) -> None:
        super().__init__(log_every_n_steps)
        self._consumed = ConsumedTokens()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._consumed.attach(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._consumed.detach()
