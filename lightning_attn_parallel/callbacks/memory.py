"""Current and peak memory of every rank, with the peak reset at each window.

On a GPU these are the caching allocator's figures: allocated (live tensors) and reserved (held
by the allocator, what nvidia-smi roughly shows). The CPU has no caching allocator: both report
the process's resident set size, current (VmRSS) and peak (VmHWM), read from /proc; the peak is
reset through /proc/self/clear_refs. Without /proc the lifetime peak RSS from getrusage stands
in for all four.
"""
from __future__ import annotations

import resource
import sys
import lightning as L
import torch

from . import metrics as m
from .base import WindowedMetrics
from .distributed import gather_rows

GIB = float(1 << 30)


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} missing from /proc/self/status")


def _cpu_memory_gib() -> tuple[float, float, float, float]:
    try:
        current = _proc_status_kib("VmRSS") * 1024 / GIB
        peak = _proc_status_kib("VmHWM") * 1024 / GIB
    except OSError:
        max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        current = peak = max_rss * (1 if sys.platform == "darwin" else 1024) / GIB
    return current, current, peak, peak


def memory_gib(device: torch.device) -> tuple[float, float, float, float]:
    """(allocated, reserved, peak allocated, peak reserved) of this process on `device`, GiB."""
    if device.type == "cuda":
        return (torch.cuda.memory_allocated(device) / GIB, torch.cuda.memory_reserved(device) / GIB,
                torch.cuda.max_memory_allocated(device) / GIB,
                torch.cuda.max_memory_reserved(device) / GIB)
    return _cpu_memory_gib()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # Linux: reset the peak resident set size to the current one
    except OSError:
        pass  # no /proc: the peak stays the lifetime peak, as documented above


def memory_metrics(rows: list[list[float]]) -> dict[str, float]:
    """The maximum over ranks of each figure of every rank's `memory_gib` row."""
    keys = (m.MEMORY_ALLOCATED, m.MEMORY_RESERVED, m.MEMORY_PEAK_ALLOCATED, m.MEMORY_PEAK_RESERVED)
    return {key: max(row[i] for row in rows) for i, key in enumerate(keys)}


class MemoryCallback(WindowedMetrics):
    """Logs the maximum over ranks of each figure and every rank's peak allocated memory."""

    def start_window(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        reset_peak(pl_module.device)

    def window_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule,
                       steps: int) -> dict[str, float]:
        rows = gather_rows(memory_gib(pl_module.device))
        out = memory_metrics(rows)
        for rank, row in enumerate(rows):
            out[m.per_rank(m.MEMORY_PEAK_ALLOCATED, rank)] = row[2]
        return out
