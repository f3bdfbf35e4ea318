"""Profile chosen optimizer steps: a Chrome trace and the time per layer type.

`profile_steps=(a, b)` profiles optimizer steps a to b inclusive (numbered by
trainer.global_step when the step starts), so warm-up steps can be skipped. Each rank writes
profile/trace_rank<r>.json (open in chrome://tracing or Perfetto) and
profile/layer_times_rank<r>.md into the run directory.

Rows of the table: attention and mlp/moe add the forward and backward ranges of layer_ranges;
communication adds the self time of collective operators (gloo, NCCL, c10d), which may also sit
inside an attention range under context parallelism, so rows can overlap; other is the profiled
wall time not spent in attention or feed-forward layers (embedding, head, loss, optimizer).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.profiler import ProfilerActivity, profile

from ..errors import rank
from .layer_ranges import BACKWARD_SUFFIX, RANGE_PREFIX, add_layer_ranges
from .run_dir import resolve_run_dir

COMMUNICATION_MARKERS = ("nccl", "gloo", "c10d::", "record_param_comms")


def layer_time_rows(events: Any, wall_ms: float) -> list[dict[str, Any]]:
    """Rows (kind, calls, cpu_ms, device_ms) from profiler key averages (times in us)."""
    layers: dict[str, dict[str, Any]] = {}
    comm = {"kind": "communication", "calls": 0, "cpu_ms": 0.0, "device_ms": 0.0}
    for event in events:
        key = event.key
        if key.startswith(RANGE_PREFIX):
            backward = key.endswith(BACKWARD_SUFFIX)
            kind = key[len(RANGE_PREFIX):].removesuffix(BACKWARD_SUFFIX)
            row = layers.setdefault(kind, {"kind": kind, "calls": 0, "cpu_ms": 0.0, "device_ms": 0.0})
            row["calls"] += 0 if backward else event.count
            row["cpu_ms"] += event.cpu_time_total / 1e3
            row["device_ms"] += event.device_time_total / 1e3
        elif any(marker in key.lower() for marker in COMMUNICATION_MARKERS):
            comm["calls"] += event.count
            comm["cpu_ms"] += event.self_cpu_time_total / 1e3
            comm["device_ms"] += event.self_device_time_total / 1e3
    rows = [layers[k] for k in sorted(layers)] + [comm]
    in_layers = sum(row["cpu_ms"] for row in layers.values())
    rows.append({"kind": "other", "calls": 0, "cpu_ms": max(wall_ms - in_layers, 0.0), "device_ms": 0.0})
    return rows


def format_layer_table(rows: Sequence[dict[str, Any]], wall_ms: float, steps: Sequence[int]) -> str:
    lines = [f"# Time per layer type, optimizer steps {steps[0]}-{steps[-1]}", "",
             f"Profiled wall time: {wall_ms:.1f} ms", "",
             "| layer type | calls | CPU time (ms) | device time (ms) | share of wall time |",
             "|---|---|---|---|---|"]
    for row in rows:
        share = row["cpu_ms"] / wall_ms if wall_ms > 0 else 0.0
        lines.append(f"| {row['kind']} | {row['calls']} | {row['cpu_ms']:.2f} | "
                     f"{row['device_ms']:.2f} | {share:.1%} |")
    return "\n".join(lines) + "\n"


class LayerProfiler(Callback):
    """Runs torch.profiler over `profile_steps` and writes the trace and the layer table.

    `backward_ranges=False` leaves out the backward hooks, for models whose modules do not
    support full backward hooks.
    """

    def __init__(self, profile_steps: Sequence[int] = (3, 4), run_dir: Optional[str] = None,
                 backward_ranges: bool = True) -> None:
        first, last = (int(s) for s in profile_steps)
        if not 0 <= first <= last:
            raise ValueError(f"profile_steps={list(profile_steps)!r} is invalid: "
                             "give [first, last] optimizer steps with 0 <= first <= last")
        self.profile_steps = (first, last)
        self.run_dir = run_dir
        self.backward_ranges = backward_ranges
        self.table_path: Optional[Path] = None
        self.trace_path: Optional[Path] = None
        self._profiler: Optional[profile] = None
        self._handles: list = []
        self._started_at = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        if self._profiler is None and self.table_path is None \
                and trainer.global_step == self.profile_steps[0]:
            self._start(pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._profiler is not None and trainer.global_step > self.profile_steps[1]:
            self._stop(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._profiler is not None:  # training ended inside the profiled steps
            self._stop(trainer, pl_module)

    def _start(self, pl_module: L.LightningModule) -> None:
        activities = [ProfilerActivity.CPU]
        if pl_module.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        self._handles = add_layer_ranges(pl_module.model, backward=self.backward_ranges)
        self._profiler = profile(activities=activities)
        self._profiler.start()
        self._started_at = time.perf_counter()

    def _stop(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        wall_ms = (time.perf_counter() - self._started_at) * 1e3
        self._profiler.stop()
        for handle in self._handles:
            handle.remove()
        self._handles = []
        directory = resolve_run_dir(trainer, self.run_dir) / "profile"
        directory.mkdir(parents=True, exist_ok=True)
        r = rank()
        self.trace_path = directory / f"trace_rank{r}.json"
        self._profiler.export_chrome_trace(str(self.trace_path))
        rows = layer_time_rows(self._profiler.key_averages(), wall_ms)
        self.table_path = directory / f"layer_times_rank{r}.md"
        self.table_path.write_text(format_layer_table(rows, wall_ms, self.profile_steps))
        self._profiler = None
