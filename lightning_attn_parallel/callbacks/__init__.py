"""Observability for training runs: throughput and MFU, memory, load balance, gradient
communication, per-layer profiles, W&B summaries and an end-of-run report."""
from __future__ import annotations

from typing import Optional, Sequence

from lightning.pytorch.callbacks import Callback

from . import metrics
from .base import WindowedMetrics
from .communication import CommunicationCallback
from .load_balance import LoadBalanceCallback
from .memory import MemoryCallback
from .profiler import LayerProfiler
from .report import RunReport
from .throughput import ThroughputCallback
from .wandb_summaries import WandbMetricSummaries


def default_callbacks(*, log_every_n_steps: Optional[int] = None,
                      peak_tflops: Optional[float] = None,
                      profile_steps: Optional[Sequence[int]] = None,
                      run_dir: Optional[str] = None,
                      report: bool = True) -> list[Callback]:
    """The standard set: throughput, memory, load balance, communication and W&B summaries,
    plus the run report (unless report=False) and the profiler when `profile_steps` is given.

    `log_every_n_steps` defaults to the Trainer's; `peak_tflops` overrides the datasheet peak
    used for MFU; `run_dir` overrides the run directory for the report and profiles.
    """
    callbacks: list[Callback] = [
        ThroughputCallback(log_every_n_steps, peak_tflops),
        MemoryCallback(log_every_n_steps),
        LoadBalanceCallback(log_every_n_steps),
        CommunicationCallback(log_every_n_steps),
        WandbMetricSummaries(),
    ]
    if profile_steps:
        callbacks.append(LayerProfiler(profile_steps, run_dir))
    if report:
        callbacks.append(RunReport(run_dir))
    return callbacks


__all__ = ["CommunicationCallback", "LayerProfiler", "LoadBalanceCallback", "MemoryCallback",
           "RunReport", "ThroughputCallback", "WandbMetricSummaries", "WindowedMetrics",
           "default_callbacks", "metrics"]
