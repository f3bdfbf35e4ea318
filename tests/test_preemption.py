"""Preemption on two gloo ranks: rank 1 gets a real SIGTERM after step STOP_STEP.

Both ranks must finish that step, agree, write one checkpoint (ROOT/last.ckpt, nothing else
saves), stop, and exit with 128 + the signal; the run resumed from that checkpoint must equal the
uninterrupted one (losses of the remaining steps and the final weights). Before this, Lightning's
own handler stopped the run with exit code 0 and no checkpoint.
"""
from __future__ import annotations

import os
import signal

import torch

from dist_utils import assert_close
from test_faults import finish, launch, results
from test_resume import FINAL_STEP, STOP_STEP, data_module

from lightning_attn_parallel.callbacks.preemption import Preemption


def test_sigterm_saves_stops_requeues_and_resumes_exactly(tmp_path, uninterrupted_two_rank_run):
    data_module(str(tmp_path / "cache")).prepare_data()
    root = tmp_path / "term"
    for code, err in finish(launch("term", root)):
        assert code == 128 + signal.SIGTERM, (code, err[-3000:])
        assert "Traceback" not in err, err[-3000:]
    stopped = results(root)
    assert [r["global_step"] for r in stopped] == [STOP_STEP, STOP_STEP]
    assert torch.load(root / "last.ckpt", weights_only=True)["global_step"] == STOP_STEP

    resumed_root = tmp_path / "resumed"
    for code, err in finish(launch("none", resumed_root, ckpt=str(root / "last.ckpt"))):
        assert code == 0, err[-3000:]
    for rank, (resumed, full, cut) in enumerate(zip(results(resumed_root), uninterrupted_two_rank_run, stopped)):
        assert resumed["global_step"] == FINAL_STEP
        assert cut["losses"] == full["losses"][:STOP_STEP]
        assert_close(torch.tensor(resumed["losses"]), torch.tensor(full["losses"][STOP_STEP:]), rtol=1e-6,
                     name=f"rank{rank} losses after the preemption")
        for key, value in full["params"].items():
            assert_close(resumed["params"][key], value, rtol=1e-6, name=f"rank{rank} {key}")


def test_each_configured_signal_is_noted_and_the_handlers_are_given_back():
    """SIGUSR1 (SLURM's usual warning signal) takes the same path as SIGTERM: noted by the
    handler, acted on at the end of the step; the previous handlers come back at teardown."""
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    preemption = Preemption(signals=["SIGUSR1", signal.SIGTERM], exit_code=99)

    class Trainer:
        global_step = 0

    preemption.on_train_start(Trainer(), None)
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert preemption.received == signal.SIGUSR1 and preemption._agree() == signal.SIGUSR1
    finally:
        preemption.teardown(Trainer(), None, "fit")
    assert {s: signal.getsignal(s) for s in before} == before
