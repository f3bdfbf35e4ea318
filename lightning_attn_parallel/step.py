"""The per-step contract between the strategy's batch layout, the module's loss and the
callbacks' token accounting.

A data loader yields a plain dict (`input_ids`, `labels`, optionally `positions` and
`document_ids`); a LightningModule that gets it unchanged can read it as it likes. Where the
strategy lays a batch out for this rank (context parallelism splits sequences, or rows, over the
ranks of a CP group), it hands the module a `StepBatch` instead, which says what the rank holds
and how its partial loss adds up to the step's loss. `StepBatch.of` reads either form.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, TypedDict, Union

from torch import Tensor

# The label of a token the loss does not count (padding, a document's last token): the value
# torch's cross-entropy ignores by default. The data layer writes it, the losses skip it.
IGNORE_INDEX = -100


class LoaderBatch(TypedDict, total=False):
    """What a data loader yields: (B, S) token ids and next-token labels; packed documents add
    per-document positions and document ids (B, S)."""

    input_ids: Tensor
    labels: Tensor
    positions: Tensor
    document_ids: Tensor


@dataclass
class StepBatch:
    """This rank's share of one micro-batch.

    - `positions`: (S,) or (B, S) positions of the tokens held (global positions of a sequence
      shard; per row when documents are packed, restarting at each document); None: 0..S-1.
    - `document_ids`: (B, S) int, the same id for the tokens of one packed document; None: one
      document per row.
    - `global_seq_len`: the full sequence length, which sets the attention FLOPs per token.
    - `num_tokens`: the loss denominator, the counted tokens of the whole micro-batch of this
      data-parallel rank; None: the tokens this rank holds.
    - `loss_scale`: multiplies the loss to differentiate (cp: gradients are averaged over dp x cp,
      and summing the shards' losses already covers the whole sequence).
    - `sum_shards`: the sum, as a new tensor, of a per-rank partial over the ranks that share
      these sequences, for the loss that is logged; None when this rank holds whole sequences.
      parallel/ fills it.
    """

    input_ids: Tensor
    labels: Tensor
    positions: Optional[Tensor] = None
    document_ids: Optional[Tensor] = None
    global_seq_len: Optional[int] = None
    num_tokens: Optional[Tensor] = None
    loss_scale: float = 1.0
    sum_shards: Optional[Callable[[Tensor], Tensor]] = None

    @property
    def seq_len(self) -> int:
        """The full sequence length (not this rank's shard of it)."""
        return int(self.global_seq_len or self.input_ids.shape[-1])

    @classmethod
    def of(cls, batch: Union["StepBatch", LoaderBatch]) -> "StepBatch":
        """A StepBatch as it is, or the step of a data loader's dict (whole sequences)."""
        if isinstance(batch, StepBatch):
            return batch
        return cls(input_ids=batch["input_ids"], labels=batch["labels"],
                   positions=batch.get("positions"), document_ids=batch.get("document_ids"))

    def loss_denominator(self, counted: Tensor) -> Tensor:
        """Tokens to divide this rank's loss sum by (`counted`: the tokens it holds)."""
        return (self.num_tokens if self.num_tokens is not None else counted).clamp_min(1)

    def step_loss(self, mean: Tensor) -> Tensor:
        """The micro-batch's mean token loss from this rank's share of it (for logging)."""
        return self.sum_shards(mean.detach()) if self.sum_shards is not None else mean.detach()


__all__ = ["StepBatch", "LoaderBatch", "IGNORE_INDEX"]
