"""One rank of a two-rank training run in which rank 1 freezes or dies (tests/test_faults.py).

Started as its own process per rank (LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT in the
environment, so Lightning starts no processes itself):

    python tests/fault_worker.py MODE ROOT TIMEOUT_S [CKPT]

MODE: `none` trains to the end; `stop` / `kill` make rank 1 send itself SIGSTOP / SIGKILL right
after the checkpoint of step STOP_STEP is written (recording the time in ROOT/fault_time). Every
step's checkpoint goes to ROOT/last.ckpt. `term` / `usr1` make rank 1 send itself SIGTERM /
SIGUSR1 after step STOP_STEP instead, and no checkpoint is written but the preemption's (also
ROOT/last.ckpt); the worker then exits with the preemption's requeue code. A run that finishes
writes ROOT/result-rank<R>.pt; a failure ends as one line `error: <type>: <first line>` and exit
code 1, as train.py does.
"""
from __future__ import annotations

import os
import signal
import sys
import time

import lightning as L
import torch

sys.path.insert(0, os.path.dirname(__file__))
from test_resume import FINAL_STEP, STOP_STEP, fit  # noqa: E402

from lightning_attn_parallel.callbacks.preemption import Preemption  # noqa: E402
from lightning_attn_parallel.strategy import AttnHybridStrategy  # noqa: E402

SIGNALS = {"stop": signal.SIGSTOP, "kill": signal.SIGKILL, "term": signal.SIGTERM, "usr1": signal.SIGUSR1}


class SaveEveryStep(L.Callback):
    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, *args) -> None:
        trainer.save_checkpoint(self.path)


class Fault(L.Callback):
    """Rank 1 (or the rank in FAULT_RANK) stops or kills itself after step `step` (and its
    checkpoint)."""

    def __init__(self, mode: str, step: int, root: str) -> None:
        self.mode, self.step, self.root = mode, step, root

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step and trainer.global_rank == int(os.environ.get("FAULT_RANK", 1)) and self.mode != "none":
            with open(f"{self.root}/fault_time", "w") as f:
                f.write(repr(time.time()))
            os.kill(os.getpid(), SIGNALS[self.mode])


def main() -> None:
    mode, root, timeout_s = sys.argv[1], sys.argv[2], float(sys.argv[3])
    ckpt = sys.argv[4] if len(sys.argv) > 4 else None
    torch.set_num_threads(1)
    preemption = Preemption(dirpath=root)
    # the preemption's all-reduce would be where a lost rank is first missed: only where tested
    preempting = mode in ("term", "usr1")
    callbacks = ([] if preempting else [SaveEveryStep(f"{root}/last.ckpt")]) + [Fault(mode, STOP_STEP, root)] + \
        ([preemption] if preempting else [])
    result = fit(os.path.dirname(root), FINAL_STEP, ckpt_path=ckpt, callbacks=callbacks,
                 strategy=AttnHybridStrategy(timeout_s=timeout_s))
    torch.save(result, f"{root}/result-rank{os.environ['LOCAL_RANK']}.pt")
    if preemption.requested_exit_code is not None:
        sys.exit(preemption.requested_exit_code)


if __name__ == "__main__":
    try:
        main()
    except Exception as error:  # noqa: BLE001 - the one-line report of train.py
        lines = [line for line in str(error).splitlines() if line.strip()]
        print(f"error: {type(error).__name__}: {lines[0] if lines else ''}", file=sys.stderr, flush=True)
        sys.exit(1)
