"""Wall time of a logging window without a device synchronisation every step.

On a GPU the host runs ahead of the device, so host timestamps measure launch time, not work.
CUDA events are recorded on the stream instead and read once at the end of the window (one
synchronisation per window). On the CPU, time.perf_counter is exact.
"""
from __future__ import annotations

import time
from typing import Union

import torch

_Mark = Union[float, "torch.cuda.Event"]


class WindowTimer:
    """Sums the running segments of a window; pause() leaves out e.g. validation."""

    def __init__(self) -> None:
        self._segments: list[tuple[_Mark, _Mark]] = []
        self._open: _Mark | None = None
        self._cuda = False

    @property
    def running(self) -> bool:
        return self._open is not None

    def start(self, device: torch.device) -> None:
        """Begin a new window on `device` (a CUDA device records events on its current stream)."""
        self._segments = []
        self._open = None
        self._cuda = device.type == "cuda"
        self.resume()

    def resume(self) -> None:
        if self._open is None:
            self._open = self._mark()

    def pause(self) -> None:
        if self._open is not None:
            self._segments.append((self._open, self._mark()))
            self._open = None

    def elapsed_s(self) -> float:
        """Seconds run since start(), less paused spans; closes the current segment."""
        self.pause()
        if not self._segments:
            return 0.0
        if self._cuda:
            self._segments[-1][1].synchronize()
            return sum(s.elapsed_time(e) for s, e in self._segments) / 1e3
        return sum(e - s for s, e in self._segments)

    def _mark(self) -> _Mark:
        if self._cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()
