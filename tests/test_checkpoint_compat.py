"""A checkpoint written before experts became DTensors still loads, into any plan.

tests/fixtures/pre_dtensor_ep is a checkpoint folder saved by 4 ranks under FSDP2 (dp_shard=4) x
ep=2, when each rank kept its block of experts as a plain tensor (and FSDP2 split that block over
edp=2) and checkpoints described them by their global [E, ...] shapes. Beside it,
pre_dtensor_ep.expected.pt holds the full model and optimizer states gathered at that save. Both
layouts name every tensor by its parameter name and global shape, so DCP reads the old folder
into today's DTensor layout under any plan; these tests prove it, in float64 and bit for bit.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dist_utils import run_distributed
from lightning_utils import FixedTokens, loader, params_of, quiet_trainer
from test_expert_checkpoint import make_module
from test_expert_parallel_training import PRECISION

import lightning_attn_parallel as lap
from lightning_attn_parallel.checkpoint import load_distributed
from lightning_attn_parallel.parallel.state_dict import model_state, optimizer_state

FIXTURE = Path(__file__).parent / "fixtures" / "pre_dtensor_ep"
SAVED_STEP = 2


def expected() -> dict:
    return torch.load(str(FIXTURE) + ".expected.pt", weights_only=False)


def _assert_states_equal(got: dict, want: dict, what: str) -> None:
    assert set(got) == set(want), what
    for name, value in want.items():
        if isinstance(value, dict):
            _assert_states_equal(got[name], value, f"{what} {name}")
        elif isinstance(value, torch.Tensor):
            assert torch.equal(got[name].to(value.dtype), value), f"{what} {name}"


def test_pre_dtensor_folder_loads_into_one_process():
    module = make_module(seed=1).double()
    module.trainer = quiet_trainer(devices=1, precision=PRECISION)  # configure_optimizers reads it
    optimizer = module.configure_optimizers()["optimizer"]
    extra = load_distributed(FIXTURE, module, optimizer)
    assert extra["global_step"] == SAVED_STEP
    want = expected()
    _assert_states_equal(model_state(module, full=True), want["model"], "model state")
    _assert_states_equal(optimizer_state(module, optimizer, full=True)["state"], want["optimizer"]["state"],
                         "optimizer state")


PLANS = {"ep2": dict(ep=2), "fsdp2_ep2": dict(dp_shard=2, ep=2)}


def _resume(rank: int, world: int) -> dict:
    out = {}
    for name, plan in PLANS.items():
        module = make_module(seed=1)
        trainer = quiet_trainer(strategy=lap.AttnHybridStrategy(plan=lap.ParallelPlan(**plan)), devices=world,
                                max_steps=SAVED_STEP, precision=PRECISION)
        trainer.fit(module, loader(FixedTokens(n=16), 8 // world, replicas=world, rank=rank), ckpt_path=FIXTURE)
        model = trainer.strategy.model
        state = optimizer_state(model, trainer.optimizers[0], full=True)  # rank 0 holds them
        out[name] = dict(step=trainer.global_step, params=params_of(module), model=model_state(model, full=True),
                         optimizer=state.get("state"))
    return out


@pytest.mark.parametrize("plan", list(PLANS))
def test_pre_dtensor_folder_resumes_under_today_plans(plan):
    """On 2 ranks, under ep=2 (experts as DTensors, replicated attention) and FSDP2 x ep=2: the
    run resumes at the saved step with exactly the saved parameters and optimizer states."""
    results = _resumed()
    want = expected()
    for rank, result in enumerate(results):
        r = result[plan]
        assert r["step"] == SAVED_STEP, (plan, rank)
        _assert_states_equal(r["params"], {k: v for k, v in want["model"].items() if k in r["params"]},
                             f"{plan} rank {rank} parameter")
    _assert_states_equal(results[0][plan]["model"], want["model"], f"{plan} model state")
    _assert_states_equal(results[0][plan]["optimizer"], want["optimizer"]["state"], f"{plan} optimizer state")


_RESUMED: list = []


def _resumed() -> list:
    if not _RESUMED:
        _RESUMED.extend(run_distributed(_resume, 2, timeout=600))
    return _RESUMED
