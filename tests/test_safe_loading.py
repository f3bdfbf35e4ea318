"""A checkpoint that would run code when unpickled is refused, and the code never runs.

The malicious file's pickle calls `os.system("touch MARKER")` while loading; every reader of
checkpoint files (single file, folder's extra.pt, metadata-only pre-flight read, the export CLI,
train.py's ckpt_path) must refuse it with one line naming the file, and MARKER must not exist.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_bad_inputs import QUICK, ROOT, assert_one_line_user_error

from lightning_attn_parallel import checkpoint as ckpt
from lightning_attn_parallel.models import ModelConfig
from lightning_attn_parallel.safe_load import UnsafeCheckpointError


class RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def malicious(tmp_path) -> tuple[Path, Path, Path]:
    """(a .ckpt file, a checkpoint folder whose extra.pt is the same pickle, the marker)."""
    marker = tmp_path / "MARKER"
    payload = {"state_dict": {}, "hyper_parameters": {"model": {}}, "loops": RunsCode(marker)}
    file = tmp_path / "evil.ckpt"
    torch.save(payload, file)
    folder = tmp_path / "evil_folder"
    model = torch.nn.Linear(2, 2)
    ckpt.save_distributed(folder, model, None, {"step": 1})
    torch.save(payload, folder / ckpt.EXTRA_FILE)
    return file, folder, marker


def test_every_reader_refuses_a_pickle_that_runs_code(malicious):
    file, folder, marker = malicious
    readers = {"read_checkpoint_file": lambda: ckpt.read_checkpoint_file(file),
               "saved_hyperparameters(file)": lambda: ckpt.saved_hyperparameters(file),
               "saved_hyperparameters(folder)": lambda: ckpt.saved_hyperparameters(folder),
               "load_distributed": lambda: ckpt.load_distributed(folder, torch.nn.Linear(2, 2))}
    for name, read in readers.items():
        with pytest.raises(UnsafeCheckpointError) as error:
            read()
        message = str(error.value)
        assert "needs arbitrary unpickling" in message and "posix.system" in message, (name, message)
        assert str(file) in message or str(folder) in message, (name, message)
        assert "\n" not in message
    assert not marker.exists(), "unpickling ran the checkpoint's code"


def test_train_py_and_export_refuse_it_with_exit_2(malicious, tmp_path):
    file, folder, marker = malicious
    result = subprocess.run([sys.executable, "train.py", f"ckpt_path={file}", *QUICK, f"run_dir={tmp_path / 'run'}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert_one_line_user_error(result, str(file), "needs arbitrary unpickling")
    result = subprocess.run([sys.executable, "-m", "lightning_attn_parallel.export", str(folder),
                             str(tmp_path / "out"), "--format", "hf"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("error: ") and str(folder) in lines[0] and "arbitrary unpickling" in lines[0]
    assert not marker.exists(), "unpickling ran the checkpoint's code"


def test_the_packages_own_types_and_damaged_files(tmp_path):
    """A config object in the hyper-parameters loads; a truncated file is named as damaged,
    not as unsafe."""
    path = tmp_path / "typed.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "hyper_parameters": {"config": ModelConfig(n_layers=3)},
                "dir": Path("/x")}, path)
    loaded = ckpt.read_checkpoint_file(path)
    assert loaded["hyper_parameters"]["config"].n_layers == 3
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ckpt.CheckpointError, match="corrupt or truncated"):
        ckpt.read_checkpoint_file(truncated)
