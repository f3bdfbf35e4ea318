"""Why a folder cannot take a checkpoint: read-only, not permitted, or full, said as such.

A save that fails reports the operating system's reason (the errno of the first OSError in the
failure's chain, or of any rank's failure that torch.distributed.checkpoint gathered), so a
read-only mount is never reported as a lack of space. A probe with a real temporary file tells
before a save whether the folder accepts files: `os.access` says yes to root on a read-only
mount.
"""
from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import Iterator, Optional, Union

PathLike = Union[str, os.PathLike]

# errno -> (what it means for a checkpoint folder, the fix)
REASONS = {
    errno.EROFS: ("its file system is read-only", "save to a writable folder"),
    errno.EACCES: ("permission denied", "save to a folder this user may write, or change its permissions"),
    errno.EPERM: ("operation not permitted", "save to a folder this user may write, or change its permissions"),
    errno.ENOSPC: ("the disk is full", "free space there or save elsewhere"),
    errno.EDQUOT: ("the disk quota is exceeded", "free space in the quota or save elsewhere"),
}


def why_not_writable(folder: PathLike) -> Optional[str]:
    """None when `folder` (an existing folder) accepts a new file, else the reason and the fix."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".lap-write-probe-"):
            return None
    except OSError as err:
        return describe(err) or f"{err.strerror or err}: save to a folder you can write to"


def describe(error: BaseException) -> Optional[str]:
    """'<reason>: <fix>' for the first OSError with a known errno behind `error`, else None."""
    for cause in _causes(error):
        code = cause.errno if isinstance(cause, OSError) else None
        if code not in REASONS:  # torch.save's RuntimeError quotes only the strerror
            code = next((c for c in REASONS if os.strerror(c) in str(cause)), None)
        if code is not None:
            reason, fix = REASONS[code]
            return f"{reason}: {fix}"
    return None


def _causes(error: BaseException) -> Iterator[BaseException]:
    """`error`, its causes and contexts, and the per-rank failures of a DCP CheckpointException
    (a dict of rank -> exception, or a wrapper holding it as `.exc`)."""
    seen: set[int] = set()
    todo = [error]
    while todo:
        current = todo.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        failures = getattr(current, "failures", None)
        if isinstance(failures, dict):
            todo += [getattr(f, "exc", f) for f in failures.values() if isinstance(getattr(f, "exc", f), BaseException)]
        todo += [current.__cause__, current.__context__]


def existing_folder(path: PathLike) -> Path:
    """The nearest folder of `path` (its parent, or the parent's nearest existing ancestor)."""
    folder = Path(path).parent.resolve()
    while not folder.exists():
        folder = folder.parent
    return folder


__all__ = ["why_not_writable", "describe", "existing_folder", "REASONS"]
