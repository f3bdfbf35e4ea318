"""The training and validation loops fitted to the corpus's size, before the Trainer is built.

Lightning checks `val_check_interval` against the batches of one epoch only once fitting has
started, and then stops with a traceback; a validation split smaller than one batch yields no
batch at all (the loaders drop incomplete batches), so validation would silently never run.
Both are decided here, from the data module's window counts: a setting that cannot run is
either adjusted with a printed note or refused with one line naming the fix.
"""
from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, open_dict

from ..errors import UserError


def fit_loops_to_data(cfg: DictConfig, datamodule: Any, replicas: int) -> list[str]:
    """Check and adjust `cfg.trainer` (and the data module's validation batch size) to the
    windows the data holds for `replicas` data-parallel ranks; return the notes to print."""
    datamodule.setup("fit")
    t, d = cfg.trainer, cfg.data
    where = f"data.path={d.path!r}" if d.get("path") else f"the {d.source} data"
    train_windows = len(datamodule.train_set)
    batches = train_windows // replicas // d.micro_batch_size
    if batches == 0:
        raise UserError(f"{where} fills {train_windows} training windows of data.seq_len={d.seq_len}, fewer "
                        f"than one batch (data.micro_batch_size={d.micro_batch_size} x {replicas} "
                        "data-parallel rank(s)): lower data.micro_batch_size or data.seq_len, or add documents")
    notes = []
    if t.limit_val_batches not in (0, 0.0):
        val_windows = len(datamodule.val_set) // replicas
        if val_windows == 0:
            raise UserError(f"{where} has {len(datamodule.val_set)} validation window(s), fewer than the "
                            f"{replicas} data-parallel ranks: prepare it with a larger --val-fraction, or "
                            "set trainer.limit_val_batches=0 to train without validation")
        if val_windows < d.micro_batch_size:
            datamodule.val_micro_batch_size = val_windows
            notes.append(f"note: the validation split holds {len(datamodule.val_set)} window(s), less than "
                         f"one batch of data.micro_batch_size={d.micro_batch_size} per rank: validating on "
                         f"batches of {val_windows}")
    interval = t.val_check_interval
    if isinstance(interval, int) and t.check_val_every_n_epoch is not None and interval > batches:
        total = t.max_steps * t.accumulate_grad_batches if t.max_steps > 0 else interval
        adjusted = min(interval, total)
        with open_dict(t):
            t.check_val_every_n_epoch = None
            t.val_check_interval = adjusted
        notes.append(f"note: trainer.val_check_interval={interval} is more than the {batches} batches of one "
                     f"epoch of {where}: validating every {adjusted} batches counted across epochs "
                     "(trainer.check_val_every_n_epoch=null)")
    if t.log_every_n_steps > batches:  # Lightning warns that such an epoch logs nothing
        with open_dict(t):
            t.log_every_n_steps = batches
        notes.append(f"note: logging every {batches} steps, the batches of one epoch of {where} "
                     f"(trainer.log_every_n_steps={batches})")
    return notes


__all__ = ["fit_loops_to_data"]
