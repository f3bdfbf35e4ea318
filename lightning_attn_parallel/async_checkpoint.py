"""Asynchronous checkpoint folders: training goes on while the files are written.

`torch.distributed.checkpoint.async_save` copies the state to host memory (pinned on CUDA, the
buffers kept from one save to the next: torch's DefaultStager) and writes it from a background
thread; training waits only for the copy. On top of it:
- one save in flight: a new save first completes the previous one;
- the previous checkpoint stays until the new one is complete: the new one is written to
  `<path>.tmp`, and rank 0 adds `extra.pt` and renames it over `path` only once every rank's
  shards and the metadata are written (checkpoint.py's rename, as for a blocking save);
- a failure of the background write is reported on every rank at the next step (`poll`): one
  CheckpointError naming the path and the free bytes (and the reason: read-only, full, ...), and
  the partial folder is removed;
- files that Lightning's ModelCheckpoint retires (top-k by its monitored metric, older "last"
  versions) are removed only once the save in flight is complete (`remove_later`).

The background thread's collectives go over a gloo group of their own, and the per-step poll
over another, so neither meets the training thread's collectives on the same group.
"""
from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from .checkpoint import (EXTRA_FILE, _raise_if_any, _remove, _replace, _save_error, check_free_space,
                         state_bytes)
from .safe_load import PathLike


@dataclass
class _InFlight:
    path: Path
    tmp: Path
    extra: dict
    leader: bool
    future: Future
    removals: list[Path] = field(default_factory=list)

    def finish(self) -> None:
        """Rank 0, once every rank has written: add extra.pt and rename the folder into place."""
        torch.save(self.extra, self.tmp / EXTRA_FILE)
        _replace(self.tmp, self.path)


def _failure(path: Path, step) -> Optional[str]:
    """None if `step()` succeeds, else the save error naming `path` (shared with every rank)."""
    try:
        step()
    except Exception as err:  # noqa: BLE001 - DCP gathers every rank's failure
        return _save_error(path, err)
    return None


class AsyncSaves:
    """The strategy's asynchronous saves (collective calls: every rank makes each)."""

    def __init__(self) -> None:
        self._in_flight: Optional[_InFlight] = None
        self._groups: Optional[tuple[Any, Any]] = None  # (background writes, polling)
        self._stager: Any = None

    @property
    def in_flight(self) -> bool:
        return self._in_flight is not None

    def save(self, path: PathLike, state: dict, extra: dict, leader: bool) -> None:
        """Start writing `state` ({"model": ..., "optimizers": ...}) to `path`; returns once it is
        copied to host memory. Completes the save before it first."""
        self.wait()
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        error = None
        try:
            check_free_space(path, state_bytes(state) + state_bytes(extra))
            if leader:
                _remove(tmp)
                tmp.mkdir(parents=True)
        except Exception as err:  # noqa: BLE001 - shared with every rank below
            error = _save_error(path, err)
        _raise_if_any(error, tmp if leader else None)
        writes, _ = self._process_groups()
        response = dcp.async_save(state, checkpoint_id=str(tmp), process_group=writes, async_stager=self._staging())
        future = getattr(response, "upload_completion", response)
        self._in_flight = _InFlight(path, tmp, extra, leader, future)

    def remove_later(self, path: PathLike) -> bool:
        """Defer removing `path` until the save in flight is complete; False if none is."""
        if self._in_flight is None:
            return False
        self._in_flight.removals.append(Path(path))
        return True

    def poll(self) -> None:
        """At a step boundary: raise a background failure on every rank, or finish a save that
        every rank has written. One small all-reduce while a save is in flight, else nothing."""
        if self._in_flight is None:
            return
        future = self._in_flight.future
        failed = future.done() and future.exception() is not None
        status = torch.tensor([int(failed), int(not future.done())])
        _, polling = self._process_groups()
        if polling is not None:
            dist.all_reduce(status, op=dist.ReduceOp.MAX, group=polling)
        if status[0]:  # some rank's write failed: report it now, without waiting for the others
            pending, self._in_flight = self._in_flight, None
            error = _save_error(pending.path, future.exception()) if failed else None
            _raise_if_any(error, pending.tmp if pending.leader else None)
        elif not status[1]:  # every rank has written: rename it into place
            self.wait()

    def wait(self) -> None:
        """Complete the save in flight (if any): every rank waits for its writes, then rank 0
        renames the folder into place; any rank's failure is raised on every rank."""
        pending, self._in_flight = self._in_flight, None
        if pending is None:
            return
        partial = pending.tmp if pending.leader else None
        _raise_if_any(_failure(pending.path, pending.future.result), partial)  # every rank wrote
        _raise_if_any(_failure(pending.path, pending.finish) if pending.leader else None, partial)
        if pending.leader:
            for old in pending.removals:
                if old != pending.path:
                    _remove(old)

    def close(self) -> None:
        """Complete the save in flight and release the staging buffers."""
        try:
            self.wait()
        finally:
            if self._stager is not None:
                self._stager.close()
                self._stager = None

    def _process_groups(self) -> tuple[Any, Any]:
        if self._groups is None:
            distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
            # created on first use: the first save is made by every rank, so this is collective
            self._groups = (dist.new_group(backend="gloo"), dist.new_group(backend="gloo")) if distributed \
                else (None, None)
        return self._groups

    def _staging(self) -> Any:
        """torch's DefaultStager: pinned host buffers on CUDA, kept between saves; the copy
        finishes before async_save returns, so the next step may change the weights."""
        if self._stager is None:
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

            cuda = torch.cuda.is_available()
            self._stager = DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False,
                                                        use_async_staging=False, use_non_blocking_copy=cuda))
        return self._stager


__all__ = ["AsyncSaves"]
