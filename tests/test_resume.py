"""Resume: stop at step k, resume, and the loss sequence equals an uninterrupted run's.

Two gloo processes, each a `Trainer(strategy="attn_hybrid", devices=2)` (replicated data
parallelism) on the shuffled embedded corpus of `LMDataModule`, with AdamW and a warm-up +
cosine LR schedule that changes every step. Epochs are cut to 4 batches, so the resumed runs
finish the interrupted epoch and then start a new one (another shuffle, nothing skipped).

- uninterrupted: 6 steps; callbacks also save checkpoints while training runs: after step 3
  (mid-epoch), after step 4 (the epoch's last batch) and from on_train_epoch_end of epoch 0
  (where ModelCheckpoint saves when there is no validation);
- stopped: `fit(max_steps=3)` then `trainer.save_checkpoint` after fit has returned;
- resumed: a new Trainer with `ckpt_path` (each of the four checkpoints) trains to step 6.

The resumed runs' losses from the step after the checkpoint to step 6 and their final parameters
must equal the uninterrupted run's: the sampler must skip exactly the consumed batches of the
interrupted epoch and none of the next, the loops must neither repeat nor drop a batch, and the
optimizer and LR scheduler states must come back.
"""
from __future__ import annotations

import lightning as L
import pytest
import torch

from dist_utils import assert_close, run_distributed
from lightning_utils import LossRecorder, params_of, quiet_trainer

import lightning_attn_parallel as lap
from lightning_attn_parallel.data.datamodule import LMDataModule
from lightning_attn_parallel.models import ModelConfig

TINY_BYTES_LLAMA = dict(vocab_size=256, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                        max_seq_len=32)
STOP_STEP, FINAL_STEP = 3, 6
BATCHES_PER_EPOCH = 4
WORLD = 2


def data_module(cache_dir: str) -> LMDataModule:
    return LMDataModule(source="embedded", seq_len=32, micro_batch_size=4, max_bytes=200_000,
                        cache_dir=cache_dir)


class SaveAtStep(L.Callback):
    """Save a checkpoint while training runs, right after optimizer step `step` (as
    ModelCheckpoint(every_n_train_steps=step) would)."""

    def __init__(self, step: int, path: str) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


class SaveAtFirstEpochEnd(L.Callback):
    """Save a checkpoint from on_train_epoch_end of epoch 0 (as ModelCheckpoint does when the
    run has no validation)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch == 0:
            trainer.save_checkpoint(self.path)


def fit(root: str, max_steps: int, ckpt_path=None, save_path=None, callbacks=(),
        strategy="attn_hybrid") -> dict:
    L.seed_everything(0, verbose=False)
    module = lap.CausalLMModule(ModelConfig(**TINY_BYTES_LLAMA), lr=1e-2, warmup_steps=2,
                                total_steps=FINAL_STEP)
    module.configure_model()
    recorder = LossRecorder()
    trainer = quiet_trainer(strategy=strategy, devices=WORLD, max_steps=max_steps,
                            limit_train_batches=BATCHES_PER_EPOCH, callbacks=[recorder, *callbacks])
    trainer.fit(module, datamodule=data_module(f"{root}/cache"), ckpt_path=ckpt_path)
    if save_path is not None:
        trainer.save_checkpoint(save_path)
    return {"losses": recorder.losses, "params": params_of(module), "global_step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "lr": trainer.optimizers[0].param_groups[0]["lr"]}


CHECKPOINTS = {  # name: the step it was saved after
    "after_fit": STOP_STEP,
    "mid_epoch": STOP_STEP,
    "last_batch_of_epoch": BATCHES_PER_EPOCH,
    "epoch_end": BATCHES_PER_EPOCH,
}


def _worker(rank: int, world: int, root: str) -> dict:
    path = {name: f"{root}/{name}.ckpt" for name in CHECKPOINTS}
    savers = [SaveAtStep(STOP_STEP, path["mid_epoch"]),
              SaveAtStep(BATCHES_PER_EPOCH, path["last_batch_of_epoch"]),
              SaveAtFirstEpochEnd(path["epoch_end"])]
    results = {"uninterrupted": fit(root, FINAL_STEP, callbacks=savers),
               "stopped": fit(root, STOP_STEP, save_path=path["after_fit"])}
    for name in CHECKPOINTS:
        results[name] = fit(root, FINAL_STEP, ckpt_path=path[name])
    return results


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    data_module(str(root / "cache")).prepare_data()  # build the corpus once, before the ranks start
    return run_distributed(_worker, WORLD, str(root))


def test_ranks_see_different_shuffled_data(results):
    first, second = (r["uninterrupted"]["losses"] for r in results)
    assert len(first) == FINAL_STEP and first != second


def test_stopped_run_is_the_start_of_the_uninterrupted_one(results):
    for result in results:
        assert result["stopped"]["losses"] == result["uninterrupted"]["losses"][:STOP_STEP]


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_resumed_run_continues_the_uninterrupted_one(results, name):
    saved_at = CHECKPOINTS[name]
    for rank, result in enumerate(results):
        full, resumed = result["uninterrupted"], result[name]
        assert resumed["global_step"] == full["global_step"] == FINAL_STEP
        assert resumed["epoch"] == full["epoch"]
        assert resumed["lr"] == full["lr"]
        assert len(resumed["losses"]) == FINAL_STEP - saved_at
        assert_close(torch.tensor(resumed["losses"]), torch.tensor(full["losses"][saved_at:]), rtol=1e-6,
                     name=f"{name} rank{rank} losses of steps {saved_at + 1}..{FINAL_STEP}")
        for key, value in full["params"].items():
            assert_close(resumed["params"][key], value, rtol=1e-6, name=f"{name} rank{rank} {key}")
