"""The embedded default corpus: bytes of the Python standard library's own sources.

Every Python install has them, so `python train.py` trains on real text with no download.
Bytes are tokens (vocabulary 256); files are taken in sorted order so the corpus, and the
train/validation split, are the same on every machine with the same Python version.
"""
from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

import numpy as np

DEFAULT_MAX_BYTES = 8 * 2**20


def stdlib_source_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__")
    return sorted(p for p in root.rglob("*.py") if not any(part in skip for part in p.relative_to(root).parts))


def build_embedded_corpus(cache_dir: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> Path:
    """Concatenate stdlib sources into `cache_dir/embedded-<hash>.bin` (uint8), once."""
    files = stdlib_source_files()
    if not files:
        raise FileNotFoundError("no Python standard library sources found to build the embedded corpus; "
                                "set data.source=tokens and data.train_path to a token file")
    key = hashlib.sha1(("\n".join(str(f) for f in files) + str(max_bytes)).encode()).hexdigest()[:12]
    path = Path(cache_dir) / f"embedded-{key}.bin"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    chunks, total = [], 0
    for f in files:
        data = f.read_bytes() + b"\n"
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    tmp = path.with_suffix(".tmp")
    np.frombuffer(b"".join(chunks)[:max_bytes], dtype=np.uint8).tofile(tmp)
    tmp.replace(path)
    return path
