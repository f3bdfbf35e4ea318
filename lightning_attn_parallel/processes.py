"""This rank's process group, started as every front-end of the package needs it: the backend for
the device, NCCL's fault settings, a bounded timeout, and the heartbeat that names dead peers
(faults.py)."""
from __future__ import annotations

import atexit
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist
from lightning.fabric.utilities.distributed import (
    _destroy_dist_connection,
    _get_default_process_group_backend_for_device,
    _init_dist_connection,
)

from .faults import Heartbeat, configure_nccl, start_heartbeat


def start_process_group(cluster_environment: Any, device: torch.device, backend: Optional[str],
                        timeout: timedelta) -> tuple[str, Optional[Heartbeat]]:
    """Join the world through Lightning's rendezvous; return (backend, heartbeat)."""
    backend = backend or _get_default_process_group_backend_for_device(device)
    kwargs: dict[str, Any] = {"timeout": timeout}
    if device.type == "cuda":
        kwargs["device_id"] = device
    if backend == "nccl":
        configure_nccl()
    if cluster_environment.world_size() == 1 and not dist.is_initialized():
        # One process needs no rendezvous: an in-memory store instead of a TCP port, which another
        # program (or a lingering test process) may hold between Lightning choosing it and binding.
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **kwargs)
        if backend == "nccl":
            atexit.register(_destroy_dist_connection)
    else:
        _init_dist_connection(cluster_environment, backend, **kwargs)
    return backend, start_heartbeat(timeout)


__all__ = ["start_process_group"]
