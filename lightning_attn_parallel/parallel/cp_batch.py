"""Per-batch layout for context parallelism: split the sequence, or split the batch.

All CP ranks of one data-parallel rank receive the same samples. A batch whose sequences are at
least `cp_min_seq_len` long is split along the sequence (head-tail chunks, global positions, the
distributed attention kernels active); a shorter one is split along the batch, each CP rank
running plain local attention on its own samples. Either way gradients are averaged over
dp x cp, so the batch carries the two numbers that make that average exact:

- `num_tokens`: the denominator of this rank's loss, so that summing the CP ranks' losses gives
  the data-parallel rank's mean token loss (used for logging);
- `loss_scale`: cp in sequence mode (each shard holds part of one sum, and the average over cp
  would divide it again), 1 in batch mode.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from ..mesh import ParallelMeshes
from ..models.loss import IGNORE_INDEX
from ..plan import ParallelPlan
from .context_parallel import (context_parallel_positions, set_context_parallel_active,
                               shard_for_context_parallel, validate_cp)


class ContextParallelBatcher:
    """Lays out each batch for the CP group and switches the attention kernels to match."""

    def __init__(self, transformer: nn.Module, meshes: ParallelMeshes, plan: ParallelPlan) -> None:
        self.transformer = transformer
        self.group = meshes.group("cp")
        self.cp = plan.cp
        self.rank = meshes.coordinate("cp")
        self.min_seq_len = plan.cp_min_seq_len
        self.load_balance = plan.cp_load_balance
        self.kernel = plan.cp_kernel
        self.local_heads = transformer.config.n_heads // plan.tp
        self.max_seq_len = transformer.config.max_seq_len
        self.last_mode = "none"

    def prepare_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        input_ids, labels = batch["input_ids"], batch["labels"]
        batch_size, seq_len = input_ids.shape
        count = (labels != IGNORE_INDEX).sum()
        out = dict(batch)
        out["global_seq_len"] = seq_len
        out["loss_group"] = self.group
        if seq_len >= self.min_seq_len:
            validate_cp(self.cp, self.kernel, self.local_heads, seq_len, self.max_seq_len, self.load_balance)
            shard = lambda t: shard_for_context_parallel(t, 1, self.rank, self.cp, self.load_balance)  # noqa: E731
            out.update(input_ids=shard(input_ids), labels=shard(labels),
                       positions=context_parallel_positions(seq_len, self.rank, self.cp, self.load_balance,
                                                            device=input_ids.device),
                       num_tokens=count, loss_scale=float(self.cp))
            set_context_parallel_active(self.transformer, True)
            self.last_mode = "context"
            return out
        if batch_size % self.cp:
            raise ValueError(
                f"a batch of {batch_size} sequences of length {seq_len} (< cp_min_seq_len="
                f"{self.min_seq_len}) runs batch-parallel over cp={self.cp} ranks, so the micro-batch "
                f"size must be a multiple of {self.cp}: set data.micro_batch_size to a multiple of "
                f"{self.cp}, or lower cp_min_seq_len")
        rows = batch_size // self.cp
        local = slice(self.rank * rows, (self.rank + 1) * rows)
        local_labels = labels[local]
        out.update(input_ids=input_ids[local], labels=local_labels, positions=None,
                   num_tokens=(local_labels != IGNORE_INDEX).sum() * self.cp, loss_scale=float(self.cp))
        set_context_parallel_active(self.transformer, False)
        self.last_mode = "batch"
        return out

