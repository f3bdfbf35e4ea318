"""A smoke run says what its model became, and its saved config is that model."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parent.parent


def test_a_smoke_run_prints_the_shrunk_model_and_saves_it(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "+recipe=deepseek_67b", "+scale=smoke",
                             "dry_run=true", f"run_dir={tmp_path / 'run'}"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    line = next(l for l in result.stdout.splitlines() if l.startswith("smoke scale:"))
    assert "d_model 64 (was 8192)" in line and "4 layers (was 95)" in line and "vocab 256 (was 102400)" in line
    assert "(was 67.4B)" in line
    saved = OmegaConf.load(tmp_path / "run" / ".hydra" / "config.yaml")
    assert (saved.model.d_model, saved.model.n_layers, saved.model.vocab_size) == (64, 4, 256)
    assert not (tmp_path / "runs").exists(), "run_dir=X is Hydra's folder too"
