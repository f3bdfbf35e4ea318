"""A progress bar that does not stall the GPU every step.

Lightning converts every value logged with `prog_bar=True` to a Python number after each batch
(its progress-bar metrics), whether or not a bar refreshes then. For a loss on the GPU that is a
device-to-host copy each step: the host waits for the queue to drain and the GPU then idles
until the next step is launched. This bar instead reads the step loss from the callback metrics
(kept as tensors) when it refreshes, every `refresh_rate` steps, and `CausalLMModule` leaves the
loss off Lightning's progress-bar metrics when it sees this bar.
"""
from __future__ import annotations

from typing import Any, Union

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar

from .metrics import TRAIN_LOSS


class StepLossProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar, with the step loss read back only when the bar refreshes."""

    shows_step_loss = True

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Union[int, str, float, dict[str, float]]]:
        items: dict[str, Any] = super().get_metrics(trainer, pl_module)
        loss = trainer.callback_metrics.get(TRAIN_LOSS)
        if loss is not None:
            items[TRAIN_LOSS] = f"{float(loss):.3g}"
        return items


def loss_on_progress_bar(trainer: Any) -> bool:
    """Whether the step loss must be logged with `prog_bar=True` to be seen: only under a bar
    that does not read it itself (no bar at all: nothing would show it)."""
    bar = getattr(trainer, "progress_bar_callback", None)
    return bar is not None and not getattr(bar, "shows_step_loss", False)


__all__ = ["StepLossProgressBar", "loss_on_progress_bar"]
