"""Rows grouped by expert, laid out again so that every group's size is a multiple of M.

fp8 grouped GEMMs need each expert's row count to be a multiple of 16 (16-byte alignment at one
byte an element; torchao 0.18's own padding is not built yet). The padded layout has a size
fixed by the row count and the number of groups alone, so a compiled graph keeps static shapes
and nothing is read back to the host. Padding rows are zeros: with rowwise scales they change
no other row's scale, and their outputs and gradients are dropped, so the padded GEMM equals
the unpadded one row for row.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class PaddedGroups(NamedTuple):
    rows: torch.Tensor  # (N,) int64: where each grouped row sits in the padded layout
    ends: torch.Tensor  # (G,) int32: the padded groups' end offsets (the last ends at `capacity`)
    capacity: int  # rows of the padded layout


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


def padded_groups(counts: torch.Tensor, n_rows: int, multiple: int) -> PaddedGroups:
    """The padded layout of `n_rows` rows grouped by `counts` (G,).

    Each group grows to a multiple of `multiple`, and an empty group to `multiple` rows (as
    TorchTitan pads them: grouped GEMM kernels are not all tested on empty groups). The last
    group also takes the slack up to `capacity`, so the groups cover the layout exactly.
    """
    g = counts.numel()
    capacity = _round_up(n_rows, multiple) + g * multiple
    sizes = torch.clamp_min((counts + multiple - 1) // multiple * multiple, multiple)
    padded_starts = sizes.cumsum(0) - sizes
    starts = counts.cumsum(0) - counts
    group = torch.repeat_interleave(torch.arange(g, device=counts.device), counts, output_size=n_rows)
    rows = torch.arange(n_rows, device=counts.device) + (padded_starts - starts)[group]
    ends = torch.cat([padded_starts[1:], padded_starts.new_full((1,), capacity)])
    return PaddedGroups(rows, ends.to(torch.int32), capacity)


def pad_rows(x: torch.Tensor, layout: PaddedGroups) -> torch.Tensor:
    """x (N, D) in the padded layout (capacity, D), zeros between the groups."""
    return x.new_zeros(layout.capacity, x.shape[-1]).index_copy(0, layout.rows, x)


def unpad_rows(padded: torch.Tensor, layout: PaddedGroups) -> torch.Tensor:
    """The grouped rows of `padded` back in their original order (N, D)."""
    return padded.index_select(0, layout.rows)


__all__ = ["PaddedGroups", "padded_groups", "pad_rows", "unpad_rows"]
