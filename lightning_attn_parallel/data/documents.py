"""Training on a prepared document corpus (`python -m lightning_attn_parallel.data.prepare`).

A batch of packed documents is a dict of (B, S) tensors:
- `input_ids`, `labels`: a document of n tokens (its EOS included) contributes inputs doc[:-1]
  and labels doc[1:], so nothing is predicted across documents; padding has label -100
  (IGNORE_INDEX) and is the only thing the loss ignores;
- `positions`: restart at 0 for each document (and for the padding);
- `document_ids`: 0, 1, 2, ... for the documents of a row in order, -1 for padding. The
  attention kernels keep every token inside its document (models/document_attention.py).

A document with more predictions than `seq_len` is cut into pieces of `seq_len`; each piece is
a document of its own (positions restart, it sees nothing of the piece before). That keeps
"a packed window equals its documents run alone" exact for every window. Pieces are packed into
windows best-fit-decreasing (few windows, little padding); with `pack=False` each piece gets a
window to itself, padded, and the wasted tokens are reported.
"""
from __future__ import annotations

import bisect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import UserError
from ..step import IGNORE_INDEX
from .datamodule import TOKEN_DTYPES, LMDataModule, token_file

METADATA = "metadata.json"
FORMAT = "lap-documents/1"
PADDING_ID = -1
DOCUMENT_KEYS = ("path", "seq_len", "micro_batch_size", "pack", "dtype", "num_workers")  # of DataConfig


def split_files(directory: Path, split: str) -> tuple[Path, Path]:
    """(token file, document index) of one split ("train" or "val") of a prepared corpus."""
    return directory / f"{split}.bin", directory / f"{split}.idx.npy"


# ---------------------------------------------------------------------------------- packing


@dataclass
class Packing:
    """Which document pieces fill which window.

    Window w holds pieces `order[starts[w]:starts[w + 1]]`; piece p has inputs
    tokens[offset[p] : offset[p] + length[p]] and labels one token later.
    """

    seq_len: int
    offset: np.ndarray  # (P,) int64
    length: np.ndarray  # (P,) int64, 1..seq_len
    order: np.ndarray   # (P,) pieces grouped by window
    starts: np.ndarray  # (W + 1,)

    @property
    def num_windows(self) -> int:
        return len(self.starts) - 1

    def stats(self, doc_offsets: np.ndarray) -> dict[str, float]:
        """Document lengths and how well the windows are used (for the logs)."""
        doc_lengths = np.diff(doc_offsets)
        useful = int(self.length.sum())
        total = self.num_windows * self.seq_len
        return {"documents": float(len(doc_lengths)),
                "doc_len_mean": float(doc_lengths.mean()) if len(doc_lengths) else 0.0,
                "doc_len_median": float(np.median(doc_lengths)) if len(doc_lengths) else 0.0,
                "doc_len_max": float(doc_lengths.max()) if len(doc_lengths) else 0.0,
                "docs_split": float((doc_lengths - 1 > self.seq_len).sum()),
                "windows": float(self.num_windows),
                "packing_efficiency": useful / total if total else 0.0,
                "wasted_tokens": float(total - useful)}


def document_pieces(doc_offsets: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(offset, length) of every piece: documents cut into runs of at most seq_len predictions."""
    starts = np.asarray(doc_offsets[:-1], dtype=np.int64)
    predictions = np.diff(np.asarray(doc_offsets, dtype=np.int64)) - 1  # EOS included, one fewer
    predictions = np.maximum(predictions, 0)
    count = -(-predictions // seq_len)
    doc = np.repeat(np.arange(len(starts)), count)
    first_piece = np.repeat(np.cumsum(count) - count, count)
    k = np.arange(len(doc)) - first_piece  # piece number within its document
    offset = starts[doc] + k * seq_len
    length = np.minimum(seq_len, predictions[doc] - k * seq_len)
    return offset, length


def pack_documents(doc_offsets: np.ndarray, seq_len: int, pack: bool = True) -> Packing:
    """Pieces into windows of seq_len: best-fit decreasing (pack=True) or one per window."""
    offset, length = document_pieces(doc_offsets, seq_len)
    if not pack:
        order = np.arange(len(length))
        return Packing(seq_len, offset, length, order, np.arange(len(length) + 1))
    window = np.empty(len(length), dtype=np.int64)
    full = length == seq_len
    window[full] = np.arange(int(full.sum()))
    n_windows = int(full.sum())
    # Best fit over the windows still open, kept sorted by free space: by hand because no
    # library packs bins incrementally; bisect keeps it O(P log W) plus list shifts in C.
    free: list[tuple[int, int]] = []
    for p in np.flatnonzero(~full)[np.argsort(-length[~full], kind="stable")].tolist():
        need = int(length[p])
        i = bisect.bisect_left(free, (need, -1))
        if i == len(free):
            w, left = n_windows, seq_len - need
            n_windows += 1
        else:
            room, w = free.pop(i)
            left = room - need
        window[p] = w
        if left > 0:
            bisect.insort(free, (left, w))
    order = np.lexsort((np.arange(len(window)), window))
    starts = np.searchsorted(window[order], np.arange(n_windows + 1))
    return Packing(seq_len, offset, length, order, starts)


def packed_window(tokens: np.ndarray, packing: Packing, index: int, pad_id: int) -> dict[str, torch.Tensor]:
    """One window as the four (S,) tensors of a packed batch (see the module docstring)."""
    s = packing.seq_len
    input_ids = np.full(s, pad_id, dtype=np.int64)
    labels = np.full(s, IGNORE_INDEX, dtype=np.int64)
    positions = np.zeros(s, dtype=np.int64)
    document_ids = np.full(s, PADDING_ID, dtype=np.int64)
    cursor = 0
    for doc, p in enumerate(packing.order[packing.starts[index]:packing.starts[index + 1]]):
        start, n = int(packing.offset[p]), int(packing.length[p])
        chunk = np.asarray(tokens[start:start + n + 1], dtype=np.int64)
        input_ids[cursor:cursor + n] = chunk[:-1]
        labels[cursor:cursor + n] = chunk[1:]
        positions[cursor:cursor + n] = np.arange(n)
        document_ids[cursor:cursor + n] = doc
        cursor += n
    positions[cursor:] = np.arange(s - cursor)  # padding: a pseudo-document of its own
    return {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
            "positions": torch.from_numpy(positions), "document_ids": torch.from_numpy(document_ids)}


class DocumentWindows(Dataset):
    """Windows of packed documents from a memory-mapped token file and its document index."""

    def __init__(self, tokens: np.ndarray, doc_offsets: np.ndarray, seq_len: int, pad_id: int,
                 pack: bool = True) -> None:
        self.tokens = tokens
        self.doc_offsets = doc_offsets
        self.pad_id = pad_id
        self.packing = pack_documents(doc_offsets, seq_len, pack)

    def __len__(self) -> int:
        return self.packing.num_windows

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return packed_window(self.tokens, self.packing, int(index), self.pad_id)

    def describe(self, items: Sequence[int]) -> str:
        """Where samples come from, for a report: the token file and each window's document indices."""
        p = self.packing
        docs = [p.order[p.starts[int(i)]:p.starts[int(i) + 1]].tolist() for i in items]
        return f"{token_file(self.tokens)} documents " + "; ".join(", ".join(map(str, d)) for d in docs)


# ---------------------------------------------------------------------------------- the corpus


class CorpusError(UserError):
    """A prepared corpus that cannot be trained on; the message names the file and the fix."""


@dataclass
class DocumentCorpus:
    """A prepared corpus folder, checked against its metadata before anything trains on it."""

    path: Path
    metadata: dict

    @property
    def vocab_size(self) -> int:
        return int(self.metadata["vocab_size"])

    @property
    def eos_id(self) -> int:
        return int(self.metadata["eos_id"])

    @property
    def dtype(self) -> str:
        return str(self.metadata["dtype"])

    @classmethod
    def open(cls, path: Union[str, Path], dtype: Optional[str] = None) -> "DocumentCorpus":
        path = Path(path).expanduser()
        meta_path = path / METADATA
        fix = f"run `python -m lightning_attn_parallel.data.prepare --output {path} ...` first"
        if not meta_path.is_file():
            raise CorpusError(f"data.path={str(path)!r} holds no {METADATA}: {fix}")
        try:
            metadata = json.loads(meta_path.read_text())
            if metadata.get("format") != FORMAT:
                raise KeyError("format")
            _ = (int(metadata["vocab_size"]), int(metadata["eos_id"]), metadata["splits"]["train"])
        except (ValueError, KeyError, TypeError) as err:
            raise CorpusError(f"{meta_path} is not a prepared-corpus metadata file ({err}): {fix}") from None
        corpus = cls(path, metadata)
        if corpus.dtype not in TOKEN_DTYPES:
            raise CorpusError(f"{meta_path} names token dtype {corpus.dtype!r}, not one of "
                              f"{', '.join(TOKEN_DTYPES)}: {fix}")
        if dtype not in (None, "auto", corpus.dtype):
            raise CorpusError(f"data.dtype={dtype!r} but {path} was prepared as {corpus.dtype!r} "
                              f"(vocabulary {corpus.vocab_size}): drop data.dtype or set data.dtype={corpus.dtype}")
        for split in metadata["splits"]:
            corpus.load(split)  # check every file now, before any process group starts
        return corpus

    def load(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(memory-mapped tokens, document offsets) of a split, checked against the metadata."""
        tokens_path, index_path = split_files(self.path, split)
        fix = f"prepare {self.path} again with `python -m lightning_attn_parallel.data.prepare`"
        expect = self.metadata["splits"][split]
        itemsize = np.dtype(TOKEN_DTYPES[self.dtype]).itemsize
        if not tokens_path.is_file():
            raise CorpusError(f"token file {tokens_path} is missing: {fix}")
        size = tokens_path.stat().st_size
        if size != int(expect["tokens"]) * itemsize:
            raise CorpusError(f"token file {tokens_path} has {size} bytes, but the metadata says "
                              f"{expect['tokens']} {self.dtype} tokens ({int(expect['tokens']) * itemsize} "
                              f"bytes): it is truncated or of another dtype; {fix}")
        if not index_path.is_file():
            raise CorpusError(f"document index {index_path} is missing: {fix}")
        try:
            offsets = np.load(index_path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:
            raise CorpusError(f"document index {index_path} is corrupt ({err}): {fix}") from None
        if (offsets.dtype != np.int64 or offsets.ndim != 1 or len(offsets) != int(expect["documents"]) + 1
                or offsets[0] != 0 or offsets[-1] != int(expect["tokens"]) or np.any(np.diff(offsets) < 1)):
            raise CorpusError(f"document index {index_path} is corrupt (expected {expect['documents'] + 1} "
                              f"increasing int64 offsets from 0 to {expect['tokens']}): {fix}")
        tokens = np.memmap(tokens_path, dtype=TOKEN_DTYPES[self.dtype], mode="r") if size else \
            np.zeros(0, dtype=TOKEN_DTYPES[self.dtype])
        return tokens, np.asarray(offsets)


# ---------------------------------------------------------------------------------- data module


class DocumentDataModule(LMDataModule):
    """Packed (or padded) windows of a prepared corpus; samplers and loaders as LMDataModule's."""

    def __init__(self, path: Optional[str] = None, seq_len: int = 256, micro_batch_size: int = 8,
                 pack: bool = True, dtype: Optional[str] = None, num_workers: int = 0,
                 seed: int = 1234) -> None:
        super().__init__(seq_len=seq_len, micro_batch_size=micro_batch_size, num_workers=num_workers,
                         seed=seed)
        if not path:
            raise CorpusError("data=documents needs data.path: the folder written by "
                              "`python -m lightning_attn_parallel.data.prepare`")
        self.source = "documents"
        self.corpus = DocumentCorpus.open(path, dtype)
        if "val" not in self.corpus.metadata["splits"]:
            raise CorpusError(f"{path} has no validation split: prepare it with --val-fraction > 0")
        self.pack = pack
        self.stats: dict[str, dict[str, float]] = {}
        self._logged = False

    @property
    def vocab_size(self) -> Optional[int]:
        return self.corpus.vocab_size

    def prepare_data(self) -> None:
        pass

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:  # set up before the Trainer (fit_corpus.py): log once it has one
            self._log_metrics()
            return
        sets = {}
        for split in ("train", "val"):
            tokens, offsets = self.corpus.load(split)
            sets[split] = DocumentWindows(tokens, offsets, self.seq_len, self.corpus.eos_id, self.pack)
            self.stats[split] = sets[split].packing.stats(offsets)
        self.train_set, self.val_set = sets["train"], sets["val"]
        self._log_stats()

    def _log_stats(self) -> None:
        from lightning.pytorch.utilities import rank_zero_info

        train = self.stats["train"]
        mode = "packed" if self.pack else "padded (one document per window)"
        rank_zero_info(
            f"documents: {int(train['documents'])} train, {int(self.stats['val']['documents'])} val; "
            f"length mean {train['doc_len_mean']:.0f}, median {train['doc_len_median']:.0f}, max "
            f"{int(train['doc_len_max'])} tokens; {int(train['docs_split'])} longer than seq_len="
            f"{self.seq_len} split; {mode} into {int(train['windows'])} windows at "
            f"{100 * train['packing_efficiency']:.1f}% efficiency ({int(train['wasted_tokens'])} "
            "padding tokens wasted)")
        self._log_metrics()

    def _log_metrics(self) -> None:
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.logger is not None and not self._logged:
            self._logged = True
            trainer.logger.log_metrics({f"data/{split}/{k}": v for split, s in self.stats.items()
                                        for k, v in s.items()}, step=0)


__all__ = ["DocumentCorpus", "DocumentDataModule", "DocumentWindows", "Packing", "pack_documents",
           "packed_window", "document_pieces", "CorpusError", "split_files"]
