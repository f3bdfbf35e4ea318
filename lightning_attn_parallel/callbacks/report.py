"""End-of-training report: PNG plots over steps and a short markdown summary.

Written by rank 0 into the run directory (see run_dir.py) from the values the metric callbacks
logged, so the report and the dashboard show the same numbers, and a run that never reached
W&B (offline, air-gapped cluster) still leaves a readable record next to its checkpoints.
"""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import lightning as L
from lightning.pytorch.callbacks import Callback
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from . import metrics as m
from .base import WindowedMetrics
from .run_dir import resolve_run_dir

Series = dict[str, tuple[list[int], list[float]]]


def collect_series(trainer: L.Trainer) -> Series:
    """Every metric the windowed callbacks emitted, as (steps, values)."""
    series: dict[str, tuple[list[int], list[float]]] = defaultdict(lambda: ([], []))
    for callback in trainer.callbacks:
        if isinstance(callback, WindowedMetrics):
            for step, values in callback.history:
                for key, value in values.items():
                    series[key][0].append(step)
                    series[key][1].append(value)
    return dict(series)


def _per_rank_keys(series: Series, prefix: str) -> list[str]:
    keys = [k for k in series if k.startswith(prefix + "/rank")]
    return sorted(keys, key=lambda k: int(k.rsplit("rank", 1)[1]))


def plot_panels(path: Path, title: str,
                panels: Sequence[tuple[str, str, Mapping[str, tuple[list[int], list[float]]]]]) -> bool:
    """One PNG with a subplot per (subtitle, y label, {line label: (steps, values)}); panels
    without data are left out and nothing is written when none has data."""
    panels = [p for p in panels if p[2]]
    if not panels:
        return False
    figure = Figure(figsize=(5.5 * len(panels), 4.0), dpi=100)
    FigureCanvasAgg(figure)
    for index, (subtitle, ylabel, lines) in enumerate(panels):
        axes = figure.add_subplot(1, len(panels), index + 1)
        for label, (steps, values) in lines.items():
            axes.plot(steps, values, marker="o", markersize=3, label=label)
        axes.set_title(subtitle)
        axes.set_xlabel("optimizer step")
        axes.set_ylabel(ylabel)
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path)
    return True


def _pick(series: Series, *keys: str, labels: Optional[Sequence[str]] = None) -> dict:
    labels = labels or [k.rsplit("/", 1)[-1] for k in keys]
    return {label: series[key] for label, key in zip(labels, keys) if key in series}


def write_plots(directory: Path, series: Series) -> list[Path]:
    """loss.png, throughput.png, mfu.png, memory.png and load_balance.png, for the metrics present."""
    mfu = {}
    if m.MFU in series:
        steps, values = series[m.MFU]
        mfu["MFU"] = (steps, [100 * v for v in values])
    figures = {
        "loss.png": ("Loss", [("loss", "cross-entropy", _pick(series, m.TRAIN_LOSS, m.VAL_LOSS,
                                                             labels=["train", "validation"]))]),
        "throughput.png": ("Throughput", [
            ("global", "tokens/s", _pick(series, m.TOKENS_PER_S)),
            ("per GPU", "tokens/s", _pick(series, m.TOKENS_PER_S_PER_GPU)),
            ("model FLOPs per GPU", "TFLOP/s", _pick(series, m.TFLOPS_PER_GPU))]),
        "mfu.png": ("Model FLOPs utilisation", [("MFU", "% of peak", mfu)]),
        "memory.png": ("Memory (max over ranks)", [
            ("current", "GiB", _pick(series, m.MEMORY_ALLOCATED, m.MEMORY_RESERVED)),
            ("peak per window", "GiB", _pick(series, m.MEMORY_PEAK_ALLOCATED, m.MEMORY_PEAK_RESERVED))]),
        "load_balance.png": ("Load balance", [
            ("imbalance (max - min) / mean", "imbalance",
             _pick(series, *(m.imbalance(q) for q in m.BALANCE_QUANTITIES))),
            ("busy time per step", "s",
             {k.rsplit("/", 1)[-1]: series[k] for k in _per_rank_keys(series, m.BALANCE_STEP_TIME)})]),
    }
    written = []
    for name, (title, panels) in figures.items():
        if plot_panels(directory / name, title, panels):
            written.append(directory / name)
    return written


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def format_summary(series: Series, losses: Mapping[str, float], last_step: int,
                   world_size: int, plots: Sequence[Path]) -> str:
    rows = [(key, "mean", _mean(series[key][1])) for key in m.SUMMARY_MEAN if key in series]
    rows += [(key, "peak", max(series[key][1])) for key in m.SUMMARY_MAX if key in series]
    rows += [(m.imbalance(q), "mean", _mean(series[m.imbalance(q)][1]))
             for q in m.BALANCE_QUANTITIES if m.imbalance(q) in series]
    rows += [(key, "mean", _mean(series[key][1]))
             for key in (m.COMM_TIME_MS, m.COMM_EXPOSED_MS, m.COMM_HIDDEN_FRACTION) if key in series]
    rows += [(f"final {key}", "last", value) for key, value in sorted(losses.items())]
    lines = ["# Run report", "", f"Optimizer steps: {last_step}; ranks: {world_size}.", "",
             "| metric | statistic | value |", "|---|---|---|"]
    lines += [f"| {key} | {stat} | {value:.6g} |" for key, stat, value in rows]
    lines += [""] + [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(lines) + "\n"


class RunReport(Callback):
    """At the end of training, writes <run dir>/report/{*.png, summary.md} (rank 0).

    The loss curve comes from the values Lightning logged (`trainer.callback_metrics`): each is
    kept as it appears, at the log interval, and read back to the host only at the end, so
    no step waits for the GPU."""

    def __init__(self, run_dir: Optional[str] = None) -> None:
        self.run_dir = run_dir
        self.report_dir: Optional[Path] = None
        self.losses: dict[str, list[tuple[int, Any]]] = {m.TRAIN_LOSS: [], m.VAL_LOSS: []}

    def _keep_loss(self, trainer: L.Trainer, key: str) -> None:
        value = trainer.callback_metrics.get(key)
        points = self.losses[key]
        if value is not None and (not points or points[-1][1] is not value):
            points.append((trainer.global_step, value))

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step % max(trainer.log_every_n_steps, 1) == 0:  # a point per log interval
            self._keep_loss(trainer, m.TRAIN_LOSS)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._keep_loss(trainer, m.VAL_LOSS)

    def loss_series(self) -> Series:
        return {key: ([s for s, _ in points], [float(v) for _, v in points])
                for key, points in self.losses.items() if points}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for callback in trainer.callbacks:  # close partial windows whatever the callback order
            if isinstance(callback, WindowedMetrics):
                callback.flush(trainer, pl_module)
        directory = resolve_run_dir(trainer, self.run_dir) / "report"
        if not trainer.is_global_zero:
            return
        directory.mkdir(parents=True, exist_ok=True)
        self._keep_loss(trainer, m.TRAIN_LOSS)  # the last logged value
        series = {**collect_series(trainer), **self.loss_series()}
        plots = write_plots(directory, series)
        losses = {k: float(v) for k, v in trainer.callback_metrics.items() if "loss" in k}
        summary = format_summary(series, losses, trainer.global_step, trainer.world_size, plots)
        (directory / "summary.md").write_text(summary)
        self.report_dir = directory
