"""The zero-bubble pipeline schedules equal one process on the same global batch.

`zbv` (two stages per rank in a V: rank 0 holds the first and the last stage) and
`interleaved_zb` (two stages per rank, loop placement) split each backward into its input and
weight halves; one spawn of 2 gloo processes trains each under Trainer(strategy=AttnHybridStrategy)
for 3 steps in fp64 with gradient clipping, then compares losses and parameters with one process
(relative error below 1e-10). Plans the schedules cannot run are refused in one line.
"""
from __future__ import annotations

import pytest
import torch

from dist_utils import assert_close, run_distributed
from test_pipeline import STEPS, fit, one_process

from lightning_attn_parallel.pipeline_plan import stage_ranks_of
from lightning_attn_parallel.plan import ParallelPlan, PlanError

WORLD = 2
CASES = {
    "zbv_pp2": dict(pp=2, pp_schedule="zbv", pp_microbatches=4),
    "interleaved_zb_pp2": dict(pp=2, pp_schedule="interleaved_zb", pp_microbatches=2),
}



def _worker(rank: int, world: int) -> dict:
    return {name: fit(plan, world, rank, STEPS) for name, plan in CASES.items()}


@pytest.fixture(scope="module")
def results():
    return run_distributed(_worker, WORLD, timeout=300)


@pytest.mark.parametrize("name", list(CASES))
def test_zero_bubble_schedule_equals_one_process(results, name):
    reference = one_process(1, STEPS)
    for rank, result in enumerate(results):
        got = result[name]
        assert_close(torch.tensor(got["losses"]), torch.tensor(reference["losses"]), rtol=1e-10,
                     name=f"rank {rank} losses")
        for key, value in got["params"].items():
            assert_close(value, reference["params"][key], rtol=1e-10, name=f"rank {rank} {key}")
    # the stages' parameters together are the whole model
    assert set(results[0][name]["params"]) | set(results[1][name]["params"]) == set(reference["params"])


def test_zbv_places_the_stages_in_a_v():
    assert stage_ranks_of(ParallelPlan(pp=2, pp_schedule="zbv")) == [[0, 3], [1, 2]]
    assert stage_ranks_of(ParallelPlan(pp=4, pp_schedule="zbv")) == [[0, 7], [1, 6], [2, 5], [3, 4]]
    assert stage_ranks_of(ParallelPlan(pp=2, pp_schedule="interleaved_zb")) == [[0, 2], [1, 3]]


@pytest.mark.parametrize("kwargs, words", [
    (dict(pp=2, pp_schedule="zbv", compile="block"), ["zbv", "compile='block'", "interleaved_1f1b"]),
    (dict(pp=2, pp_schedule="interleaved_zb", compile="block"), ["interleaved_zb", "compile"]),
    (dict(pp=2, pp_schedule="zbv", pp_stages_per_rank=3), ["exactly 2 stages", "pp_stages_per_rank=3"]),
    (dict(pp=2, pp_schedule="zbv", activation_checkpointing="selective"), ["zbv", "'selective'", "'block'"]),
    (dict(pp=2, pp_schedule="zbv", pp_microbatches=1), ["pp_microbatches=1", "at least 2"]),
    (dict(pp=2, pp_schedule="interleaved_zb", pp_microbatches=3), ["pp_microbatches=3", "multiple of 2"]),
])
def test_zero_bubble_plans_it_cannot_run_are_refused_in_one_line(kwargs, words):
    with pytest.raises(PlanError) as info:
        ParallelPlan(**kwargs)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message
