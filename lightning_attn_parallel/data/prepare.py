"""Tokenize a corpus of documents into the folder that `data=documents data.path=DIR` trains on.

    python -m lightning_attn_parallel.data.prepare --tokenizer PATH --input FILE... --output DIR
        [--field text] [--val-fraction 0.01] [--workers N] [--txt-documents blocks|files] [--eos TOKEN]

Inputs, one document each:
- .txt: every block of lines separated by a blank (or whitespace-only) line; with
  `--txt-documents files`, the whole file;
- .jsonl: the string field `--field` (default `text`) of every line;
- .parquet (needs pyarrow): the string column `--field`.

The tokenizer is a Hugging Face `tokenizer.json` (or a folder holding one), read by the
`tokenizers` library. Each document is encoded without special tokens and EOS is appended.
EOS is `--eos`, else the folder's tokenizer_config.json `eos_token`, else the first of the
usual end-of-text tokens that the vocabulary has.

Output (DIR):
- train.bin, val.bin: the tokens, in the smallest of uint8/uint16/uint32 that holds the vocabulary;
- train.idx.npy, val.idx.npy: int64 document offsets into those (D + 1 entries, from 0);
- metadata.json: tokenizer (name, sha256), vocab_size, eos_id, dtype, document and token counts
  per split, and every source file's sha256. It is written last: a folder with it is complete.

The validation split is made by documents: document i (in input order) goes to validation when
frac(i * golden ratio) < val_fraction, which spreads validation evenly through the corpus and is
the same on every run. A re-run with the same inputs, tokenizer and options finds the
fingerprint in metadata.json and does nothing; anything else rebuilds the folder.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import sys
import time
from itertools import chain
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from ..errors import UserError, run_or_exit
from .documents import FORMAT, METADATA, split_files

EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>", "[SEP]")
GOLDEN = (5 ** 0.5 - 1) / 2
BATCH_BYTES = 1 << 20  # documents handed to a worker at a time


class PrepareError(UserError):
    """An input that cannot be prepared; the message names it and the fix."""


# ------------------------------------------------------------------------------ the tokenizer


def tokenizer_file(path: Path) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise PrepareError(f"--tokenizer {str(path)!r} is not a tokenizer.json (or a folder holding "
                           "one): give the path of a Hugging Face tokenizer")
    return path


def load_tokenizer(path: Path):
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # noqa: BLE001 - tokenizers raises bare Exceptions for bad files
        raise PrepareError(f"--tokenizer {str(path)!r} cannot be read by the tokenizers library "
                           f"({str(err).splitlines()[0][:200]}): give a Hugging Face tokenizer.json") from None


def eos_id_of(tokenizer, path: Path, eos: Optional[str]) -> int:
    """The id of the EOS token (see the module docstring for the order of the look-ups)."""
    if eos is None:
        config = path.parent / "tokenizer_config.json"
        if config.is_file():
            token = json.loads(config.read_text()).get("eos_token")
            eos = token.get("content") if isinstance(token, dict) else token
    candidates = [eos] if eos else list(EOS_CANDIDATES)
    for token in candidates:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return int(token_id)
    if eos:
        raise PrepareError(f"--eos {eos!r} is not in the vocabulary of {path}: name a token it has")
    raise PrepareError(f"{path} has none of the usual end-of-text tokens ({', '.join(EOS_CANDIDATES)}): "
                       "name yours with --eos TOKEN")


def token_dtype(vocab_size: int) -> str:
    for name, limit in (("uint8", 2 ** 8), ("uint16", 2 ** 16), ("uint32", 2 ** 32)):
        if vocab_size <= limit:
            return name
    raise PrepareError(f"a vocabulary of {vocab_size} tokens does not fit uint32 token files")


# ------------------------------------------------------------------------------ reading inputs


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def check_inputs(paths: Sequence[Path], field: str) -> None:
    """Every input exists and has a format we read, before anything else runs."""
    for path in paths:
        if not path.is_file():
            raise PrepareError(f"--input {str(path)!r} does not exist")
        if path.suffix not in (".txt", ".jsonl", ".parquet"):
            raise PrepareError(f"--input {str(path)!r}: unknown format {path.suffix!r}; use .txt, "
                               ".jsonl or .parquet")
        if path.suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise PrepareError(f"--input {str(path)!r} is parquet, which needs pyarrow: "
                                   "pip install pyarrow") from None
            try:
                names = pq.ParquetFile(path).schema_arrow.names
            except Exception as err:  # noqa: BLE001 - pyarrow's ArrowInvalid and friends
                raise PrepareError(f"--input {str(path)!r} is not a readable parquet file ({err})") from None
            if field not in names:
                raise PrepareError(f"--input {str(path)!r} has no column {field!r} (it has "
                                   f"{', '.join(names)}): name the text column with --field")


def _txt_blocks(path: Path, whole_file: bool) -> Iterator[tuple[str, str]]:
    """(where, raw text) of every document of a .txt file."""
    try:
        with open(path, encoding="utf-8") as f:
            if whole_file:
                yield f"{path}", f.read()
                return
            block: list[str] = []
            start = 1
            for number, line in enumerate(f, 1):
                if line.strip():
                    if not block:
                        start = number
                    block.append(line)
                elif block:
                    yield f"{path}:{start}", "".join(block).rstrip("\n")
                    block = []
            if block:
                yield f"{path}:{start}", "".join(block).rstrip("\n")
    except UnicodeDecodeError as err:
        raise PrepareError(f"--input {str(path)!r} is not UTF-8 text (byte {err.start} of a "
                           f"chunk: {err.reason}): convert it to UTF-8") from None


def _jsonl_lines(path: Path) -> Iterator[tuple[str, bytes]]:
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                yield f"{path}:{number}", line


def _parquet_texts(path: Path, field: str) -> Iterator[tuple[str, str]]:
    import pyarrow.parquet as pq

    row = 0
    for batch in pq.ParquetFile(path).iter_batches(columns=[field], batch_size=4096):
        for text in batch.column(0).to_pylist():
            row += 1
            yield f"{path} row {row}", text


def document_batches(paths: Sequence[Path], field: str, whole_txt_files: bool
                     ) -> Iterator[tuple[str, list[tuple[str, object]]]]:
    """(format, [(where, raw document)]) in batches of about BATCH_BYTES; jsonl lines are parsed
    in the workers, where the CPU time is."""
    for path in paths:
        kind = path.suffix[1:]
        if kind == "txt":
            items = _txt_blocks(path, whole_txt_files)
        elif kind == "jsonl":
            items = _jsonl_lines(path)
        else:
            items = _parquet_texts(path, field)
        batch, size = [], 0
        for where, raw in items:
            batch.append((where, raw))
            size += len(raw) if raw is not None else 0
            if size >= BATCH_BYTES:
                yield kind, batch
                batch, size = [], 0
        if batch:
            yield kind, batch


# ------------------------------------------------------------------------------ the workers

_worker: dict = {}


def _init_worker(tokenizer_path: str, field: str, eos_id: int, threads: bool) -> None:
    if not threads:  # one process per core already: no thread pool inside each
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker.update(tokenizer=load_tokenizer(Path(tokenizer_path)), field=field, eos_id=eos_id)


def _text_of(kind: str, where: str, raw, field: str) -> str:
    if kind == "jsonl":
        try:
            record = json.loads(raw)
        except ValueError as err:
            raise PrepareError(f"{where} is not valid JSON ({err}): fix or remove that line") from None
        if not isinstance(record, dict) or field not in record:
            keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
            raise PrepareError(f"{where} has no field {field!r} (it has {keys}): name the text field "
                               "with --field")
        raw = record[field]
    if not isinstance(raw, str):
        raise PrepareError(f"{where}: field {field!r} holds {type(raw).__name__}, not text: name a "
                           "text field with --field")
    return raw


def encode_batch(kind: str, items: list) -> tuple[np.ndarray, np.ndarray, int]:
    """(tokens of the documents with EOS after each, their lengths, bytes of text read)."""
    field, eos, tokenizer = _worker["field"], _worker["eos_id"], _worker["tokenizer"]
    texts = [_text_of(kind, where, raw, field) for where, raw in items]
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    ids = [e.ids for e in encode(texts, add_special_tokens=False)]
    lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    with_eos = chain.from_iterable(part for x in ids for part in (x, (eos,)))
    flat = np.fromiter(with_eos, dtype=np.int64, count=int(lengths.sum()))
    nbytes = sum(len(r) if isinstance(r, (str, bytes)) else 0 for _, r in items)
    return flat, lengths, nbytes


def _encode_task(task: tuple[str, list]) -> tuple[np.ndarray, np.ndarray, int]:
    return encode_batch(*task)


# ------------------------------------------------------------------------------ the command


def fingerprint(sources: list[dict], tokenizer_hash: str, options: dict) -> str:
    text = json.dumps({"format": FORMAT, "sources": [s["sha256"] for s in sources],
                       "tokenizer": tokenizer_hash, **options}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def already_prepared(output: Path, key: str) -> bool:
    """True when `output` holds a complete corpus of this fingerprint (files of the right size)."""
    from .documents import CorpusError, DocumentCorpus

    meta = output / METADATA
    try:
        if json.loads(meta.read_text()).get("fingerprint") != key:
            return False
        DocumentCorpus.open(output)
    except (OSError, ValueError, CorpusError):
        return False
    return True


def prepare(tokenizer: Path, inputs: Sequence[Path], output: Path, field: str = "text",
            val_fraction: float = 0.01, workers: int = 1, whole_txt_files: bool = False,
            eos: Optional[str] = None, progress: bool = True) -> dict:
    """Tokenize `inputs` into `output`; returns the metadata (see the module docstring)."""
    if not 0 <= val_fraction < 1:
        raise PrepareError(f"--val-fraction {val_fraction} must be in [0, 1)")
    if workers < 1:
        raise PrepareError(f"--workers {workers} must be at least 1")
    inputs = [Path(p) for p in inputs]
    check_inputs(inputs, field)
    tok_path = tokenizer_file(Path(tokenizer))
    tok = load_tokenizer(tok_path)
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    eos_id = eos_id_of(tok, tok_path, eos)
    dtype = token_dtype(vocab_size)
    sources = [{"path": str(p), "bytes": p.stat().st_size, "sha256": sha256_of(p)} for p in inputs]
    tok_hash = sha256_of(tok_path)
    options = {"field": field, "val_fraction": val_fraction, "txt_documents": "files" if whole_txt_files
               else "blocks", "eos_id": eos_id}
    key = fingerprint(sources, tok_hash, options)
    output = Path(output)
    if already_prepared(output, key):
        print(f"{output} already holds this corpus (same inputs, tokenizer and options): nothing to do",
              file=sys.stderr)
        return json.loads((output / METADATA).read_text())
    output.mkdir(parents=True, exist_ok=True)
    (output / METADATA).unlink(missing_ok=True)  # the folder is incomplete until it is rewritten

    splits = ("train", "val")
    tmp = {s: {k: p.with_name(p.name + ".tmp") for k, p in zip(("tokens", "index"), split_files(output, s))}
           for s in splits}
    files = {s: open(tmp[s]["tokens"], "wb") for s in splits}
    lengths: dict[str, list[np.ndarray]] = {s: [] for s in splits}
    total_bytes = sum(s["bytes"] for s in sources)
    start = time.perf_counter()
    doc_index = 0
    tasks = document_batches(inputs, field, whole_txt_files)
    pool = None
    try:
        if workers > 1:
            methods = mp.get_all_start_methods()
            ctx = mp.get_context("fork" if "fork" in methods else "spawn")
            pool = ctx.Pool(workers, _init_worker, (str(tok_path), field, eos_id, False))
            results = pool.imap(_encode_task, tasks)
        else:
            _init_worker(str(tok_path), field, eos_id, True)
            results = map(_encode_task, tasks)
        bar = _progress(total_bytes, progress)
        for flat, doc_lengths, nbytes in results:
            n = len(doc_lengths)
            to_val = ((doc_index + np.arange(n)) * GOLDEN) % 1.0 < val_fraction
            doc_index += n
            for split, chosen in (("train", ~to_val), ("val", to_val)):
                if chosen.any():
                    keep = np.repeat(chosen, doc_lengths)
                    flat[keep].astype(dtype).tofile(files[split])
                    lengths[split].append(doc_lengths[chosen])
            bar.update(nbytes)
        bar.close()
    except BaseException:
        for f in files.values():
            f.close()
        for paths in tmp.values():
            for p in paths.values():
                p.unlink(missing_ok=True)
        raise
    finally:
        if pool is not None:
            pool.terminate()
    for f in files.values():
        f.close()

    counts = {}
    for split in splits:
        doc_lengths = np.concatenate(lengths[split]) if lengths[split] else np.zeros(0, dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(doc_lengths)]).astype(np.int64)
        with open(tmp[split]["index"], "wb") as f:
            np.save(f, offsets)
        for kind, final in zip(("tokens", "index"), split_files(output, split)):
            tmp[split][kind].replace(final)
        counts[split] = {"documents": int(len(doc_lengths)), "tokens": int(offsets[-1])}
    seconds = time.perf_counter() - start
    metadata = {
        "format": FORMAT, "fingerprint": key,
        "tokenizer": {"name": tok_path.parent.name if tok_path.name == "tokenizer.json" else tok_path.name,
                      "path": str(tok_path), "sha256": tok_hash},
        "vocab_size": vocab_size, "eos_id": eos_id, "dtype": dtype, "splits": counts,
        "sources": sources, **options,
        "throughput": {"seconds": round(seconds, 3), "mb_per_s": round(total_bytes / 1e6 / seconds, 2),
                       "workers": workers},
    }
    meta_tmp = output / (METADATA + ".tmp")
    meta_tmp.write_text(json.dumps(metadata, indent=1))
    meta_tmp.replace(output / METADATA)
    return metadata


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", disable=not enabled,
                file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lightning_attn_parallel.data.prepare",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", required=True, type=Path, help="tokenizer.json or a folder holding one")
    parser.add_argument("--input", required=True, nargs="+", type=Path, help=".txt, .jsonl or .parquet files")
    parser.add_argument("--output", required=True, type=Path, help="folder to write the corpus to")
    parser.add_argument("--field", default="text", help="text field of .jsonl / column of .parquet")
    parser.add_argument("--val-fraction", type=float, default=0.01, help="share of documents held out")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizing processes")
    parser.add_argument("--txt-documents", choices=("blocks", "files"), default="blocks",
                        help=".txt: a document per blank-line-separated block, or per file")
    parser.add_argument("--eos", default=None, help="the end-of-document token (default: found in the tokenizer)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    meta = run_or_exit(lambda: prepare(args.tokenizer, args.input, args.output, field=args.field,
                                       val_fraction=args.val_fraction, workers=args.workers,
                                       whole_txt_files=args.txt_documents == "files", eos=args.eos,
                                       progress=not args.no_progress), log_dir=args.output)
    splits = meta["splits"]
    print(f"{args.output}: {splits['train']['documents']} train / {splits['val']['documents']} val "
          f"documents, {splits['train']['tokens'] + splits['val']['tokens']} {meta['dtype']} tokens "
          f"(vocabulary {meta['vocab_size']}, EOS id {meta['eos_id']}), "
          f"{meta['throughput']['mb_per_s']} MB/s")


if __name__ == "__main__":
    main()
