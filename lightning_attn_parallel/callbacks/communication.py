"""Gradient communication per optimizer step, from the strategy's gradient reducer.

comm/time_ms is the time the collectives ran, comm/exposed_ms the part the backward pass did not
hide (the step waited for it), comm/hidden_fraction = 1 - exposed / time, and comm/gbytes the
volume this rank sent. Values are this rank's (rank 0's on W&B), averaged over the window.
Strategies without a reducer log nothing here.
"""
from __future__ import annotations

from typing import Mapping, Optional

import lightning as L

from . import metrics as m
from .accounting import gradient_reducer
from .base import WindowedMetrics


def communication_metrics(totals: Mapping[str, float], steps: int) -> dict[str, float]:
    """Per-step means from window totals of the reducer's comm_stats() fields."""
    time_s = totals["comm_time_s"] / steps
    exposed_s = totals["exposed_comm_time_s"] / steps
    out = {m.COMM_TIME_MS: time_s * 1e3, m.COMM_EXPOSED_MS: exposed_s * 1e3,
           m.COMM_GBYTES: totals["bytes"] / steps / 1e9}
    if time_s > 0:
        out[m.COMM_HIDDEN_FRACTION] = min(max(1.0 - exposed_s / time_s, 0.0), 1.0)
    return out


class CommunicationCallback(WindowedMetrics):
    _FIELDS = ("comm_time_s", "exposed_comm_time_s", "bytes")

    def __init__(self, log_every_n_steps: Optional[int] = None) -> None:
        super().__init__(log_every_n_steps)
        self._totals = dict.fromkeys(self._FIELDS, 0.0)
        self._reported = False

    def start_window(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._totals = dict.fromkeys(self._FIELDS, 0.0)
        self._reported = False

    def optimizer_step_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        reducer = gradient_reducer(trainer)
        if reducer is None:
            return
        stats = reducer.comm_stats()
        for key in self._FIELDS:
            self._totals[key] += float(stats.get(key, 0.0))
        self._reported = True

    def window_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule,
                       steps: int) -> dict[str, float]:
        return communication_metrics(self._totals, steps) if self._reported else {}
