"""Kill soak: two gloo ranks train with a checkpoint after every step (blocking and asynchronous in
turn, tests/soak_worker.py); a random rank is killed (SIGKILL or SIGTERM) inside a chosen phase
(a step, a blocking save, an asynchronous save being started, one in flight), the other is then
killed as a scheduler would, and the job is started again from the checkpoint, CYCLES times. The
last start runs to the end: its final weights must equal an uninterrupted run's exactly, and every
start must have found a complete checkpoint once one had been written (a half-written or lost
one fails the load in the worker).
"""
from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import torch

import soak_worker
from dist_utils import CONTEXT, free_port

TOTAL_STEPS = 40
CYCLES = 10
PHASES = ["step", "sync-save", "async-save", "async-in-flight"]


# Ranks are forked from the test ranks' server (dist_utils), which has imported torch and the
# package once: a job start costs milliseconds instead of seconds of imports, so ten kill cycles
# fit in a CI budget.


def launch(root: Path) -> list:
    port = free_port()
    procs = [CONTEXT.Process(target=soak_worker.train, args=(root, TOTAL_STEPS, rank, port)) for rank in (0, 1)]
    for proc in procs:
        proc.start()
    return procs


def wait_for_phase(root: Path, rank: int, wanted: str, after: int, procs, timeout: float = 60) -> str:
    """Poll the rank's phase file until it shows `wanted` at a step past `after`."""
    file, end = root / f"phase-rank{rank}", time.time() + timeout
    while time.time() < end:
        text = file.read_text() if file.exists() else ""
        words = text.split()
        if len(words) > 1 and int(words[1]) > after and (words[0] == wanted or words[-1] == wanted):
            return text
        if any(p.exitcode not in (None, 0) for p in procs):
            raise AssertionError(f"a rank failed (exit codes {[p.exitcode for p in procs]}; its error is above)")
        time.sleep(0.002)
    raise AssertionError(f"rank {rank} never reached {wanted!r}")


def complete(folder: Path) -> bool:
    return (folder / ".metadata").is_file() and (folder / "extra.pt").is_file()


def finish(procs) -> None:
    for proc in procs:
        proc.join(120)
        assert proc.exitcode == 0, f"exit code {proc.exitcode} (its error is above)"


def test_random_kills_lose_nothing(tmp_path):
    reference = tmp_path / "uninterrupted"
    reference.mkdir()
    finish(launch(reference))
    soak = tmp_path / "soak"
    soak.mkdir()
    rng = random.Random(0)
    kills = []
    saved = False  # a checkpoint has been written: from then on one must always be complete
    for cycle in range(CYCLES):
        start = torch.load(soak / "ckpt" / "extra.pt", weights_only=True)["step"] if saved else 0
        for file in soak.glob("phase-rank*"):
            file.unlink()
        procs = launch(soak)
        victim, sig, wanted = rng.randrange(2), rng.choice([signal.SIGKILL, signal.SIGTERM]), PHASES[cycle % 4]
        seen = wait_for_phase(soak, victim, wanted, start + 1, procs)
        time.sleep(rng.uniform(0, 0.04))  # somewhere inside the phase, not at its first instruction
        os.kill(procs[victim].pid, sig)
        time.sleep(0.05)
        for proc in procs:  # the scheduler ends the job
            proc.kill()
            proc.join()
        kills.append((victim, sig.name, seen))
        # a save killed between its two renames leaves the previous folder as ckpt.old (the error
        # message tells users to rename it back); nothing else may be missing or half-written
        ckpt, old = soak / "ckpt", soak / "ckpt.old"
        if not ckpt.exists() and complete(old):
            os.replace(old, ckpt)
        assert complete(ckpt) or not saved, f"the checkpoint was lost or left incomplete: {kills}"
        saved = complete(ckpt)
    assert {k[2].split()[-1] if "async-in-flight" in k[2] else k[2].split()[0] for k in kills} >= set(PHASES), kills
    finish(launch(soak))
    for rank in (0, 1):
        final = torch.load(soak / f"final-rank{rank}.pt", weights_only=True)
        expected = torch.load(reference / f"final-rank{rank}.pt", weights_only=True)
        for key, value in expected.items():
            assert torch.equal(final[key], value), (rank, key, kills)
