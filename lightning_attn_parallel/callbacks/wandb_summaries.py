"""Run summaries on W&B that mean something: peak memory as a maximum, speed as a mean.

W&B's default summary is the last value, which for throughput is one noisy window and for
peak memory misses the worst window. define_metric changes that per key; it is called once,
when training starts and the WandbLogger's run exists.
"""
from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger

from . import metrics as m


class WandbMetricSummaries(Callback):
    def __init__(self) -> None:
        self._defined = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._defined or not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                run = logger.experiment
                for key in m.SUMMARY_MAX:
                    run.define_metric(key, step_metric=m.STEP, summary="max")
                for key in m.SUMMARY_MEAN:
                    run.define_metric(key, step_metric=m.STEP, summary="mean")
        self._defined = True
