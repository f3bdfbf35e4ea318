"""Where a run's files (profiles, report) go.

By default the W&B run's files directory when a WandbLogger is attached, so the files are
uploaded with the run when it syncs; otherwise trainer.log_dir. Rank 0 decides and broadcasts,
because other ranks' WandbLogger has no real run behind it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import lightning as L
from lightning.pytorch.loggers import WandbLogger


def resolve_run_dir(trainer: L.Trainer, explicit: Optional[str] = None) -> Path:
    """The run directory, created; call on every rank (it broadcasts)."""
    if explicit:
        path = Path(explicit)
    else:
        wandb_dir = None
        if trainer.is_global_zero:
            loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
            wandb_dir = loggers[0].experiment.dir if loggers else None
        wandb_dir = trainer.strategy.broadcast(wandb_dir)
        path = Path(wandb_dir or trainer.log_dir or trainer.default_root_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path
