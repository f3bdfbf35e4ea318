"""Bad steps named: a NaN loss on one of two gloo ranks at a chosen step.

- stop (the default): the run ends with one NonFiniteStep naming the step, the rank whose loss
  was bad (and the ranks whose gradient norm was, after the all-reduce: both), and that rank's
  samples (the corpus file and token range); it is found at the next checkpoint save (which is
  then not written: the last checkpoint holds the step before) or at the next logging step,
  never by a host read on every step;
- skip_nonfinite=1: the first bad step leaves the weights exactly as they were, the second stops.
"""
from __future__ import annotations

import lightning as L
import pytest
import torch

from dist_utils import run_distributed
from lightning_utils import params_of, quiet_trainer
from test_resume import TINY_BYTES_LLAMA, data_module

import lightning_attn_parallel as lap
from lightning_attn_parallel.callbacks.nonfinite import NonFiniteGuard, NonFiniteStep
from lightning_attn_parallel.models import ModelConfig

POISONED_RANK = 1


class PoisonedModule(lap.CausalLMModule):
    """The loss of rank POISONED_RANK is NaN at the given (1-based) optimizer steps."""

    def __init__(self, poison_steps: tuple[int, ...]) -> None:
        super().__init__(ModelConfig(**TINY_BYTES_LLAMA), lr=1e-2, warmup_steps=2, total_steps=8)
        self.poison_steps = poison_steps
        self.poisoned_inputs = []

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.global_step + 1 in self.poison_steps and self.global_rank == POISONED_RANK:
            loss = loss * float("nan")
            self.poisoned_inputs.append(batch["input_ids"].clone())
        return loss


class Snapshots(L.Callback):
    """Parameters after every optimizer step, and a checkpoint after every step when `path`."""

    def __init__(self, path=None) -> None:
        self.path, self.params = path, {}

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.params[trainer.global_step] = params_of(pl_module)
        if self.path:
            trainer.save_checkpoint(self.path)


def _fit(root: str, poison_steps, guard: NonFiniteGuard, path=None, log_every=50) -> dict:
    L.seed_everything(0, verbose=False)
    module = PoisonedModule(poison_steps)
    snapshots = Snapshots(path)
    trainer = quiet_trainer(strategy="attn_hybrid", devices=2, max_steps=6, log_every_n_steps=log_every,
                            callbacks=[guard, snapshots])
    error = None
    try:
        trainer.fit(module, datamodule=data_module(f"{root}/cache"))
    except NonFiniteStep as err:
        error = str(err)
    return {"error": error, "stopped_at": trainer.global_step, "params": snapshots.params,
            "skipped": guard.skipped, "poisoned_inputs": module.poisoned_inputs}


def _worker(rank: int, world: int, root: str) -> dict:
    return {"at_save": _fit(root, (3,), NonFiniteGuard(), path=f"{root}/last.ckpt"),
            "at_log": _fit(root, (2,), NonFiniteGuard(), log_every=4),
            "skip": _fit(root, (3, 5), NonFiniteGuard(skip_nonfinite=1))}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("nonfinite")
    data_module(str(root / "cache")).prepare_data()
    return root, run_distributed(_worker, 2, str(root))


def _assert_names(error: str, step: int, inputs: torch.Tensor) -> None:
    """The line names the step, the ranks, and the poisoned rank's samples: the token ranges of
    the corpus file it gives hold exactly that batch's inputs."""
    assert error is not None and "\n" not in error, error
    prefix = (f"step {step} is not finite: loss on rank {POISONED_RANK}, gradient norm on ranks 0, 1; "
              f"its samples: rank {POISONED_RANK}: ")
    assert error.startswith(prefix) and "rank 0:" not in error, error
    file, ranges = error[len(prefix):].split(";")[0].split(" tokens ")
    corpus = torch.frombuffer(bytearray(open(file, "rb").read()), dtype=torch.uint8).long()
    named = [corpus[int(a):int(b)] for a, b in (r.split("-") for r in ranges.split(", "))]
    assert torch.equal(torch.stack(named), inputs), error


def test_a_bad_step_stops_at_the_next_save_and_the_last_checkpoint_is_the_step_before(results):
    root, ranks = results
    for result in ranks:
        _assert_names(result["at_save"]["error"], 3, ranks[POISONED_RANK]["at_save"]["poisoned_inputs"][0])
    saved = torch.load(root / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values())


def test_without_a_save_it_is_found_at_the_next_logging_step(results):
    _, ranks = results
    for result in ranks:
        _assert_names(result["at_log"]["error"], 2, ranks[POISONED_RANK]["at_log"]["poisoned_inputs"][0])
        assert result["at_log"]["stopped_at"] == 4  # read with the metrics, not every step


def test_skip_nonfinite_leaves_the_weights_and_stops_past_the_budget(results):
    _, ranks = results
    for result in ranks:
        skip = result["skip"]
        assert skip["skipped"] == [3]
        for name, value in skip["params"][2].items():
            assert torch.equal(skip["params"][3][name], value), name
            assert torch.isfinite(skip["params"][4][name]).all() and not torch.equal(skip["params"][4][name], value)
        assert skip["error"].startswith("step 5 is not finite"), skip["error"]
        assert "1 step(s) skipped already under skip_nonfinite=1" in skip["error"]
