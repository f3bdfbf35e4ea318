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


def test_run_dir_is_also_hydras_folder(tmp_path):
    """Hydra's record of a run (.hydra/) lands in the run's own folder, not in runs/ of the
    folder the command ran from."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "optim.lr=-1", f"run_dir={tmp_path / 'run'}"],
                            cwd=cwd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.startswith("error: optim.lr=-1.0"), result.stderr
    assert list(cwd.iterdir()) == [] and (tmp_path / "run" / ".hydra").is_dir()


def test_the_wandb_logger_leaves_the_unset_anonymous_setting_out(tmp_path):
    from lightning.pytorch.loggers import WandbLogger

    from lightning_attn_parallel.lightning_workarounds import without_wandb_anonymous

    logger = without_wandb_anonymous(WandbLogger(save_dir=str(tmp_path), offline=True))
    assert "anonymous" not in logger._wandb_init
    asked = without_wandb_anonymous(WandbLogger(save_dir=str(tmp_path), offline=True, anonymous=True))
    assert asked._wandb_init["anonymous"] == "allow"
