"""Documents: packing with exact per-document masks, the prepare command, training on its output,
and one clear line for each bad input."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dist_utils import assert_close

from lightning_attn_parallel.data.documents import PADDING_ID, pack_documents, packed_window
from lightning_attn_parallel.models import ModelConfig, build_model
from lightning_attn_parallel.models.loss import IGNORE_INDEX

ROOT = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------------- exactness

LLAMA = dict(family="llama", vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
             ffn_dim=48, max_seq_len=64)
MLA = dict(family="deepseek", attention="mla", vocab_size=64, d_model=32, n_layers=2, n_heads=4,
           kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, ffn_dim=48,
           max_seq_len=64)

# Token counts of documents (EOS included: a document of n tokens gives n - 1 predictions).
CASES = {
    "several documents with padding": [7, 3, 12, 5],
    "documents of length 1": [2, 2, 9, 2, 2],
    "one long document filling the window": [25],
    "a document longer than the window": [40, 6],
}
SEQ_LEN = 24


def _documents(lengths: list[int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    gen = np.random.default_rng(seed)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return gen.integers(1, 64, size=int(offsets[-1])), offsets


def _token_losses(model, input_ids, labels, positions=None, document_ids=None) -> torch.Tensor:
    logits = model.logits(input_ids, positions, document_ids)
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="none").view(labels.shape)


def _grads(model) -> torch.Tensor:
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad()
    return grads


@pytest.mark.parametrize("model_kind", ["llama", "mla"])
@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("case", list(CASES))
def test_packed_window_equals_each_document_alone(case, dtype, rtol, model_kind, one_thread):
    torch.manual_seed(0)
    model = build_model(ModelConfig(**(LLAMA if model_kind == "llama" else MLA))).to(dtype)
    tokens, offsets = _documents(CASES[case])
    packing = pack_documents(offsets, SEQ_LEN)
    windows = [packed_window(tokens, packing, w, pad_id=0) for w in range(packing.num_windows)]
    batch = {k: torch.stack([w[k] for w in windows]) for k in windows[0]}

    packed = _token_losses(model, batch["input_ids"], batch["labels"], batch["positions"],
                           batch["document_ids"])
    packed.sum().backward()
    packed_grads = _grads(model)

    # Reference: every piece (a document, or a seq_len-long part of a longer one) run alone,
    # plain causal attention, positions 0..n-1.
    alone, alone_grad = [], None
    for p in packing.order:
        start, n = int(packing.offset[p]), int(packing.length[p])
        piece = torch.as_tensor(tokens[start:start + n + 1], dtype=torch.long)
        losses = _token_losses(model, piece[None, :-1], piece[None, 1:])
        losses.sum().backward()
        alone.append(losses.detach().flatten())
    alone_grad = _grads(model)

    counted = batch["labels"] != IGNORE_INDEX
    got = packed.detach()[counted]  # windows in order, documents in order within each
    assert int(counted.sum()) == sum(len(a) for a in alone) == int(offsets[-1]) - len(offsets) + 1
    assert_close(got, torch.cat(alone), rtol, name=f"{case}: per-token losses")
    assert_close(packed_grads, alone_grad, rtol, name=f"{case}: gradients")


@pytest.mark.parametrize("hkv, dv", [(2, 8), (4, 6)])
def test_segments_of_the_varlen_path_give_the_masked_result(hkv, dv):
    """The GPU varlen path runs each segment of `document_segments` as its own causal sequence;
    that loop, on CPU, equals the explicit mask (fp64), padding and length-1 documents included."""
    from lightning_attn_parallel.models.document_attention import (document_segments,
                                                                   masked_document_attention,
                                                                   segment_loop_attention)

    torch.manual_seed(0)
    ids = torch.tensor([[0, 0, 0, 1, 2, 2, -1, -1], [0, 0, 0, 0, 0, 0, 0, 0], [0, 1, 2, 3, 4, 5, 6, -1]])
    cu, longest = document_segments(ids)
    assert cu.tolist() == [0, 3, 4, 6, 8, 16] + list(range(17, 25)) and longest == 8
    q = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    k, v = torch.randn(3, hkv, 8, 8, dtype=torch.float64), torch.randn(3, hkv, 8, dv, dtype=torch.float64)
    assert_close(segment_loop_attention(q, k, v, ids, 0.3), masked_document_attention(q, k, v, ids, 0.3), 1e-12)


def test_padding_is_ignored_and_positions_restart():
    tokens, offsets = _documents([4, 2, 3])
    packing = pack_documents(offsets, 10)
    assert packing.num_windows == 1
    w = packed_window(tokens, packing, 0, pad_id=0)
    # best-fit decreasing keeps documents in corpus order inside a window
    assert w["positions"].tolist() == [0, 1, 2, 0, 0, 1, 0, 1, 2, 3]
    assert w["document_ids"].tolist() == [0, 0, 0, 1, 2, 2] + [PADDING_ID] * 4
    assert (w["labels"][6:] == IGNORE_INDEX).all() and (w["labels"][:6] != IGNORE_INDEX).all()
    # labels never cross a document: the last label of each document is its EOS (tokens[end-1])
    assert w["labels"][2] == tokens[3] and w["labels"][3] == tokens[5]


def test_packing_fills_windows_and_padding_mode_reports_waste():
    lengths = np.random.default_rng(1).pareto(1.2, 400).astype(int) * 20 + 2
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    packed, padded = pack_documents(offsets, 256), pack_documents(offsets, 256, pack=False)
    useful = int((lengths - 1).sum())
    for packing in (packed, padded):
        assert int(packing.length.sum()) == useful  # every prediction is in exactly one window
        assert (packing.length <= 256).all()
        sizes = np.add.reduceat(packing.length[packing.order], packing.starts[:-1])
        assert (sizes <= 256).all()
    assert packed.stats(offsets)["packing_efficiency"] > 0.95
    assert padded.stats(offsets)["packing_efficiency"] < 0.5
    assert padded.stats(offsets)["wasted_tokens"] == padded.num_windows * 256 - useful


# --------------------------------------------------------------------------------- prepare

TEXTS = ["The quick brown fox jumps over the lazy dog.",
         "Packing documents\nkeeps every window full.",
         "x",
         "Ünïcödé — and emoji 🚀 survive a byte-level round trip.",
         "def f(x):\n    return x + 1",
         "A longer document. " * 12]


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> Path:
    """A byte-level BPE trained here on a few lines (nothing downloads); vocabulary about 300."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS * 4, trainer)
    folder = tmp_path_factory.mktemp("tokenizer")
    tok.save(str(folder / "tokenizer.json"))
    return folder


def _write_inputs(folder: Path, repeat: int = 3) -> tuple[list[Path], list[str]]:
    """A .txt of blank-line-separated documents and a .jsonl; returns files and texts in order."""
    txt, jsonl = folder / "a.txt", folder / "b.jsonl"
    txt.write_text("\n\n  \n".join(TEXTS[:3]) + "\n", encoding="utf-8")
    jsonl.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(TEXTS[3:] * repeat)),
                     encoding="utf-8")
    return [txt, jsonl], TEXTS[:3] + TEXTS[3:] * repeat


def _decoded(corpus, split: str, tokenizer_path: Path) -> list[str]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path / "tokenizer.json"))
    tokens, offsets = corpus.load(split)
    docs = [tokens[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]
    assert all(d[-1] == corpus.eos_id for d in docs)
    return [tok.decode(d[:-1]) for d in docs]


def test_prepare_round_trip_split_by_documents_and_rerun_is_idempotent(tokenizer_path, tmp_path, capsys):
    from lightning_attn_parallel.data.documents import DocumentCorpus
    from lightning_attn_parallel.data.prepare import GOLDEN, prepare

    inputs, texts = _write_inputs(tmp_path)
    out = tmp_path / "corpus"
    meta = prepare(tokenizer_path, inputs, out, val_fraction=0.3, workers=2, progress=False)
    assert meta["dtype"] == "uint16" and 256 < meta["vocab_size"] <= 300
    assert meta["eos_id"] == 0 and len(meta["sources"]) == 2 and len(meta["tokenizer"]["sha256"]) == 64
    corpus = DocumentCorpus.open(out)
    is_val = [(i * GOLDEN) % 1.0 < 0.3 for i in range(len(texts))]
    assert _decoded(corpus, "train", tokenizer_path) == [t for t, v in zip(texts, is_val) if not v]
    assert _decoded(corpus, "val", tokenizer_path) == [t for t, v in zip(texts, is_val) if v]
    assert meta["splits"]["val"]["documents"] == sum(is_val) > 0

    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    assert prepare(tokenizer_path, inputs, out, val_fraction=0.3, workers=1, progress=False) == meta
    assert "nothing to do" in capsys.readouterr().err
    assert stamps == {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    # another option rebuilds (whole files as documents: 1 + 9 documents)
    meta2 = prepare(tokenizer_path, inputs, out, val_fraction=0.3, whole_txt_files=True, progress=False)
    assert meta2["splits"]["train"]["documents"] + meta2["splits"]["val"]["documents"] == 1 + 9


def test_prepare_reads_parquet(tokenizer_path, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from lightning_attn_parallel.data.documents import DocumentCorpus
    from lightning_attn_parallel.data.prepare import prepare

    pq.write_table(pa.table({"body": TEXTS}), tmp_path / "c.parquet")
    prepare(tokenizer_path, [tmp_path / "c.parquet"], tmp_path / "out", field="body", val_fraction=0.0,
            progress=False)
    corpus = DocumentCorpus.open(tmp_path / "out")
    assert _decoded(corpus, "train", tokenizer_path) == TEXTS


@pytest.mark.parametrize("content, words", [
    ('{"text": "fine"}\n{"text": broken\n', ["b.jsonl:2", "not valid JSON"]),
    ('{"text": "fine"}\n{"body": "no text"}\n', ["b.jsonl:2", "no field 'text'", "body", "--field"]),
    ('{"text": 3}\n', ["b.jsonl:1", "int", "--field"]),
])
def test_prepare_refuses_inputs_that_do_not_parse(tokenizer_path, tmp_path, content, words):
    from lightning_attn_parallel.data.prepare import PrepareError, prepare

    (tmp_path / "b.jsonl").write_text(content)
    with pytest.raises(PrepareError) as info:
        prepare(tokenizer_path, [tmp_path / "b.jsonl"], tmp_path / "out", workers=2, progress=False)
    for word in words:
        assert word in str(info.value), str(info.value)
    assert not (tmp_path / "out" / "metadata.json").exists()
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_prepare_command_line_errors_are_one_line(tokenizer_path, tmp_path, capsys):
    from lightning_attn_parallel.data.prepare import main

    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9\n".encode("latin-1"))
    common = ["--tokenizer", str(tokenizer_path), "--output", str(tmp_path / "o"), "--no-progress"]
    cases = [(["--input", str(tmp_path / "missing.jsonl")], "does not exist"),
             (["--input", str(bad), "--eos", "<nope>"], "--eos '<nope>'"),
             (["--input", str(bad), "--tokenizer", str(tmp_path)], "tokenizer.json")]
    for args, words in cases:
        with pytest.raises(SystemExit) as info:
            main(common + args)
        lines = capsys.readouterr().err.strip().splitlines()
        assert info.value.code == 2 and len(lines) == 1, lines
        assert lines[0].startswith("error: ") and words in lines[0], lines
    # the real command, once: one line on stderr, exit code 2, no traceback
    result = subprocess.run([sys.executable, "-m", "lightning_attn_parallel.data.prepare", *common,
                             "--input", str(bad)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "not UTF-8" in lines[0], result.stderr


# --------------------------------------------------------------------------------- training

QUICK = ["logger=none", "callbacks=none", "trainer.enable_checkpointing=false",
         "trainer.enable_progress_bar=false"]


def _compose(overrides: list[str], run_dir: str):
    from hydra import compose, initialize_config_dir

    from lightning_attn_parallel.config import CONF_DIR, register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose("config", overrides=overrides + [f"run_dir={run_dir}"])


@pytest.fixture(scope="module")
def corpus_dir(tokenizer_path, tmp_path_factory) -> Path:
    from lightning_attn_parallel.data.prepare import prepare

    folder = tmp_path_factory.mktemp("docs")
    inputs, _ = _write_inputs(folder, repeat=60)
    prepare(tokenizer_path, inputs, folder / "corpus", val_fraction=0.1, progress=False)
    return folder / "corpus"


def _train(rank: int, world: int, corpus: str, run_dir: str) -> list[float]:
    import csv

    torch.set_num_threads(1)
    from lightning_attn_parallel.cli import run

    cfg = _compose(["data=documents", f"data.path={corpus}", "data.seq_len=32", "data.micro_batch_size=4",
                    "model.vocab_size=320", "model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2",
                    "model.n_layers=2", "model.ffn_dim=128", "trainer.max_steps=40", "optim.warmup_steps=4",
                    "trainer.val_check_interval=40", "trainer.limit_val_batches=2",
                    "trainer.log_every_n_steps=1", "logger=csv", "callbacks=none",
                    "trainer.enable_checkpointing=false", "trainer.enable_progress_bar=false"], run_dir)
    run(cfg)
    rows = list(csv.DictReader(open(next(Path(run_dir).rglob("metrics.csv")))))
    return [float(r["train/loss"]) for r in rows if r.get("train/loss")]


def test_training_on_prepared_documents_makes_the_loss_fall(corpus_dir, tmp_path):
    from dist_utils import run_distributed

    losses = run_distributed(_train, 1, str(corpus_dir), str(tmp_path / "run"), timeout=300)[0]
    assert len(losses) >= 30
    first, last = np.mean(losses[:3]), np.mean(losses[-5:])
    assert last < 0.6 * first, losses


def _broken(corpus: Path, tmp_path: Path, how: str) -> Path:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(corpus, broken)
    if how == "missing index":
        (broken / "train.idx.npy").unlink()
    elif how == "corrupt index":
        (broken / "train.idx.npy").write_bytes(b"\x93NUMPY garbage")
    elif how == "offsets out of order":
        offsets = np.load(broken / "train.idx.npy")
        offsets[1], offsets[2] = offsets[2], offsets[1]
        np.save(broken / "train.idx.npy", offsets)
    elif how == "truncated tokens":
        data = (broken / "train.bin").read_bytes()
        (broken / "train.bin").write_bytes(data[:-2])
    elif how == "no metadata":
        (broken / "metadata.json").unlink()
    return broken


@pytest.mark.parametrize("how, overrides, words", [
    ("intact", ["model.vocab_size=320", "data.dtype=uint32"], ["data.dtype='uint32'", "uint16"]),
    ("missing index", ["model.vocab_size=320"], ["train.idx.npy", "missing"]),
    ("corrupt index", ["model.vocab_size=320"], ["train.idx.npy", "corrupt"]),
    ("offsets out of order", ["model.vocab_size=320"], ["train.idx.npy", "corrupt"]),
    ("truncated tokens", ["model.vocab_size=320"], ["train.bin", "truncated"]),
    ("no metadata", ["model.vocab_size=320"], ["metadata.json", "data.prepare"]),
])
def test_bad_corpus_fails_with_one_clear_error_before_training(corpus_dir, tmp_path, how, overrides, words):
    from lightning_attn_parallel.cli import run
    from lightning_attn_parallel.errors import UserError

    path = _broken(corpus_dir, tmp_path, how)
    cfg = _compose(["data=documents", f"data.path={path}"] + overrides + QUICK, str(tmp_path / "run"))
    with pytest.raises(UserError) as info:
        run(cfg)
    message = str(info.value)
    assert "\n" not in message and all(w in message for w in words), message
    assert not (tmp_path / "run").exists()


def test_train_command_refuses_a_larger_vocabulary_in_one_line(corpus_dir, tmp_path):
    """The corpus's vocabulary is the model's unless the command line gives a smaller one."""
    result = subprocess.run([sys.executable, "train.py", "data=documents", f"data.path={corpus_dir}",
                             "model.vocab_size=256", f"run_dir={tmp_path / 'run'}"] + QUICK, cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith("error: model.vocab_size=256") and "set model.vocab_size" in lines[0], lines


def test_padded_mode_gives_one_document_per_window_and_counts_the_waste(corpus_dir):
    from lightning_attn_parallel.data.documents import DocumentDataModule

    packed = DocumentDataModule(str(corpus_dir), seq_len=32, micro_batch_size=4)
    padded = DocumentDataModule(str(corpus_dir), seq_len=32, micro_batch_size=4, pack=False)
    for dm in (packed, padded):
        dm.setup()
    assert padded.stats["train"]["wasted_tokens"] > packed.stats["train"]["wasted_tokens"]
    assert padded.stats["train"]["packing_efficiency"] < packed.stats["train"]["packing_efficiency"]
    for i in range(len(padded.train_set)):
        assert padded.train_set[i]["document_ids"].max() == 0  # one document (or piece) per window
    batch = next(iter(packed.train_dataloader()))
    assert {k: tuple(v.shape) for k, v in batch.items()} == {k: (4, 32) for k in
                                                             ("input_ids", "labels", "positions", "document_ids")}


def test_the_window_sampler_resumes_where_it_stopped(corpus_dir):
    from lightning_attn_parallel.data.datamodule import ResumableSampler
    from lightning_attn_parallel.data.documents import DocumentDataModule

    dm = DocumentDataModule(str(corpus_dir), seq_len=32, micro_batch_size=4)
    dm.setup()
    full = list(ResumableSampler(dm.train_set, 1, 0, 4, seed=7))
    resumed = ResumableSampler(dm.train_set, 1, 0, 4, seed=7)
    resumed.skip_batches = 3
    assert list(resumed) == full[12:] and len(full) >= 16
