"""Per-batch layout for context parallelism: how many CP ranks share one sequence.

All CP ranks of one data-parallel rank receive the same samples. Each micro-batch gets a
context-parallel degree d in 1, 2, 4, ... up to cp (`choose_cp_degree`, from its longest
document, or its sequence length when it has no document ids): the CP group splits into cp/d
sub-groups of d consecutive ranks (created once, on every rank), each takes cp/d-th of the
rows and splits them along the sequence over its d ranks. d = cp is the plain context-parallel
layout, d = 1 runs each CP rank batch-parallel on its own rows with local attention; between
them, a batch whose longest document needs only two ranks does not pay cp-way communication
(Megatron-Core's dynamic context parallelism).

Sequence split: head-tail chunks and global positions without document ids; with them
(packed documents) the work-balanced document layout of cp_documents.py applied to every
per-row tensor, positions staying per document. Either way every token is on exactly one rank
and gradients are averaged over dp x cp, so the batch carries the two numbers that make that
average exact (fields of the StepBatch it returns):

- `num_tokens`: the token count of the whole micro-batch of this data-parallel rank, so that
  summing the CP ranks' losses gives its mean token loss, whichever ranks hold which tokens;
- `loss_scale`: cp (the average of the gradients over cp would divide the sum again);
- `sum_shards`: the sum over the CP group of the logged loss.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from ..mesh import ParallelMeshes, groups_along, new_groups
from ..plan import ParallelPlan
from ..step import IGNORE_INDEX, LoaderBatch, StepBatch
from .collectives import SumOver
from .context_parallel import (apply_context_parallel, context_parallel_positions,
                               context_parallel_switch, shard_for_context_parallel, validate_cp)
from .cp_documents import (choose_cp_degree, cp_degrees, default_min_split_len, layout_index,
                           longest_document)

PER_TOKEN_KEYS = ("input_ids", "labels", "positions", "document_ids")


def cp_subgroups(meshes: ParallelMeshes, cp: int) -> dict[int, Optional[dist.ProcessGroup]]:
    """The group of each degree for this rank: blocks of d consecutive ranks of every CP group,
    created collectively in the same order on every rank; None for degree 1."""
    cp_dim = 2  # (dp_replicate, dp_shard, cp, tp)
    cp_groups = groups_along(meshes.dense.mesh, (cp_dim,))
    groups: dict[int, Optional[dist.ProcessGroup]] = {1: None, cp: meshes.group("cp")}
    for degree in cp_degrees(cp):
        if 1 < degree < cp:
            groups[degree] = new_groups([ranks[i:i + degree] for ranks in cp_groups
                                         for i in range(0, cp, degree)])
    return groups


def apply_context_parallel_layout(transformer: nn.Module, meshes: ParallelMeshes,
                                  plan: ParallelPlan) -> "ContextParallelBatcher":
    """Swap in the context-parallel attention kernels and return the batcher that lays out
    each batch for them."""
    apply_context_parallel(transformer, meshes.group("cp"), kernel=plan.cp_kernel,
                           load_balance=plan.cp_load_balance)
    return ContextParallelBatcher(transformer, meshes, plan)


class ContextParallelBatcher:
    """Lays out each batch for the CP group and sets the kernels' shared switch to match."""

    def __init__(self, transformer: nn.Module, meshes: ParallelMeshes, plan: ParallelPlan) -> None:
        self.switch = context_parallel_switch(transformer)
        self.group = meshes.group("cp")
        self.cp = plan.cp
        self.rank = meshes.coordinate("cp")
        self.min_seq_len = plan.cp_min_seq_len
        self.load_balance = plan.cp_load_balance
        self.kernel = plan.cp_kernel
        self.local_heads = transformer.config.n_heads // plan.tp
        self.max_seq_len = transformer.config.max_seq_len
        # Degrees between 1 and cp are only chosen under a length threshold.
        self.groups = cp_subgroups(meshes, self.cp) if self.min_seq_len > 0 else \
            {1: None, self.cp: self.group}
        self.last_mode = "none"
        self.last_degree = 0

    def degree_for(self, batch: LoaderBatch) -> int:
        input_ids = batch["input_ids"]
        documents = batch.get("document_ids")
        longest = longest_document(documents) if documents is not None else input_ids.shape[1]
        degree = choose_cp_degree(longest, self.cp, self.min_seq_len, input_ids.shape[0])
        return degree if degree in self.groups else self.cp

    def prepare_batch(self, batch: LoaderBatch) -> StepBatch:
        """This rank's share of a loader's batch, as the StepBatch the module's loss reads."""
        input_ids, labels = batch["input_ids"], batch["labels"]
        batch_size, seq_len = input_ids.shape
        degree = self.degree_for(batch)
        out = {key: batch.get(key) for key in PER_TOKEN_KEYS}
        rows_per_group = batch_size // (self.cp // degree)
        rows = slice(self.rank // degree * rows_per_group, (self.rank // degree + 1) * rows_per_group)
        local = {key: batch[key][rows] for key in PER_TOKEN_KEYS
                 if isinstance(batch.get(key), torch.Tensor) and batch[key].dim() == 2}
        if degree == 1:
            out["positions"] = None  # unless the batch has its own (per document)
            out.update(local)
        else:
            validate_cp(degree, self.kernel, self.local_heads, seq_len, self.max_seq_len,
                        self.load_balance and "document_ids" not in local)
            out.update(self._split_sequences(local, seq_len, self.rank % degree, degree))
        self.switch.active, self.switch.group = degree > 1, self.groups[degree]
        self.last_mode = "context" if degree > 1 else "batch"
        self.last_degree = degree
        return StepBatch(**out, global_seq_len=seq_len, num_tokens=(labels != IGNORE_INDEX).sum(),
                         loss_scale=float(self.cp), sum_shards=SumOver(self.group))

    def _split_sequences(self, local: dict[str, torch.Tensor], seq_len: int, rank: int,
                         degree: int) -> dict[str, torch.Tensor]:
        """This rank's part of each row: head-tail over the window without documents, the
        document-balanced permutation with them (positions then stay per document)."""
        documents = local.get("document_ids")
        if documents is None:
            shard = lambda t: shard_for_context_parallel(t, 1, rank, degree, self.load_balance)  # noqa: E731
            return {**{key: shard(t) for key, t in local.items() if key != "positions"},
                    "positions": context_parallel_positions(seq_len, rank, degree, self.load_balance,
                                                            device=local["input_ids"].device)}
        if "positions" not in local:
            raise ValueError("a batch with document_ids needs per-document positions (B, S)")
        per_rank = seq_len // degree
        if self.load_balance:
            index = layout_index(documents, degree, default_min_split_len(seq_len, degree))
        else:
            index = torch.arange(seq_len, device=documents.device).expand_as(documents)
        index = index[:, rank * per_rank:(rank + 1) * per_rank]
        return {key: t.gather(1, index) for key, t in local.items()}
