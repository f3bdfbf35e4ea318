"""Asynchronous checkpoints on two gloo ranks (AttnHybridStrategy(async_checkpoint=True)).

- a checkpoint saved in the background after step STOP_STEP (a folder, under the replicated
  plan too) resumes into the uninterrupted run (losses and final weights), and the last save of
  the run is complete once fit returns;
- a background write that fails on rank 1 only is raised on both ranks at a following step, as
  one CheckpointError naming the path, the free bytes and the reason; the partial folder is
  removed and the previous checkpoint is the one that loads;
- ModelCheckpoint's retention (top-k by a monitored metric, plus last) keeps exactly its files.
"""
from __future__ import annotations

import errno
import os
from concurrent.futures import Future
from pathlib import Path

import lightning as L
import pytest
import torch

from dist_utils import assert_close, run_distributed
from test_resume import FINAL_STEP, STOP_STEP, SaveAtStep, data_module, fit

from lightning_attn_parallel import async_checkpoint
from lightning_attn_parallel.checkpoint import CheckpointError
from lightning_attn_parallel.strategy import AttnHybridStrategy


def _failing_on_rank_1(real):
    """async_save whose second write fails at once on rank 1 (ENOSPC) while the others' writes
    go on: only the ranks' agreement keeps rank 0 from renaming its folder into place."""
    calls = []

    def async_save(*args, **kwargs):
        response = real(*args, **kwargs)
        calls.append(1)
        if int(os.environ["RANK"]) != 1 or len(calls) != 2:
            return response
        failed: Future = Future()
        failed.set_exception(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
        return failed
    return async_save


def _worker(rank: int, world: int, root: str) -> dict:
    out = {"uninterrupted": fit(root, FINAL_STEP)}
    saved = fit(root, FINAL_STEP, callbacks=[SaveAtStep(STOP_STEP, f"{root}/async.ckpt"),
                                             SaveAtStep(FINAL_STEP, f"{root}/final.ckpt")],
                strategy=AttnHybridStrategy(async_checkpoint=True))
    out["final_complete"] = Path(f"{root}/final.ckpt/.metadata").is_file()
    out["resumed"] = fit(root, FINAL_STEP, ckpt_path=f"{root}/async.ckpt")
    out["same_while_saving"] = saved["losses"] == out["uninterrupted"]["losses"]

    real = async_checkpoint.dcp.async_save
    async_checkpoint.dcp.async_save = _failing_on_rank_1(real)
    steps = StepsSeen()
    try:
        fit(root, FINAL_STEP, callbacks=[SaveAtStep(2, f"{root}/kept.ckpt"), SaveAtStep(3, f"{root}/kept.ckpt"), steps],
            strategy=AttnHybridStrategy(async_checkpoint=True))
        out["error"] = None
    except CheckpointError as err:
        out["error"] = str(err)
    finally:
        async_checkpoint.dcp.async_save = real
    out["raised_after_step"] = steps.last
    return out


class StepsSeen(L.Callback):
    def __init__(self) -> None:
        self.last = 0

    def on_train_batch_end(self, trainer, *args) -> None:
        self.last = trainer.global_step


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("async")
    data_module(str(root / "cache")).prepare_data()
    return root, run_distributed(_worker, 2, str(root))


def test_a_background_save_resumes_exactly(results):
    _, ranks = results
    for rank, result in enumerate(ranks):
        assert result["same_while_saving"] and result["final_complete"]
        full, resumed = result["uninterrupted"], result["resumed"]
        assert resumed["global_step"] == FINAL_STEP
        assert_close(torch.tensor(resumed["losses"]), torch.tensor(full["losses"][STOP_STEP:]), rtol=1e-6,
                     name=f"rank{rank} losses")
        for key, value in full["params"].items():
            assert_close(resumed["params"][key], value, rtol=1e-6, name=f"rank{rank} {key}")


def test_a_background_failure_is_raised_on_every_rank_and_the_previous_checkpoint_stays(results):
    root, ranks = results
    path = root / "kept.ckpt"
    for result in ranks:
        message = result["error"]
        assert message and message.startswith(f"could not write checkpoint {path}"), message
        assert "free" in message and "the disk is full" in message and "\n" not in message, message
        assert result["raised_after_step"] < FINAL_STEP  # at a step soon after, not at the end
    assert not (root / "kept.ckpt.tmp").exists()
    extra = torch.load(path / "extra.pt", weights_only=True)
    assert extra["global_step"] == 2
