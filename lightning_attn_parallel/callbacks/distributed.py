"""Small collectives for metrics.

W&B's logger writes only from rank 0, so a figure that depends on other ranks (their tokens,
their step time, their memory) has to be gathered first. Calls go straight to torch.distributed
so they work under any strategy that has initialised a process group, and fall back to the
local values in a single process.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist


def _collective_device() -> torch.device:
    backend = str(dist.get_backend())
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_rows(values: Sequence[float]) -> list[list[float]]:
    """Every rank's `values` (same length on all ranks), indexed by rank.

    One all_gather of a float64 vector per call: a few bytes once per logging window.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return [list(map(float, values))]
    local = torch.tensor(list(values), dtype=torch.float64, device=_collective_device())
    rows = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, local)
    return [row.tolist() for row in rows]
