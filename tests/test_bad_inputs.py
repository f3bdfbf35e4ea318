"""Bad input ends as one line `error: ...` naming the value and the fix, exit code 2, no
traceback, before any process group starts; any other failure ends as one line plus the path of
a log holding the traceback, exit code 1.

Most classes are checked in-process against `cli.run` (fast); a handful run `train.py` as a
subprocess to prove the whole path: one stderr line, exit code, no traceback, no process group.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lightning_attn_parallel.errors import UserError, run_or_exit

ROOT = Path(__file__).resolve().parent.parent
QUICK = ["logger=none", "callbacks=none", "trainer.enable_progress_bar=false"]


def train(args: list[str], tmp_path: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *args, *QUICK, f"run_dir={tmp_path / 'run'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def assert_one_line_user_error(result: subprocess.CompletedProcess, *words: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    assert "Traceback" not in result.stderr + result.stdout
    # The strategy logs this when it starts the process group: the error came before it.
    assert "Initializing distributed" not in result.stderr + result.stdout
    assert "Seed set" not in result.stderr + result.stdout  # cli.run seeds once the checks pass
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------- the whole path, as a subprocess
@pytest.mark.parametrize("args, words", [
    (["+recipe=no_such_recipe"], ["no_such_recipe", "tiny", "deepseek_67b"]),
    (["trainer.max_stepz=3"], ["trainer.max_stepz"]),
    (["+optim.betaz=0.9"], ["optim.betaz", "lr"]),
    (["trainer.max_steps=[1"], ["trainer.max_steps=[1"]),
    (["trainer.accelerator=cpu", "trainer.devices=3", "strategy.plan.tp=2"], ["tp=2", "world size 3"]),
])
def test_train_py_reports_bad_input_as_one_line(args, words, tmp_path):
    assert_one_line_user_error(train(args, tmp_path), *words)


# ---------------------------------------------------------------- the helper other entry points use
def test_run_or_exit_reports_user_errors_as_one_line_exit_2(capsys):
    def main():
        raise UserError("data.path='x.bin' does not exist: give an existing file")

    with pytest.raises(SystemExit) as info:
        run_or_exit(main)
    assert info.value.code == 2
    assert capsys.readouterr().err == "error: data.path='x.bin' does not exist: give an existing file\n"


def test_run_or_exit_logs_the_traceback_of_other_failures(capsys, tmp_path):
    def main():
        raise RuntimeError("collective timed out\nsecond line")

    with pytest.raises(SystemExit) as info:
        run_or_exit(main, log_dir=lambda: tmp_path / "run")
    assert info.value.code == 1
    err = capsys.readouterr().err
    log = tmp_path / "run" / "error-rank0.log"
    assert err == f"error: RuntimeError: collective timed out (traceback: {log})\n"
    assert "Traceback" in log.read_text() and "second line" in log.read_text()
