"""Attention-work balance over context-parallel ranks on a heavy-tailed document mix.

Documents with log-normal lengths (median 700 tokens, sigma 1.4, capped at 64k: a few span a
whole window, most are short, like web and code corpora) are packed in order into windows of
`seq_len` tokens; a document that does not fit is cut at the window's end and continues in the
next window as its own document (positions restart). For every window and cp, the table gives
the max/mean over CP ranks of the attention work (query-key pairs inside documents), worst and
mean over the windows, for head-tail over the whole window and for the document-aware split
(parallel/cp_documents.py). Pure arithmetic on lengths: no GPU, seconds on a CPU. The last
column counts the fused attention calls ("pieces") the all-gather and ring kernels make per rank
and layer under the document split, mean and max over ranks and windows (the kernel-launch
count a GPU run pays; head-tail without documents makes at most 2 per source rank).

    python benchmarks/cp_document_balance.py [--windows 64] [--seed 0]
"""
from __future__ import annotations

import argparse
import random

import torch

from lightning_attn_parallel.parallel.cp_documents import (
    balanced_document_chunks, default_min_split_len, head_tail_runs, rank_work)
from lightning_attn_parallel.parallel.cp_kernels import DocumentLayout


def document_mix(n_tokens: int, seed: int, median: float = 700.0, sigma: float = 1.4,
                 cap: int = 65536) -> list[int]:
    """Log-normal document lengths (at least 1 token) summing to at least `n_tokens`."""
    rng = random.Random(seed)
    lengths, total = [], 0
    while total < n_tokens:
        length = max(1, min(cap, int(rng.lognormvariate(0.0, sigma) * median)))
        lengths.append(length)
        total += length
    return lengths


def pack(lengths: list[int], seq_len: int, n_windows: int) -> list[list[tuple[int, int]]]:
    """Windows of document spans, documents cut at window ends."""
    windows, spans, used = [], [], 0
    queue = list(lengths)
    while len(windows) < n_windows:
        length = queue.pop(0)
        take = min(length, seq_len - used)
        spans.append((used, used + take))
        used += take
        if take < length:
            queue.insert(0, length - take)
        if used == seq_len:
            windows.append(spans)
            spans, used = [], 0
    return windows


def imbalance(work: list[int]) -> float:
    mean = sum(work) / len(work)
    return max(work) / mean if mean else 1.0


def fused_calls(spans: list[tuple[int, int]], chunks: list[list[tuple[int, int]]]) -> list[int]:
    """Pieces each rank's all-gather/ring kernel computes for one window (one layer)."""
    seq_len = spans[-1][1]
    ids, pos = torch.empty(seq_len, dtype=torch.long), torch.empty(seq_len, dtype=torch.long)
    for d, (a, b) in enumerate(spans):
        ids[a:b], pos[a:b] = d, torch.arange(b - a)
    index = torch.tensor([i for runs in chunks for a, b in runs for i in range(a, b)])
    cp = len(chunks)
    docs = ids[index].view(cp, 1, -1)
    positions = pos[index].view(cp, 1, -1)
    return [sum(len(block) for block in DocumentLayout(docs, positions, r, torch.device("cpu")).pieces)
            for r in range(cp)]


def balance_table(seq_lens=(8192, 16384, 32768), cps=(2, 4, 8), n_windows: int = 64,
                  seed: int = 0, count_calls: bool = False) -> list[dict]:
    rows = []
    for seq_len in seq_lens:
        windows = pack(document_mix(seq_len * n_windows, seed), seq_len, n_windows)
        for cp in cps:
            thr = default_min_split_len(seq_len, cp)
            ours, head_tail, calls = [], [], []
            for spans in windows:
                chunks = balanced_document_chunks(spans, cp, thr)
                ours.append(imbalance(rank_work(chunks, spans)))
                head_tail.append(imbalance(rank_work(head_tail_runs(seq_len, cp), spans)))
                if count_calls:
                    calls += fused_calls(spans, chunks)
            rows.append(dict(seq_len=seq_len, cp=cp, min_split_len=thr, windows=len(windows),
                             ours_max=max(ours), ours_mean=sum(ours) / len(ours),
                             head_tail_max=max(head_tail),
                             head_tail_mean=sum(head_tail) / len(head_tail),
                             calls_mean=sum(calls) / max(1, len(calls)), calls_max=max(calls, default=0)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print("| seq_len | cp | min_split_len | windows | document split: worst / mean max/mean "
          "| head-tail: worst / mean max/mean | fused calls per rank and layer: mean / max |")
    print("|---|---|---|---|---|---|---|")
    for r in balance_table(n_windows=args.windows, seed=args.seed, count_calls=True):
        print(f"| {r['seq_len']} | {r['cp']} | {r['min_split_len']} | {r['windows']} "
              f"| {r['ours_max']:.4f} / {r['ours_mean']:.4f} "
              f"| {r['head_tail_max']:.3f} / {r['head_tail_mean']:.3f} "
              f"| {r['calls_mean']:.1f} / {r['calls_max']} |")


if __name__ == "__main__":
    main()
