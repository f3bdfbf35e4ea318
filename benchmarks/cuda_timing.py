"""Milliseconds per call of a GPU function, by CUDA events: the timer of the kernel microbenchmarks."""
from __future__ import annotations

from typing import Callable

import torch


def timed_ms(fn: Callable[[], object], warmup: int = 3, iters: int = 10) -> float:
    """Mean milliseconds of `fn()` over `iters` calls after `warmup` untimed ones (compiles,
    allocator growth), timed on the GPU's own clock between two events."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters
