"""Pipeline parallelism composed with tensor and context parallelism equals one process on the
same global batch, and a checkpoint folder saved under pp=4 resumes under pp=2 x tp=2.

One spawn of 4 gloo processes trains (fp64, gradient clipping on, 3 steps) pp=2 x tp=2 (with and
without sequence parallelism: the stages exchange whole activations, or each rank's sequence
shard) and pp=2 x cp=2 (each micro-batch's load-balanced sequence shards, with their global
positions, through interleaved 1F1B, and the forward-only schedule for validation); then pp=4
saves a DCP folder after 2 steps, which pp=2 x tp=2 resumes for one more. Losses, the first
step's gradients and the parameters are compared with one process (relative error below 1e-10
in fp64).
"""
from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.distributed.tensor import DTensor

from dist_utils import assert_close, run_distributed
from lightning_utils import fp64_causal_lm, FixedTokens, LossRecorder, loader, params_of, quiet_trainer

import lightning_attn_parallel as lap
from lightning_attn_parallel.plan import ParallelPlan, PlanError

TINY_LLAMA = dict(vocab_size=64, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=64,
                  max_seq_len=32)
WORLD = 4
ROWS = 4  # sequences per batch: every plan here has one data-parallel rank
STEPS = 3
CLIP = 0.05  # small enough to clip every step: the norm spans the stages and the TP shards
CASES = {
    # name: (plan kwargs, validate)
    "pp2_tp2": (dict(pp=2, tp=2, pp_microbatches=2), False),
    "pp2_tp2_sequence_parallel": (dict(pp=2, tp=2, sequence_parallel=True, pp_microbatches=2), False),
    "pp2_cp2_interleaved": (dict(pp=2, cp=2, pp_schedule="interleaved_1f1b", pp_microbatches=2), True),
}
SAVE_PLAN, LOAD_PLAN = dict(pp=4, pp_microbatches=4), dict(pp=2, tp=2, pp_microbatches=2)
STEPS_PER_EPOCH, SAVE_STEP, FINAL_STEP = 2, 2, 3  # saved at an epoch boundary



def make_module() -> lap.CausalLMModule:
    return fp64_causal_lm(TINY_LLAMA, FINAL_STEP)


class FirstGradients(L.Callback):
    """The gradients of the first optimizer step, whole (before clipping), by parameter name:
    Adam's update barely depends on the gradients' scale, the gradients do."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == 0:
            self.grads = {name: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).detach().clone()
                          for name, p in pl_module.named_parameters() if p.grad is not None}


def fit(plan_kwargs: dict, max_steps: int, validate: bool = False, ckpt_path=None, save_path=None,
        limit=None) -> dict:
    module, recorder, grads = make_module(), LossRecorder(average_over_ranks=True), FirstGradients()
    trainer = quiet_trainer(strategy=lap.AttnHybridStrategy(plan=lap.ParallelPlan(**plan_kwargs)),
                            devices=WORLD, max_steps=max_steps, gradient_clip_val=CLIP, callbacks=[recorder, grads],
                            limit_train_batches=limit, limit_val_batches=1 if validate else 0)
    val = loader(FixedTokens(seed=1), ROWS) if validate else None
    trainer.fit(module, loader(FixedTokens(), ROWS), val, ckpt_path=ckpt_path)
    if save_path is not None:
        trainer.save_checkpoint(save_path)
    return {"losses": recorder.losses, "params": params_of(module), "start_params": recorder.start_params,
            "val": float(trainer.callback_metrics["val/loss"]) if validate else None,
            "split": {name for name, p in module.named_parameters() if isinstance(p, DTensor)},
            "grads": grads.grads}


def _worker(rank: int, world: int, root: str) -> dict:
    results = {name: fit(plan, STEPS, validate, limit=STEPS) for name, (plan, validate) in CASES.items()}
    results["saved"] = fit(SAVE_PLAN, SAVE_STEP, limit=STEPS_PER_EPOCH, save_path=f"{root}/pp4")
    results["resumed"] = fit(LOAD_PLAN, FINAL_STEP, limit=STEPS_PER_EPOCH, ckpt_path=f"{root}/pp4")
    return results


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_distributed(_worker, WORLD, str(tmp_path_factory.mktemp("pipeline_tp_cp")), timeout=400)


def one_process(max_steps: int, validate: bool = False, limit=None) -> dict:
    module, recorder, grads = make_module(), LossRecorder(), FirstGradients()
    trainer = quiet_trainer(devices=1, max_steps=max_steps, gradient_clip_val=CLIP, callbacks=[recorder, grads],
                            limit_train_batches=limit, limit_val_batches=1 if validate else 0)
    trainer.fit(module, loader(FixedTokens(), ROWS), loader(FixedTokens(seed=1), ROWS) if validate else None)
    return {"losses": recorder.losses, "params": params_of(module), "grads": grads.grads,
            "val": float(trainer.callback_metrics["val/loss"]) if validate else None}


@pytest.mark.parametrize("name", list(CASES))
def test_pipeline_with_tp_or_cp_equals_one_process(results, name):
    plan, validate = CASES[name]
    reference = one_process(STEPS, validate, limit=STEPS)  # one epoch, then validation
    stages = set()
    for rank, result in enumerate(results):
        got = result[name]
        assert got["params"] and set(got["params"]) < set(reference["params"]), name
        stages.add(frozenset(got["params"]))
        assert set(got["grads"]) == set(got["params"])
        for key, value in got["grads"].items():
            assert_close(value, reference["grads"][key], rtol=1e-10, name=f"{name} rank{rank} gradient {key}")
        for key, value in got["params"].items():
            assert_close(value, reference["params"][key], rtol=1e-10, name=f"{name} rank{rank} {key}")
        assert_close(torch.tensor(got["losses"]), torch.tensor(reference["losses"]), rtol=1e-10,
                     name=f"{name} rank{rank} losses")
        if plan.get("tp", 1) > 1:  # every stage's projections, embedding and head are split over tp
            matrices = {k for k in got["params"] if k.endswith(("wq.weight", "w2.weight"))
                        or k.startswith(("tok_embeddings.", "output."))}
            assert matrices and matrices <= got["split"], (rank, matrices - got["split"])
        if validate:
            assert abs(got["val"] - reference["val"]) < 1e-10 * abs(reference["val"]), (got["val"], reference["val"])
    assert set().union(*stages) == set(reference["params"]), "the stages together hold the whole model"


def test_checkpoint_saved_under_pp4_resumes_under_pp2_tp2(results):
    """pp=4 saves a DCP folder at step 2 (each rank one block, under the model's names);
    pp=2 x tp=2 loads it (each rank its stage's blocks, split over tp) and its next step's loss
    and parameters equal the uninterrupted single-process run's."""
    reference = one_process(FINAL_STEP, limit=STEPS_PER_EPOCH)
    saved = {k: v for result in results for k, v in result["saved"]["params"].items()}
    assert set(saved) == set(reference["params"])
    for rank, result in enumerate(results):
        assert_close(torch.tensor(result["saved"]["losses"]), torch.tensor(reference["losses"][:SAVE_STEP]),
                     rtol=1e-10, name=f"rank{rank} saved losses")
        for key, value in result["resumed"]["start_params"].items():
            assert_close(value, saved[key], rtol=1e-12, name=f"rank{rank} loaded {key}")
        assert_close(torch.tensor(result["resumed"]["losses"]), torch.tensor(reference["losses"][SAVE_STEP:]),
                     rtol=1e-10, name=f"rank{rank} resumed loss")
        for key, value in result["resumed"]["params"].items():
            assert_close(value, reference["params"][key], rtol=1e-10, name=f"rank{rank} resumed {key}")


def test_dynamic_cp_degree_is_refused_under_pp_in_one_line():
    with pytest.raises(PlanError) as info:
        ParallelPlan(pp=2, cp=2, cp_min_seq_len=1024).resolve(4)
    message = str(info.value)
    assert "\n" not in message and "cp_min_seq_len=1024" in message and "cp_min_seq_len=0" in message
