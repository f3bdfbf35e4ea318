"""Faults on two gloo ranks: a frozen rank (SIGSTOP) or a killed one (SIGKILL) after the
checkpoint of step STOP_STEP.

The surviving rank must exit within strategy.timeout_s (plus a margin for a loaded machine)
with one line that names the lost rank and the operation it was waiting in; the last checkpoint
must then load, and the resumed run must equal the uninterrupted one (tests/test_resume.py's
run, through tests/fault_worker.py).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dist_utils import assert_close, free_port
from test_resume import FINAL_STEP, STOP_STEP, data_module

TIMEOUT_S = 3.0
MARGIN_S = 8.0  # start-up of the heartbeat's diagnosis and process exit on a busy CI machine
WORKER = Path(__file__).with_name("fault_worker.py")


def launch(mode: str, root: Path, ckpt: str | None = None) -> list[subprocess.Popen]:
    """Both ranks as separate processes (so one can be stopped or killed on its own)."""
    root.mkdir(parents=True, exist_ok=True)
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2",
                   LOCAL_RANK=str(rank), NODE_RANK="0")
        args = [sys.executable, str(WORKER), mode, str(root), str(TIMEOUT_S)] + ([ckpt] if ckpt else [])
        procs.append(subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True))
    return procs


def finish(procs: list[subprocess.Popen], timeout: float = 240) -> list[tuple[int, str]]:
    out = []
    for proc in procs:
        _, err = proc.communicate(timeout=timeout)
        out.append((proc.returncode, err))
    return out


def results(root: Path) -> list[dict]:
    return [torch.load(root / f"result-rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("faults")
    data_module(str(base / "cache")).prepare_data()  # the corpus once, before any rank starts
    return base


@pytest.fixture(scope="module")
def uninterrupted(base) -> list[dict]:
    root = base / "uninterrupted"
    for code, err in finish(launch("none", root)):
        assert code == 0, err[-3000:]
    return results(root)


@pytest.mark.parametrize("fault", ["stop", "kill"])
def test_lost_rank_is_named_and_the_run_resumes(base, uninterrupted, fault):
    root = base / fault
    procs = launch(fault, root)
    try:
        _, err = procs[0].communicate(timeout=240)
        ended = time.time()
    finally:
        if procs[1].poll() is None:  # the stopped rank: end it
            procs[1].send_signal(signal.SIGKILL)
        procs[1].communicate(timeout=60)
    assert procs[1].returncode == -signal.SIGKILL
    waited = ended - float((root / "fault_time").read_text())
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert procs[0].returncode == 1 and len(lines) == 1, err[-3000:]
    assert lines[0].startswith("error: PeerFailure: rank 1 "), lines[0]
    assert "gradient_reducer.py" in lines[0], lines[0]  # the operation it waited in
    assert "Traceback" not in err
    assert waited < TIMEOUT_S + MARGIN_S, f"rank 0 exited {waited:.1f} s after rank 1 was lost"

    # The last checkpoint (step STOP_STEP) loads, and the resumed run equals the uninterrupted one.
    resumed_root = base / f"{fault}-resumed"
    for code, err in finish(launch("none", resumed_root, ckpt=str(root / "last.ckpt"))):
        assert code == 0, err[-3000:]
    for rank, (resumed, full) in enumerate(zip(results(resumed_root), uninterrupted)):
        assert resumed["global_step"] == FINAL_STEP
        assert len(resumed["losses"]) == FINAL_STEP - STOP_STEP
        assert_close(torch.tensor(resumed["losses"]), torch.tensor(full["losses"][STOP_STEP:]), rtol=1e-6,
                     name=f"{fault} rank{rank} losses")
        for key, value in full["params"].items():
            assert_close(resumed["params"][key], value, rtol=1e-6, name=f"{fault} rank{rank} {key}")
