"""Throughput of `python -m lightning_attn_parallel.data.prepare` in MB of text per second.

Generates about `--mb` MB of JSON lines (Python's own standard-library sources, one document per
file, repeated until the size is reached; nothing is downloaded or committed), trains a byte-level
BPE tokenizer of 32k tokens on a slice of it, then prepares the corpus with 1 and with N worker
processes and prints the rate of each.

    python benchmarks/prepare_throughput.py --mb 100 --workers 2
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lightning_attn_parallel.data.corpus import stdlib_source_files  # noqa: E402
from lightning_attn_parallel.data.prepare import prepare  # noqa: E402


def write_corpus(path: Path, megabytes: float) -> int:
    target, written, rounds = int(megabytes * 1e6), 0, 0
    files = stdlib_source_files()
    with open(path, "w", encoding="utf-8") as out:
        while written < target:
            for f in files:
                text = f.read_text(encoding="utf-8", errors="replace")
                line = json.dumps({"text": f"# copy {rounds}\n{text}"}) + "\n"
                out.write(line)
                written += len(line.encode())
                if written >= target:
                    break
            rounds += 1
    return written


def train_tokenizer(corpus: Path, folder: Path, vocab: int = 32000) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    with open(corpus, encoding="utf-8") as f:
        sample = [json.loads(line)["text"] for _, line in zip(range(1500), f)]
    tok.train_from_iterator(sample, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=float, default=100)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = tmp / "corpus.jsonl"
        size = write_corpus(corpus, args.mb)
        tokenizer = train_tokenizer(corpus, tmp / "tokenizer")
        rows = []
        for workers in sorted({1, args.workers}):
            start = time.perf_counter()
            meta = prepare(tokenizer, [corpus], tmp / f"out{workers}", workers=workers, progress=False)
            seconds = time.perf_counter() - start
            tokens = sum(s["tokens"] for s in meta["splits"].values())
            docs = sum(s["documents"] for s in meta["splits"].values())
            rows.append({"workers": workers, "mb": size / 1e6, "seconds": seconds,
                         "mb_per_s": size / 1e6 / seconds, "tokens": tokens, "documents": docs,
                         "tokens_per_s": tokens / seconds, "load_avg_1m": os.getloadavg()[0]})
            print(f"workers={workers}: {size / 1e6:.1f} MB, {docs} documents, {tokens} tokens in "
                  f"{seconds:.1f} s: {size / 1e6 / seconds:.2f} MB/s, {tokens / seconds / 1e6:.2f} M tokens/s "
                  f"(load average {os.getloadavg()[0]:.1f})", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"cpus": os.cpu_count(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
