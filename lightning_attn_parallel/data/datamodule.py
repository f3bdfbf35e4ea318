"""Token datasets, a resumable data-parallel sampler and the LightningDataModule.

Samples are windows of seq_len + 1 tokens cut from one memory-mapped token file (uint8 bytes of
the embedded corpus, or uint16/uint32 .bin files for real datasets). A sample index may carry a
length, `(index, length)`, so one batch can be shorter than another: that is how mixed-length
data exercises the sequence-length-aware context-parallel switch.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..errors import UserError
from .corpus import build_embedded_corpus

TOKEN_DTYPES = {"uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32}
METADATA_FILE = "metadata.json"  # written beside prepared token files (data/prepare)
WIDTH_SAMPLE = 1 << 20  # tokens read to tell a uint32 file from a uint16 one
RECENT_BATCHES = 4096  # batches whose samples a sampler remembers (a few indices each)


def token_file_metadata(path: Union[str, Path]) -> Optional[dict]:
    """The metadata JSON beside a token file (dtype, vocab_size), or None for a raw .bin file."""
    import json

    meta = Path(path).parent / METADATA_FILE
    if not meta.is_file():
        return None
    try:
        values = json.loads(meta.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{meta} is not valid JSON ({err}): prepare the data again or remove it") from None
    return values if isinstance(values, dict) else None


def check_token_file(path: Union[str, Path], dtype: str, seq_len: int, vocab_size: Optional[int] = None,
                     key: str = "data.train_path") -> None:
    """Check a token file before any process starts, naming the file and the fix.

    - it exists, and its size is a whole number of `dtype` tokens;
    - the metadata beside it (if any) agrees on the dtype and fits the model's vocabulary;
    - a raw uint16 file is not really uint32 (every second uint16 word zero: the high halves);
    - it holds at least one sequence of `seq_len + 1` tokens;
    - its largest id is below `vocab_size` (a vectorised max over the memory map: seconds per GB).
    """
    path = Path(path).expanduser()
    if dtype not in TOKEN_DTYPES:
        raise UserError(f"data.dtype={dtype!r} is unknown: use one of {', '.join(TOKEN_DTYPES)}")
    if not path.is_file():
        raise UserError(f"{key}={str(path)!r} does not exist: give an existing token file, or use "
                        "data.source=embedded")
    meta = token_file_metadata(path)
    if meta is not None:
        saved = meta.get("dtype")
        if saved and saved != dtype:
            raise UserError(f"data.dtype={dtype} but {path.parent / METADATA_FILE} says the tokens are "
                            f"{saved}: set data.dtype={saved}")
        if vocab_size is not None and meta.get("vocab_size") and int(meta["vocab_size"]) > vocab_size:
            raise UserError(f"model.vocab_size={vocab_size} is smaller than the vocabulary of {path} "
                            f"({meta['vocab_size']}, from {METADATA_FILE}): raise model.vocab_size")
    itemsize = np.dtype(TOKEN_DTYPES[dtype]).itemsize
    size = path.stat().st_size
    if size % itemsize:
        raise UserError(f"{key}={str(path)!r} has {size} bytes, not a whole number of {dtype} tokens: "
                        f"it is truncated or of another dtype; set data.dtype to the width it was written with")
    tokens = np.memmap(path, dtype=TOKEN_DTYPES[dtype], mode="r") if size else np.zeros(0, TOKEN_DTYPES[dtype])
    if meta is None and dtype == "uint16" and len(tokens) >= 4:
        sample = np.asarray(tokens[: min(len(tokens), WIDTH_SAMPLE) // 2 * 2])
        if not sample[1::2].any() and sample[0::2].any():
            raise UserError(f"{key}={str(path)!r} read as uint16 has every second token 0: it looks like a "
                            "uint32 file; set data.dtype=uint32")
    if len(tokens) < seq_len + 1:
        raise UserError(f"{key}={str(path)!r} holds {len(tokens)} tokens, fewer than one sequence "
                        f"(data.seq_len={seq_len} + 1): lower data.seq_len or use more data")
    if vocab_size is not None:
        largest = int(tokens.max())
        if largest >= vocab_size:
            raise UserError(f"{key}={str(path)!r} holds token id {largest}, not below model.vocab_size="
                            f"{vocab_size}: raise model.vocab_size to at least {largest + 1}, or check "
                            "data.dtype and the tokenizer")


def open_tokens(path: Union[str, Path], dtype: str = "uint16") -> np.ndarray:
    """Memory-map a token file; a clear error names a missing file or an unknown dtype."""
    path = Path(path)
    if dtype not in TOKEN_DTYPES:
        raise ValueError(f"data.dtype={dtype!r} is unknown: use one of {', '.join(TOKEN_DTYPES)}")
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist: check data.train_path/"
                                "data.val_path, or use data.source=embedded")
    return np.memmap(path, dtype=TOKEN_DTYPES[dtype], mode="r")


class TokenWindows(Dataset):
    """Non-overlapping windows of `seq_len + 1` tokens: input_ids and next-token labels."""

    def __init__(self, tokens: np.ndarray, seq_len: int) -> None:
        if len(tokens) < seq_len + 1:
            raise ValueError(f"data.seq_len={seq_len} is longer than the data ({len(tokens)} tokens): "
                             "use a shorter seq_len or more data")
        self.tokens = tokens
        self.seq_len = seq_len

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.seq_len

    def __getitem__(self, item: Union[int, tuple[int, int]]) -> dict[str, torch.Tensor]:
        index, length = item if isinstance(item, tuple) else (item, self.seq_len)
        start = index * self.seq_len
        window = torch.from_numpy(np.asarray(self.tokens[start: start + length + 1], dtype=np.int64))
        return {"input_ids": window[:-1], "labels": window[1:]}

    def describe(self, items: Sequence) -> str:
        """Where samples come from, for a report: the token file and each window's token range."""
        starts = [(item[0] if isinstance(item, tuple) else item) * self.seq_len for item in items]
        return f"{token_file(self.tokens)} tokens " + ", ".join(f"{s}-{s + self.seq_len}" for s in starts)


class ResumableSampler(DistributedSampler):
    """A DistributedSampler (so Lightning does not replace it) over data-parallel ranks that can
    skip the samples already consumed in this epoch: a resumed run sees exactly the batches an
    uninterrupted run would. With `lengths`, each batch draws one length from that list.

    `skip_batches` applies once, to the first pass over epoch `skip_epoch`: a run resumed from
    the last batch of an epoch goes straight on to the next epoch, which must not skip.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, batch_size: int,
                 shuffle: bool = True, seed: int = 0, lengths: Optional[Sequence[int]] = None) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=True)
        self.batch_size = batch_size
        self.lengths = list(lengths) if lengths else None
        # (epoch, batch index) -> this rank's sample indices, for naming the samples of a bad step
        self.recent: OrderedDict[tuple[int, int], list] = OrderedDict()
        self.skip_batches = 0
        self.skip_epoch = 0

    def __iter__(self) -> Iterator:
        # Taken at the start: an epoch cut short (limit_train_batches, max_steps) never runs the
        # generator to its end, and the next epoch's iterator must not skip again.
        skip = self.skip_batches if self.epoch == self.skip_epoch else 0
        self.skip_batches = 0
        indices = list(super().__iter__())
        usable = len(indices) - len(indices) % self.batch_size
        gen = torch.Generator().manual_seed(self.seed + 7919 * self.epoch)
        for b in range(usable // self.batch_size):
            length = None
            if self.lengths:  # same draw on every rank: all ranks of a step share one mode
                length = self.lengths[int(torch.randint(len(self.lengths), (1,), generator=gen))]
            if b < skip:
                continue
            batch = indices[b * self.batch_size: (b + 1) * self.batch_size]
            self.recent[(self.epoch, b)] = batch
            while len(self.recent) > RECENT_BATCHES:
                self.recent.popitem(last=False)
            for i in batch:
                yield i if length is None else (i, length)

    def __len__(self) -> int:
        return (self.num_samples // self.batch_size) * self.batch_size


class LMDataModule(L.LightningDataModule):
    """Causal-LM data: the embedded corpus (default) or memory-mapped token files."""

    def __init__(self, source: str = "embedded", seq_len: int = 256, micro_batch_size: int = 8,
                 train_path: Optional[str] = None, val_path: Optional[str] = None,
                 dtype: str = "uint16", cache_dir: str = "~/.cache/lightning_attn_parallel",
                 val_fraction: float = 0.05, num_workers: int = 0, seed: int = 1234,
                 lengths: Optional[Sequence[int]] = None, max_bytes: Optional[int] = None) -> None:
        super().__init__()
        if source not in ("embedded", "tokens"):
            raise ValueError(f"data.source={source!r} is unknown: use 'embedded', 'tokens' or 'documents'")
        if source == "tokens":
            if not train_path:
                raise ValueError("data.source=tokens needs data.train_path (a uint16/uint32 .bin token file)")
            open_tokens(train_path, dtype)  # fail now, before any process group starts
            if val_path:
                open_tokens(val_path, dtype)
        if seq_len < 1 or micro_batch_size < 1:
            raise ValueError(f"data.seq_len={seq_len} and data.micro_batch_size={micro_batch_size} "
                             "must both be >= 1")
        if lengths and max(lengths) > seq_len:
            raise ValueError(f"data.lengths={list(lengths)} has a length above data.seq_len={seq_len}: "
                             "raise seq_len to the longest length")
        self.source, self.seq_len, self.micro_batch_size = source, seq_len, micro_batch_size
        self.val_micro_batch_size = micro_batch_size  # smaller for a split under one batch (fit_corpus.py)
        self.train_path, self.val_path, self.dtype = train_path, val_path, dtype
        self.cache_dir = Path(cache_dir).expanduser()
        self.val_fraction, self.num_workers, self.seed = val_fraction, num_workers, seed
        self.lengths = list(lengths) if lengths else None
        self.max_bytes = max_bytes
        self.train_set: Optional[TokenWindows] = None
        self.val_set: Optional[TokenWindows] = None
        self._sampler: Optional[ResumableSampler] = None

    @property
    def vocab_size(self) -> Optional[int]:
        return 256 if self.source == "embedded" else None

    def prepare_data(self) -> None:
        if self.source == "embedded":
            self._corpus_path()

    def _corpus_path(self) -> Path:
        kwargs = {"max_bytes": self.max_bytes} if self.max_bytes else {}
        return build_embedded_corpus(self.cache_dir, **kwargs)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        if self.source == "embedded":
            tokens = open_tokens(self._corpus_path(), "uint8")
            split = int(len(tokens) * (1 - self.val_fraction))
            train, val = tokens[:split], tokens[split:]
        else:
            train = open_tokens(self.train_path, self.dtype)
            val = open_tokens(self.val_path, self.dtype) if self.val_path else train[-(self.seq_len + 1) * 64:]
        self.train_set = TokenWindows(train, self.seq_len)
        self.val_set = TokenWindows(val, self.seq_len)

    def _replicas(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 1, 0
        # Single-device strategies have no distributed_sampler_kwargs: one replica.
        kwargs = getattr(trainer.strategy, "distributed_sampler_kwargs", None) or {}
        return kwargs.get("num_replicas", 1), kwargs.get("rank", 0)

    def train_dataloader(self) -> DataLoader:
        replicas, rank = self._replicas()
        sampler = ResumableSampler(self.train_set, replicas, rank, self.micro_batch_size,
                                   shuffle=True, seed=self.seed, lengths=self.lengths)
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            sampler.set_epoch(trainer.current_epoch)
            sampler.skip_batches = _batches_done_this_epoch(trainer)
            sampler.skip_epoch = trainer.current_epoch
        self._sampler = sampler
        return DataLoader(self.train_set, batch_size=self.micro_batch_size, sampler=sampler,
                          num_workers=self.num_workers, drop_last=True,
                          persistent_workers=self.num_workers > 0)

    def describe_batch(self, epoch: int, batch_idx: int) -> Optional[str]:
        """This rank's samples of a recent training batch (file and position), None if unknown."""
        sampler = self._sampler
        items = sampler.recent.get((epoch, batch_idx)) if sampler is not None else None
        return None if items is None else self.train_set.describe(items)

    def val_dataloader(self) -> DataLoader:
        replicas, rank = self._replicas()
        sampler = ResumableSampler(self.val_set, replicas, rank, self.val_micro_batch_size, shuffle=False)
        return DataLoader(self.val_set, batch_size=self.val_micro_batch_size, sampler=sampler,
                          num_workers=self.num_workers, drop_last=True)


def token_file(tokens: np.ndarray) -> str:
    """The file a memory-mapped token array reads (the corpus's name in reports)."""
    return str(getattr(tokens, "filename", None) or "an in-memory token array")


def _batches_done_this_epoch(trainer: L.Trainer) -> int:
    """Batches of the current epoch that a resumed run has already trained on.

    `processed`, not `completed`: a checkpoint saved from on_train_batch_end (ModelCheckpoint,
    or any callback) is written before Lightning counts that batch as completed; Lightning
    completes it when it restores the loop, after the data loader has been made.
    """
    progress = trainer.fit_loop.epoch_loop.batch_progress.current
    return int(progress.processed) if trainer.ckpt_path else 0


__all__ = ["LMDataModule", "TokenWindows", "ResumableSampler", "open_tokens"]
