"""Pipeline parallelism as arithmetic: stages, micro-batches, the layout of blocks over stages and
the bubble, shared by the plan's validation, parallel/pipeline*.py and the planner.

A plan with `pp` ranks per pipeline and `v` stages per rank has `pp x v` stages; stage `s` runs on
pipeline rank `s % pp` (torch.distributed.pipelining's "loop" placement, which its interleaved
schedules use). Checks run before any process group starts, one line each.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from .plan import ParallelPlan


def stages_per_rank(plan: "ParallelPlan") -> int:
    """Virtual stages a rank holds: 2 by default for interleaved 1F1B, else 1."""
    if plan.pp_stages_per_rank is not None:
        return plan.pp_stages_per_rank
    return 2 if plan.pp_schedule == "interleaved_1f1b" else 1


def num_stages(plan: "ParallelPlan") -> int:
    return plan.pp * stages_per_rank(plan)


def microbatches(plan: "ParallelPlan") -> int:
    """Micro-batches per batch: the plan's, or one per pipeline rank (the fewest 1F1B takes)."""
    return plan.pp_microbatches if plan.pp_microbatches is not None else plan.pp


def stage_ranks_of(plan: "ParallelPlan") -> list[list[int]]:
    """The stage indices each pipeline rank holds, rank by rank."""
    return [list(range(r, num_stages(plan), plan.pp)) for r in range(plan.pp)]


def bubble_fraction(pp: int, micro: int, virtual: int = 1) -> float:
    """Idle share of a step spent filling and draining the pipeline, relative to the compute:
    (pp - 1) / micro-batches for GPipe and 1F1B, divided by the virtual stages per rank for
    interleaved 1F1B (Narayanan et al. 2021)."""
    return (pp - 1) / (micro * virtual) if pp > 1 else 0.0


def in_flight_microbatches(plan: "ParallelPlan") -> float:
    """Micro-batches' worth of a rank's activations that the first pipeline rank holds at once:
    every micro-batch under GPipe, at most `pp` under 1F1B; interleaved 1F1B warms up with
    (v - 1) x pp + 2 (pp - 1) + 1 stage chunks of 1/v of the rank's blocks each."""
    micro = microbatches(plan)
    if plan.pp_schedule == "gpipe":
        return float(micro)
    v = stages_per_rank(plan)
    if v == 1:
        return float(min(micro, plan.pp))
    return min(micro * v, (v - 1) * plan.pp + 2 * (plan.pp - 1) + 1) / v


def check_pipeline_plan(plan: "ParallelPlan") -> None:
    """The schedule against its stages and micro-batches, and the compositions that run today."""
    from .plan import PlanError

    if plan.pp_schedule == "zbv":
        raise PlanError("ParallelPlan pp_schedule='zbv' (zero bubble) is not supported: its split "
                        "weight/input backward needs stage modules without compile or attention masks; "
                        "use pp_schedule='interleaved_1f1b'")
    v = stages_per_rank(plan)
    if plan.pp_schedule == "interleaved_1f1b" and v < 2:
        raise PlanError(f"ParallelPlan pp_schedule='interleaved_1f1b' needs pp_stages_per_rank >= 2 "
                        f"(got {v}): set pp_stages_per_rank=2, or use pp_schedule='1f1b'")
    if plan.pp_schedule != "interleaved_1f1b" and v != 1:
        raise PlanError(f"ParallelPlan pp_stages_per_rank={v} needs pp_schedule='interleaved_1f1b' "
                        f"({plan.pp_schedule!r} runs one stage per rank): set pp_stages_per_rank=1")
    micro = microbatches(plan)
    if plan.pp_schedule == "1f1b" and micro < plan.pp:
        raise PlanError(f"ParallelPlan pp_microbatches={micro} is too few for pp_schedule='1f1b' with "
                        f"pp={plan.pp}: use at least {plan.pp} (more shrink the bubble, "
                        f"(pp-1)/micro-batches)")
    if plan.pp_schedule == "interleaved_1f1b" and (micro < plan.pp or micro % plan.pp):
        raise PlanError(f"ParallelPlan pp_microbatches={micro} does not fit pp_schedule='interleaved_1f1b' "
                        f"with pp={plan.pp}: use a multiple of {plan.pp}")
    layout = plan.pp_layers_per_stage
    if layout is not None and (len(layout) != num_stages(plan) or any(int(n) < 1 for n in layout)):
        raise PlanError(f"ParallelPlan pp_layers_per_stage={list(layout)} must give {num_stages(plan)} "
                        f"counts of at least 1 (pp={plan.pp} x {v} stage(s) per rank): list one block "
                        "count per stage, or leave it unset to balance by cost")
    # stages compose with replicated and sharded (FSDP2/HSDP) data parallelism, activation
    # checkpointing, compile, fp8 and activation offload; the degrees that split a block do not
    unsupported = {"cp": plan.cp > 1, "tp": plan.tp > 1, "ep": plan.ep > 1}
    refused = [name for name, on in unsupported.items() if on]
    if plan.pp > 1 and refused:
        raise PlanError(f"ParallelPlan pp={plan.pp} does not compose with {', '.join(refused)} yet: "
                        "pipeline stages run with data parallelism (replicated or sharded) only; "
                        "set pp=1 or drop " + ", ".join(refused))


def check_pipeline_model(plan: "ParallelPlan", model_cfg: Any) -> None:
    """Enough blocks for the stages, a layout that covers the model, and no tied embeddings."""
    from .plan import PlanError

    stages, layers = num_stages(plan), model_cfg.n_layers
    if stages > layers:
        raise PlanError(f"ParallelPlan pp={plan.pp} x {stages_per_rank(plan)} stage(s) per rank = {stages} "
                        f"stages but the model has n_layers={layers}: every stage needs a block; "
                        f"choose pp x stages per rank <= {layers}")
    layout = plan.pp_layers_per_stage
    if layout is not None and sum(layout) != layers:
        raise PlanError(f"ParallelPlan pp_layers_per_stage={list(layout)} sums to {sum(layout)} but the "
                        f"model has n_layers={layers}: the counts must add up to {layers}")
    if getattr(model_cfg, "tie_embeddings", False):
        raise PlanError(f"ParallelPlan pp={plan.pp} with tie_embeddings=true: the tied embedding and head "
                        "sit on the first and last stages; build the model with tie_embeddings=false")
    if getattr(model_cfg, "n_routed_experts", 0):
        raise PlanError(f"ParallelPlan pp={plan.pp} does not support mixture-of-experts models yet (their "
                        "balance losses cross stages): set pp=1")


def balanced_layout(block_costs: Sequence[float], stages: int, first_cost: float = 0.0,
                    last_cost: float = 0.0) -> list[int]:
    """Blocks per stage, contiguous and at least one each, minimising the costliest stage; the
    embedding (`first_cost`) sits on the first stage and the head and loss (`last_cost`) on the
    last. Exact by dynamic programming over split points (stages x blocks^2, a few thousand steps)."""
    n = len(block_costs)
    prefix = [0.0]
    for c in block_costs:
        prefix.append(prefix[-1] + c)

    def cost(s: int, i: int, j: int) -> float:  # stage s holds blocks i..j-1
        return prefix[j] - prefix[i] + (first_cost if s == 0 else 0.0) + (last_cost if s == stages - 1 else 0.0)

    inf = float("inf")
    # best[s][j]: the smallest max cost of placing blocks 0..j-1 on stages 0..s
    best = [[inf] * (n + 1) for _ in range(stages)]
    cut = [[0] * (n + 1) for _ in range(stages)]
    for j in range(1, n + 1):
        best[0][j] = cost(0, 0, j)
    for s in range(1, stages):
        for j in range(s + 1, n + 1):
            for i in range(s, j):
                value = max(best[s - 1][i], cost(s, i, j))
                if value < best[s][j] - 1e-12:
                    best[s][j], cut[s][j] = value, i
    counts, j = [], n
    for s in range(stages - 1, 0, -1):
        i = cut[s][j]
        counts.append(j - i)
        j = i
    counts.append(j)
    return counts[::-1]


def stage_blocks(counts: Sequence[int]) -> list[range]:
    """The block indices of each stage from the per-stage counts."""
    out, start = [], 0
    for c in counts:
        out.append(range(start, start + int(c)))
        start += int(c)
    return out


__all__ = ["stages_per_rank", "num_stages", "microbatches", "stage_ranks_of", "bubble_fraction",
           "in_flight_microbatches", "check_pipeline_plan", "check_pipeline_model", "balanced_layout",
           "stage_blocks"]
