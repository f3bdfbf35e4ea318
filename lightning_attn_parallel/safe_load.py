"""Every checkpoint file the package reads is unpickled with torch.load(weights_only=True).

A pickle can name any importable callable and call it while loading, so a checkpoint shared
between teams or downloaded would be code that runs at load time. torch's weights-only unpickler
(its default since 2.6, which Lightning follows) accepts tensors, containers and plain values,
plus the classes registered as safe globals: here the package's own configuration types and
Lightning's, which a checkpoint's hyper-parameters may hold. A file that needs anything else is
refused with one line naming it and the global it asked for, before that global is touched.
"""
from __future__ import annotations

import os
import pathlib
import pickle
import re
from typing import Any, Union

import torch

from .errors import UserError

PathLike = Union[str, os.PathLike]


class UnsafeCheckpointError(UserError):
    """A checkpoint file that would run code (or import an unknown class) when unpickled."""


def safe_types() -> list[type]:
    """The types a checkpoint of this package may hold beyond torch's weights-only set."""
    from lightning.fabric.utilities.data import AttributeDict

    from .models.config import ModelConfig
    from .plan import ParallelPlan

    return [ModelConfig, ParallelPlan, AttributeDict, pathlib.Path, pathlib.PosixPath,
            pathlib.PurePosixPath]


def load(path: PathLike, mmap: bool = False) -> Any:
    """torch.load of `path` on the CPU, weights only; an UnsafeCheckpointError for a file that
    needs arbitrary unpickling. Other failures (a truncated file) pass through for the caller to
    name."""
    with torch.serialization.safe_globals(safe_types()):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as err:
            if _UNSAFE.search(str(err)) is None:
                raise  # damaged, not unsafe: the caller names it as unreadable
            raise UnsafeCheckpointError(refusal(path, err)) from None


# What torch's weights-only unpickler says when a pickle asks for a callable or class it does not
# allow. An opcode it does not know ("Unsupported operand") is what random bytes give too: that
# file is refused as unreadable (nothing in it runs either way).
_UNSAFE = re.compile(r"Unsupported global|GLOBAL [\w.]+|Unsupported class|not an allowed global")


def refusal(path: PathLike, err: BaseException) -> str:
    """The one line that refuses `path`: what it asked to import, and what to do instead."""
    wanted = re.search(r"GLOBAL ([\w.]+)", str(err))
    what = f"it imports {wanted.group(1)}" if wanted else "it holds objects beyond tensors and plain values"
    return (f"checkpoint {str(path)!r} needs arbitrary unpickling ({what}) and is refused: loading it "
            "could run code; use a checkpoint saved by this package, or if you trust the file, re-save "
            "its tensors and plain values with torch.save and load that")


__all__ = ["UnsafeCheckpointError", "load", "safe_types", "refusal"]
