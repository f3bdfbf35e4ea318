"""Splitting packed windows of documents across context-parallel ranks by their real lengths.

A packed window holds several documents; attention work is per document: a document of length
L costs L(L+1)/2 (query, key) pairs, a token at position p of its document attends p+1 keys. The
head-tail split of the whole window balances one long causal sequence, not a window of many
short documents (the rank holding the window's middle may hold one heavy document, another
rank only light ones). This module computes, per window row:

- `balanced_document_chunks`: every rank gets exactly seq_len / cp tokens (shapes must match)
  and as nearly as possible the same attention work. Documents shorter than `min_split_len`
  stay whole on one rank (placed heaviest first on the least-loaded rank with room); longer
  ones are cut into a head run and a tail run per rank (head-tail generalised to unequal
  sizes), sized so that each rank's work reaches the mean. A short document is cut only when
  the window has too few long-document tokens to even out token counts (then no split exists).
- `choose_cp_degree`: the context-parallel degree a micro-batch needs, from its longest
  document (Megatron-Core's dynamic context parallelism): 1, 2, 4, ... up to cp.

Pure host-side integer arithmetic on document lengths, no torch.distributed: the layout is a
permutation of the window's token indices, applied to inputs, labels, positions and document
ids alike (cp_batch.py), so the loss is unchanged and only the attention kernels see the split.
No library splits packed documents by work (TorchTitan and torch's context_parallel only know
head-tail over the whole sequence), so it is written here.
"""
from __future__ import annotations

from typing import Sequence

import torch

Runs = list[tuple[int, int]]  # [start, stop) window index ranges, in local order


def document_spans(document_ids: Sequence[int]) -> list[tuple[int, int]]:
    """[start, stop) of each run of equal ids in one window row (documents are contiguous)."""
    spans, start = [], 0
    for i in range(1, len(document_ids) + 1):
        if i == len(document_ids) or document_ids[i] != document_ids[start]:
            spans.append((start, i))
            start = i
    return spans


def _pairs(n: int) -> int:
    """Keys attended by positions 0..n-1 of one document: n(n+1)/2."""
    return n * (n + 1) // 2


def run_work(start: int, stop: int, doc_start: int) -> int:
    """Attention work (query, key pairs) of window tokens [start, stop) of a document at doc_start."""
    return _pairs(stop - doc_start) - _pairs(start - doc_start)


def rank_work(chunks: Sequence[Runs], spans: Sequence[tuple[int, int]]) -> list[int]:
    """Attention work of each rank under a layout (per rank: window index runs)."""
    work = []
    for runs in chunks:
        total = 0
        for start, stop in runs:
            for d0, d1 in spans:
                lo, hi = max(start, d0), min(stop, d1)
                if lo < hi:
                    total += run_work(lo, hi, d0)
        work.append(total)
    return work


def _split_head_tail(lo: int, hi: int, tokens: int, work: float) -> int:
    """How many of `tokens` to take from the head of document positions [lo, hi) (the rest from
    the tail) so that their work comes closest to `work`. Work falls as the head share grows, so
    a binary search finds it."""
    def got(h: int) -> int:
        return (_pairs(lo + h) - _pairs(lo)) + (_pairs(hi) - _pairs(hi - tokens + h))

    a, b = 0, tokens
    while a < b:
        mid = (a + b) // 2
        if got(mid) > work:
            a = mid + 1
        else:
            b = mid
    if a > 0 and abs(got(a - 1) - work) <= abs(got(a) - work):
        return a - 1
    return a


def _share(total: int, weights: Sequence[float], caps: Sequence[int]) -> list[int]:
    """Integers summing to `total`, proportional to `weights` (largest remainders), each <= cap."""
    wsum = sum(weights)
    ideal = [total * w / wsum if wsum > 0 else total / len(weights) for w in weights]
    out = [min(int(x), c) for x, c in zip(ideal, caps)]
    order = sorted(range(len(out)), key=lambda r: ideal[r] - out[r], reverse=True)
    while sum(out) < total:
        moved = False
        for r in order:
            if sum(out) < total and out[r] < caps[r]:
                out[r] += 1
                moved = True
        if not moved:
            raise ValueError(f"cannot place {total} tokens within capacities {list(caps)}")
    return out


def balanced_document_chunks(spans: Sequence[tuple[int, int]], cp: int,
                             min_split_len: int) -> list[Runs]:
    """Per rank, the window index runs it holds: seq_len / cp tokens each, equal work as near as
    integer token counts allow. `spans`: the documents of one window row (`document_spans`)."""
    seq_len = spans[-1][1] if spans else 0
    if seq_len % cp:
        raise ValueError(f"a window of {seq_len} tokens does not split evenly over cp={cp} ranks: "
                         f"pack windows to a multiple of {cp}")
    per_rank = seq_len // cp
    mean_work = sum(_pairs(d1 - d0) for d0, d1 in spans) / cp
    tokens, work = [0] * cp, [0] * cp
    runs: list[Runs] = [[] for _ in range(cp)]
    short = sorted((s for s in spans if s[1] - s[0] < min_split_len), key=lambda s: s[0] - s[1])
    filler = [s for s in spans if s[1] - s[0] >= min_split_len]
    # Short documents are spread evenly in work and in tokens at once (heaviest first, each to
    # the rank whose larger share of the two stays smallest): the long documents then fill
    # nearly equal rooms with nearly equal work, which their head and tail runs can match.
    short_tokens = max(1, sum(d1 - d0 for d0, d1 in short)) / cp
    short_work = max(1, sum(_pairs(d1 - d0) for d0, d1 in short)) / cp
    for d0, d1 in short:
        n = d1 - d0
        fits = [r for r in range(cp) if tokens[r] + n <= per_rank]
        if not fits:  # token counts cannot even out with this one whole: it must be cut
            filler.append((d0, d1))
            continue
        r = min(fits, key=lambda r: (max((work[r] + _pairs(n)) / short_work,
                                         (tokens[r] + n) / short_tokens), work[r]))
        runs[r].append((d0, d1))
        tokens[r] += d1 - d0
        work[r] += _pairs(d1 - d0)
    filler.sort(key=lambda s: (s[1] - s[0], s[0]))  # the longest last: it has the most freedom
    room = [per_rank - t for t in tokens]
    for j, (d0, d1) in enumerate(filler):
        length = d1 - d0
        rest = sum(f1 - f0 for f0, f1 in filler[j:])
        # This document's tokens per rank: in proportion to each rank's remaining room.
        take = room if j == len(filler) - 1 else _share(length, [room[r] * length / rest for r in range(cp)], room)
        # and its work: in proportion to each rank's remaining deficit to the mean.
        deficit = [max(0.0, mean_work - work[r]) if take[r] else 0.0 for r in range(cp)]
        target = [_pairs(length) * d / sum(deficit) if sum(deficit) else 0.0 for d in deficit]
        lo, hi = 0, length
        order = [r for r in range(cp) if take[r]]
        for i, r in enumerate(order):
            t = take[r]
            h = hi - lo if i == len(order) - 1 else _split_head_tail(lo, hi, t, target[r])
            if h:
                runs[r].append((d0 + lo, d0 + lo + h))
            if t - h:
                runs[r].append((d0 + hi - (t - h), d0 + hi))
            work[r] += (_pairs(lo + h) - _pairs(lo)) + (_pairs(hi) - _pairs(hi - t + h))
            lo, hi = lo + h, hi - (t - h)
            tokens[r] += t
        room = [per_rank - t for t in tokens]
    return [_merge_runs(sorted(r)) for r in runs]


def _merge_runs(runs: Runs) -> Runs:
    merged: Runs = []
    for start, stop in runs:
        if merged and merged[-1][1] == start:
            merged[-1] = (merged[-1][0], stop)
        else:
            merged.append((start, stop))
    return merged


def head_tail_runs(seq_len: int, cp: int) -> list[Runs]:
    """The document-blind head-tail layout of the whole window (for comparison)."""
    size = seq_len // (2 * cp)
    return [[(r * size, (r + 1) * size), ((2 * cp - 1 - r) * size, (2 * cp - r) * size)]
            for r in range(cp)]


def layout_index(document_ids: torch.Tensor, cp: int, min_split_len: int) -> torch.Tensor:
    """(B, S) permutation of window indices: rank r's tokens are columns [r*S/cp, (r+1)*S/cp).
    Every row is laid out by its own documents."""
    rows = []
    for row in document_ids.tolist():
        chunks = balanced_document_chunks(document_spans(row), cp, min_split_len)
        rows.append([i for runs in chunks for start, stop in runs for i in range(start, stop)])
    return torch.tensor(rows, dtype=torch.long, device=document_ids.device).view(document_ids.shape)


def longest_document(document_ids: torch.Tensor) -> int:
    """Length of the longest run of equal ids over the rows of (B, S) document ids."""
    b, s = document_ids.shape
    starts = torch.ones(b, s, dtype=torch.bool, device=document_ids.device)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    bounds = torch.nonzero(torch.cat([starts, starts.new_ones(b, 1)], dim=1).flatten()).flatten()
    lengths = bounds[1:] - bounds[:-1]  # crossing a row end counts as a start: rows stay apart
    return int(lengths.max()) if lengths.numel() else 0


def cp_degrees(cp: int) -> list[int]:
    """The degrees a micro-batch may use: the powers of two dividing cp, and cp."""
    degrees, d = [], 1
    while d < cp and cp % d == 0:
        degrees.append(d)
        d *= 2
    return degrees + [cp]


def choose_cp_degree(longest: int, cp: int, min_seq_len: int, batch_size: int) -> int:
    """The context-parallel degree for a micro-batch whose longest document has `longest` tokens:
    1 if it is shorter than `min_seq_len` (all CP ranks run other samples, batch-parallel),
    otherwise the smallest degree d > 1 (`cp_degrees`) that keeps each rank's part of it below
    `min_seq_len` tokens, i.e. longest < d * min_seq_len, and cp if none does. The cp/d groups of
    d ranks share the batch rows, so d is raised until cp/d divides the batch size."""
    candidates = [d for d in cp_degrees(cp) if batch_size % (cp // d) == 0]
    if longest < min_seq_len:
        return candidates[0]
    return next((d for d in candidates if d > 1 and longest < d * min_seq_len), cp)


def default_min_split_len(seq_len: int, cp: int) -> int:
    """Documents shorter than a quarter of a rank's share of the window stay on one rank: short
    enough that whole documents even out the work, long enough to spare tiny pieces."""
    return max(1, seq_len // (4 * cp))


__all__ = ["document_spans", "balanced_document_chunks", "head_tail_runs", "rank_work",
           "run_work", "layout_index", "longest_document", "cp_degrees", "choose_cp_degree",
           "default_min_split_len"]
