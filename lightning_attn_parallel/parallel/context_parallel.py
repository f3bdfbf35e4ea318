"""Context parallelism: the sequence is split across the ranks of a CP group, attention stays exact.

The model is untouched: `apply_context_parallel` swaps each block's `attention.kernel` for a
`ContextParallelAttention`, which keeps the original kernel for batches that run
batch-parallel on the CP ranks instead. All kernels of a model share one `ContextParallelSwitch`,
so the batch layout switches every layer (on, off, or onto a sub-group) with one assignment.

Layout. With load balancing (head-tail, or "zig-zag") the sequence is cut into 2*cp chunks
and rank r holds chunks r and 2*cp-1-r, so every rank does the same causal work; without it,
rank r holds the r-th of cp contiguous pieces. Lengths must divide evenly: the data pipeline
pads (or packs) to a multiple of 2*cp (cp without load balancing) rather than this module
padding silently, because padding changes which tokens count in the loss.

torch.distributed.tensor.experimental.context_parallel exists, but it does not run on gloo/CPU
(so it could not be tested against a single process in CI) and it patches SDPA globally rather
than filling the model's kernel slot; so the kernels are written here (cp_kernels.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from ..models.layers import LocalAttentionKernel
from ..plan import CP_KERNELS
from .cp_kernels import (BlockPlan, allgather_attention, check_ulysses_heads, document_layout,
                         ring_attention, ring_block_plan, ulysses_attention)


# ---------------------------------------------------------------------------------------------
# layout


def _check_divisible(seq_len: int, cp_size: int, load_balance: bool) -> None:
    multiple = 2 * cp_size if load_balance else cp_size
    if seq_len % multiple:
        how = f"2 x cp={cp_size} with load balancing" if load_balance else f"cp={cp_size}"
        raise ValueError(
            f"sequence length {seq_len} does not split evenly over context parallelism "
            f"({how}): pad or pack sequences to a multiple of {multiple}")


def context_parallel_chunks(seq_len: int, cp_rank: int, cp_size: int,
                            load_balance: bool) -> list[tuple[int, int]]:
    """Global [start, stop) token ranges held by `cp_rank`, in local order."""
    _check_divisible(seq_len, cp_size, load_balance)
    if not load_balance:
        size = seq_len // cp_size
        return [(cp_rank * size, (cp_rank + 1) * size)]
    size = seq_len // (2 * cp_size)
    tail = 2 * cp_size - 1 - cp_rank
    return [(cp_rank * size, (cp_rank + 1) * size), (tail * size, (tail + 1) * size)]


def shard_for_context_parallel(tensor: torch.Tensor, dim: int, cp_rank: int, cp_size: int,
                               load_balance: bool) -> torch.Tensor:
    """This rank's part of `tensor` along its sequence dim `dim`."""
    chunks = context_parallel_chunks(tensor.shape[dim], cp_rank, cp_size, load_balance)
    return torch.cat([tensor.narrow(dim, start, stop - start) for start, stop in chunks], dim=dim)


def context_parallel_positions(seq_len: int, cp_rank: int, cp_size: int, load_balance: bool,
                               device: Optional[torch.device] = None) -> torch.Tensor:
    """Global positions (LongTensor) of this rank's tokens, for RoPE and masks."""
    chunks = context_parallel_chunks(seq_len, cp_rank, cp_size, load_balance)
    return torch.cat([torch.arange(start, stop, device=device) for start, stop in chunks])


@dataclass
class _Layout:
    """Everything the kernels need about one local length, built once per (length, device)."""

    positions: list[torch.Tensor]  # per rank
    chunks: list[list[tuple[int, int]]]  # per rank: the global token ranges it holds
    ring_plans: list[Optional[BlockPlan]]  # per source rank, for the local queries
    ulysses_order: Optional[tuple[torch.Tensor, torch.Tensor]]  # rank order <-> position order


def _build_layout(local_len: int, rank: int, cp_size: int, load_balance: bool,
                  device: torch.device) -> _Layout:
    if load_balance and local_len % 2:
        raise ValueError(
            f"local sequence length {local_len} is odd, so it cannot hold the two load-balanced "
            f"chunks: shard with shard_for_context_parallel(load_balance=True) from a sequence "
            f"padded to a multiple of {2 * cp_size}")
    seq_len = local_len * cp_size
    chunks = [context_parallel_chunks(seq_len, r, cp_size, load_balance) for r in range(cp_size)]
    positions = [context_parallel_positions(seq_len, r, cp_size, load_balance, device)
                 for r in range(cp_size)]
    gathered = torch.cat(positions)
    order = None
    if load_balance and cp_size > 1:
        to_natural = torch.argsort(gathered)
        order = (to_natural, torch.argsort(to_natural))
    return _Layout(
        positions=positions,
        chunks=chunks,
        ring_plans=[ring_block_plan(chunks[rank], chunks[src]) for src in range(cp_size)],
        ulysses_order=order,
    )


# ---------------------------------------------------------------------------------------------
# the kernel


@dataclass
class ContextParallelSwitch:
    """How the context-parallel kernels of one model run the current batch: over `group` when
    `active` (the CP group, or a sub-group when a micro-batch needs a lower degree), else each CP
    rank runs the local kernel on the whole, shorter sequences it holds. One object is shared by
    every kernel of a model."""

    group: Optional[dist.ProcessGroup]
    active: bool = True


class ContextParallelAttention(nn.Module):
    """Causal attention kernel for a sequence sharded over `group` with
    `shard_for_context_parallel(..., load_balance)`.

    Same call as the local kernel: q (B, Hq, S_local, Dqk), k (B, Hkv, S_local, Dqk),
    v (B, Hkv, S_local, Dv) -> (B, Hq, S_local, Dv), exactly the local rows of causal attention
    over the whole sequence. The `positions` argument is not read while active: the layout fixes
    every rank's positions, and deriving them locally spares a collective and a host sync per
    layer (the causal mask depends only on the order of positions, so an offset is harmless).

    `switch` (shared by the model's kernels) says per batch whether to run over a CP group, and
    which: inactive, `local_kernel` runs on the local data as it is, for batches that run
    batch-parallel on the CP ranks.

    Packed documents (`document_ids` (B, S_local) given, with per-document `positions`): a token
    sees the earlier tokens of its own document only, whatever the layout - the kernels read
    every rank's ids and positions, gathered once per batch (`document_layout`).
    """

    causal = True

    def __init__(self, group: Optional[dist.ProcessGroup], kernel: str = "allgather",
                 load_balance: bool = True, scale: Optional[float] = None,
                 local_kernel: Optional[nn.Module] = None,
                 switch: Optional[ContextParallelSwitch] = None) -> None:
        super().__init__()
        _check_kernel(kernel)
        if local_kernel is None:
            local_kernel = LocalAttentionKernel()
            local_kernel.scale = scale
        self.switch = switch if switch is not None else ContextParallelSwitch(group)
        self.kernel = kernel
        self.load_balance = load_balance
        self.scale = scale
        self.local_kernel = local_kernel
        self._layouts: dict[tuple, _Layout] = {}

    @property
    def active(self) -> bool:
        return self.switch.active

    @property
    def group(self) -> Optional[dist.ProcessGroup]:
        return self.switch.group

    def extra_repr(self) -> str:
        return f"kernel={self.kernel!r}, load_balance={self.load_balance}, active={self.active}"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                positions: Optional[torch.Tensor] = None,
                document_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not self.switch.active:
            return self._local(q, k, v, positions, document_ids)
        if document_ids is not None:
            return self._documents(q, k, v, positions, document_ids)
        layout = self._layout(q.shape[2], q.device)
        if self.kernel == "allgather":
            return allgather_attention(q, k, v, layout.chunks, self.scale, self.group)
        if self.kernel == "ring":
            return ring_attention(q, k, v, layout.ring_plans, layout.positions, self.scale, self.group)
        return ulysses_attention(q, k, v, layout.ulysses_order, self.scale, self.group)

    def _local(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               positions: Optional[torch.Tensor],
               document_ids: Optional[torch.Tensor]) -> torch.Tensor:
        if document_ids is None:
            return self.local_kernel(q, k, v, positions)
        return self.local_kernel(q, k, v, positions, document_ids=document_ids)

    def _documents(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   positions: Optional[torch.Tensor], document_ids: torch.Tensor) -> torch.Tensor:
        layout = document_layout(positions, document_ids, self.group)
        if self.kernel == "allgather":
            return allgather_attention(q, k, v, layout, self.scale, self.group)
        if self.kernel == "ring":
            return ring_attention(q, k, v, layout, None, self.scale, self.group)
        to_sorted, from_sorted, sorted_ids = layout.ulysses_order()
        # The gathered sequence, sorted so each document is contiguous and in position order, is
        # exactly what the local document-masked kernel computes (its fast path on GPU).
        return ulysses_attention(q, k, v, (to_sorted, from_sorted), self.scale, self.group,
                                 attend=lambda q, k, v: self._local(q, k, v, None, sorted_ids))

    def _layout(self, local_len: int, device: torch.device) -> _Layout:
        key = (local_len, device, self.group)
        if key not in self._layouts:
            rank, size = dist.get_rank(self.group), dist.get_world_size(self.group)
            self._layouts[key] = _build_layout(local_len, rank, size, self.load_balance, device)
        return self._layouts[key]


def _check_kernel(kernel: str) -> None:
    if kernel not in CP_KERNELS:
        raise ValueError(f"context-parallel kernel {kernel!r} is unknown: use one of {CP_KERNELS}")


# ---------------------------------------------------------------------------------------------
# applying it to a model


def apply_context_parallel(model: nn.Module, group: Optional[dist.ProcessGroup],
                           kernel: str = "allgather", load_balance: bool = True) -> nn.Module:
    """Swap every block's attention kernel for a ContextParallelAttention over `group`, all
    sharing one ContextParallelSwitch (`context_parallel_switch(model)`).

    The old kernel (and its softmax `scale`) is kept inside, so a batch can switch back to it;
    applying twice re-wraps the original kernel rather than nesting.
    """
    _check_kernel(kernel)
    switch = ContextParallelSwitch(group)
    for block in model.blocks:
        old = block.attention.kernel
        if isinstance(old, ContextParallelAttention):
            old = old.local_kernel
        block.attention.kernel = ContextParallelAttention(
            group, kernel, load_balance, scale=getattr(old, "scale", None), local_kernel=old,
            switch=switch)
    return model


def context_parallel_switch(model: nn.Module) -> ContextParallelSwitch:
    """The switch the context-parallel kernels of `model` share."""
    return model.blocks[0].attention.kernel.switch


_UNCHANGED = object()


def set_context_parallel_active(model: nn.Module, active: bool, group=_UNCHANGED) -> None:
    """True runs attention context-parallel (the batch is sharded along the sequence) over
    `group` if given (the CP group or one of its sub-groups); False runs the local kernel (each CP
    rank holds whole, shorter sequences)."""
    switch = context_parallel_switch(model)
    switch.active = active
    if group is not _UNCHANGED:
        switch.group = group


def validate_cp(cp: int, kernel: str, n_heads: int, seq_len: int, max_seq_len: int,
                load_balance: bool = True) -> None:
    """Fail before any process group starts, naming the bad value and the fix.

    `n_heads` is the number of query heads each CP rank sees (per tensor-parallel rank).
    """
    if cp < 1:
        raise ValueError(f"context parallel degree cp={cp} is invalid: it must be at least 1")
    _check_kernel(kernel)
    if kernel == "ulysses":
        check_ulysses_heads(n_heads, cp)
    if seq_len > max_seq_len:
        raise ValueError(
            f"sequence length {seq_len} exceeds the model's max_seq_len={max_seq_len}: shorten "
            f"the sequences or raise model.max_seq_len")
    _check_divisible(seq_len, cp, load_balance)


__all__ = [
    "ContextParallelAttention", "ContextParallelSwitch", "apply_context_parallel",
    "context_parallel_switch", "set_context_parallel_active", "shard_for_context_parallel",
    "context_parallel_positions", "context_parallel_chunks", "validate_cp",
]
