"""A corpus of a few hundred paragraphs trains with the README's two commands: the validation
interval and batch are fitted to it with a note, the corpus's vocabulary is used, and the run
is filed under the corpus's name."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from lightning_attn_parallel.data.fit_corpus import fit_loops_to_data
from lightning_attn_parallel.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
WORDS = "the a model trains on small documents every paragraph holds words and numbers of its own".split()


def _corpus_inputs(folder: Path, paragraphs: int = 200) -> Path:
    """A .txt of blank-line-separated paragraphs and a byte-level BPE trained on them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(30, 120))) + "." for _ in range(paragraphs)]
    (folder / "a.txt").write_text("\n\n".join(texts) + "\n")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=1000, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    (folder / "tok").mkdir()
    tok.save(str(folder / "tok" / "tokenizer.json"))
    return folder


def test_a_200_paragraph_corpus_trains_with_the_readme_commands(tmp_path):
    _corpus_inputs(tmp_path)
    prepare = subprocess.run([sys.executable, "-m", "lightning_attn_parallel.data.prepare", "--tokenizer", "tok",
                              "--input", "a.txt", "--output", "corpus"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert prepare.returncode == 0, prepare.stderr[-2000:]
    vocab = json.loads((tmp_path / "corpus" / "metadata.json").read_text())["vocab_size"]
    train = subprocess.run([sys.executable, str(ROOT / "train.py"), "data=documents", "data.path=corpus",
                            "trainer.max_steps=20", "model.n_layers=2", "logger=none",
                            "trainer.enable_checkpointing=false", "trainer.enable_progress_bar=false"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr[-3000:]
    for noise in ("Traceback", "Warning", "💡 Tip", "Total FLOPs", "smaller than the logging interval"):  # nothing a user cannot act on
        assert noise not in train.stderr + train.stdout, noise
    assert f"vocab {vocab}: " in train.stdout  # the model line: the corpus's vocabulary
    report = next(l for l in train.stdout.splitlines() if l.startswith("report: ")).split()[1]
    assert (Path(report) / "loss.png").is_file()
    assert "| final val/loss |" in (Path(report) / "summary.md").read_text(), "validation ran"
    assert "validating every 20 batches counted across epochs" in train.stdout, train.stdout[-3000:]
    assert "validating on batches of 1" in train.stdout
    run_dirs = list((tmp_path / "runs" / "corpus").iterdir())
    assert len(run_dirs) == 1
    saved = OmegaConf.load(run_dirs[0] / ".hydra" / "config.yaml")
    assert saved.model.vocab_size == vocab


def _fake(train: int, val: int) -> SimpleNamespace:
    return SimpleNamespace(setup=lambda stage: None, train_set=range(train), val_set=range(val),
                           val_micro_batch_size=4)


def _cfg(**trainer) -> OmegaConf:
    base = dict(val_check_interval=150, check_val_every_n_epoch=1, limit_val_batches=10, max_steps=20,
                accumulate_grad_batches=2, log_every_n_steps=1)
    return OmegaConf.create({"trainer": {**base, **trainer},
                             "data": {"path": "c", "source": "documents", "seq_len": 256, "micro_batch_size": 4}})


def test_an_interval_longer_than_an_epoch_counts_across_epochs_up_to_the_last_batch():
    cfg = _cfg()
    notes = fit_loops_to_data(cfg, _fake(train=40, val=8), replicas=2)  # 5 batches an epoch
    assert cfg.trainer.check_val_every_n_epoch is None and cfg.trainer.val_check_interval == 40
    assert len(notes) == 1 and "5 batches of one epoch" in notes[0]
    cfg = _cfg(val_check_interval=3)
    assert fit_loops_to_data(cfg, _fake(train=40, val=8), replicas=2) == []
    assert cfg.trainer.check_val_every_n_epoch == 1


@pytest.mark.parametrize("train, val, limit, words", [
    (7, 8, 10, ["7 training windows", "fewer than one batch", "data.micro_batch_size=4 x 2"]),
    (40, 1, 10, ["1 validation window", "--val-fraction", "trainer.limit_val_batches=0"]),
])
def test_data_that_fills_no_batch_is_one_line_before_training(train, val, limit, words):
    with pytest.raises(UserError) as info:
        fit_loops_to_data(_cfg(limit_val_batches=limit), _fake(train, val), replicas=2)
    for word in words:
        assert word in str(info.value), str(info.value)


def test_a_log_interval_longer_than_an_epoch_becomes_the_epoch():
    cfg = _cfg(val_check_interval=3, log_every_n_steps=10)
    notes = fit_loops_to_data(cfg, _fake(train=40, val=8), replicas=2)  # 5 batches an epoch
    assert cfg.trainer.log_every_n_steps == 5 and len(notes) == 1 and "logging every 5 steps" in notes[0]


def test_no_validation_asked_needs_no_validation_split():
    data = _fake(train=40, val=0)
    assert fit_loops_to_data(_cfg(limit_val_batches=0, val_check_interval=2), data, replicas=2) == []
