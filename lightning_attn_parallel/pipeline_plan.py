"""Pipeline parallelism as arithmetic: stages, micro-batches, the layout of blocks over stages and
the bubble, shared by the plan's validation, parallel/pipeline*.py and the planner.

A plan with `pp` ranks per pipeline and `v` stages per rank has `pp x v` stages; stage `s` runs on
pipeline rank `s % pp` (torch.distributed.pipelining's "loop" placement, which its interleaved
schedules use), except under "zbv", whose two stages per rank form a V: rank r holds stages r and
2 pp - 1 - r, so the first rank also holds the last stage. Checks run before any process group
starts, one line each.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from .plan import ParallelPlan


# schedules that run several stages per rank (and take the list of a rank's stages)
MULTI_STAGE_SCHEDULES = ("interleaved_1f1b", "interleaved_zb", "zbv")
# schedules that split each backward into its input and weight halves (no compile: torch's split
# backward runs the stage's autograd graph twice, which compiled graphs do not support)
ZERO_BUBBLE_SCHEDULES = ("interleaved_zb", "zbv")


def stages_per_rank(plan: "ParallelPlan") -> int:
    """Virtual stages a rank holds: 2 by default for the multi-stage schedules, else 1."""
    if plan.pp_stages_per_rank is not None:
        return plan.pp_stages_per_rank
    return 2 if plan.pp_schedule in MULTI_STAGE_SCHEDULES else 1


def num_stages(plan: "ParallelPlan") -> int:
    return plan.pp * stages_per_rank(plan)


def microbatches(plan: "ParallelPlan") -> int:
    """Micro-batches per batch: the plan's, or one per pipeline rank (the fewest 1F1B takes)."""
    return plan.pp_microbatches if plan.pp_microbatches is not None else plan.pp


def stage_ranks_of(plan: "ParallelPlan") -> list[list[int]]:
    """The stage indices each pipeline rank holds, rank by rank, in stage order."""
    if plan.pp_schedule == "zbv":
        return [sorted((r, 2 * plan.pp - 1 - r)) for r in range(plan.pp)]
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
    if plan.pp_schedule == "zbv":  # the V keeps 1F1B's peak: pp micro-batches of the rank's blocks
        return float(min(micro, plan.pp))
    v = stages_per_rank(plan)
    if v == 1:
        return float(min(micro, plan.pp))
    return min(micro * v, (v - 1) * plan.pp + 2 * (plan.pp - 1) + 1) / v


def fsdp_stages(plan: "ParallelPlan") -> str:
    """Why the stages are FSDP2 units ("" when they are not): sharded data parallelism, or
    FSDP2's per-forward cast of replicated parameters (parallel/data_parallel.py)."""
    if plan.dp_shard > 1:
        return f"dp_shard={plan.dp_shard}"
    return "mixed_precision='cast_params'" if plan.mixed_precision == "cast_params" else ""


def check_pipeline_plan(plan: "ParallelPlan") -> None:
    """The schedule against its stages and micro-batches, and the compositions that run today
    (tensor and context parallelism inside each stage; context parallelism at a fixed degree)."""
    from .plan import PlanError

    schedule = plan.pp_schedule
    if schedule in ZERO_BUBBLE_SCHEDULES and plan.activation_checkpointing == "selective":
        raise PlanError(f"ParallelPlan pp_schedule={schedule!r} does not run with activation_checkpointing="
                        "'selective': its split input/weight backward runs the stage's graph in two halves, "
                        "which op-level selective recomputation does not support; use 'block' or 'attention', "
                        "or pp_schedule='interleaved_1f1b'")
    if schedule in ZERO_BUBBLE_SCHEDULES and plan.compile != "none":
        raise PlanError(f"ParallelPlan pp_schedule={schedule!r} does not run with compile={plan.compile!r}: "
                        "its split input/weight backward runs the stage's autograd graph in two "
                        "halves, which torch.compile's graphs do not support; set compile='none' or "
                        "use pp_schedule='interleaved_1f1b'")
    v = stages_per_rank(plan)
    if schedule == "zbv" and v != 2:
        raise PlanError(f"ParallelPlan pp_schedule='zbv' runs exactly 2 stages per rank (got "
                        f"pp_stages_per_rank={v}): set pp_stages_per_rank=2 or leave it unset")
    if schedule in MULTI_STAGE_SCHEDULES and v < 2:
        raise PlanError(f"ParallelPlan pp_schedule={schedule!r} needs pp_stages_per_rank >= 2 "
                        f"(got {v}): set pp_stages_per_rank=2, or use pp_schedule='1f1b'")
    if schedule not in MULTI_STAGE_SCHEDULES and v != 1:
        raise PlanError(f"ParallelPlan pp_stages_per_rank={v} needs a schedule of several stages per rank "
                        f"({', '.join(MULTI_STAGE_SCHEDULES)}; {schedule!r} runs one): set "
                        "pp_stages_per_rank=1")
    micro = microbatches(plan)
    if schedule == "1f1b" and micro < plan.pp:
        raise PlanError(f"ParallelPlan pp_microbatches={micro} is too few for pp_schedule='1f1b' with "
                        f"pp={plan.pp}: use at least {plan.pp} (more shrink the bubble, "
                        f"(pp-1)/micro-batches)")
    if schedule in ("interleaved_1f1b", "interleaved_zb") and (micro < plan.pp or micro % plan.pp):
        raise PlanError(f"ParallelPlan pp_microbatches={micro} does not fit pp_schedule={schedule!r} "
                        f"with pp={plan.pp}: use a multiple of {plan.pp}")
    if schedule == "zbv" and micro < plan.pp:
        raise PlanError(f"ParallelPlan pp_microbatches={micro} is too few for pp_schedule='zbv' with "
                        f"pp={plan.pp}: use at least {plan.pp}; 2 x pp - 1 or more fill the V (fewer leave bubbles)")
    layout = plan.pp_layers_per_stage
    if layout is not None and (len(layout) != num_stages(plan) or any(int(n) < 1 for n in layout)):
        raise PlanError(f"ParallelPlan pp_layers_per_stage={list(layout)} must give {num_stages(plan)} "
                        f"counts of at least 1 (pp={plan.pp} x {v} stage(s) per rank): list one block "
                        "count per stage, or leave it unset to balance by cost")
    if plan.pp > 1 and plan.cp > 1 and plan.cp_min_seq_len > 0:
        raise PlanError(f"ParallelPlan pp={plan.pp} with cp_min_seq_len={plan.cp_min_seq_len}: a pipeline's "
                        "micro-batch shapes are fixed, so the context-parallel degree cannot change per "
                        f"batch; set cp_min_seq_len=0 (every batch split over cp={plan.cp})")
    # stages compose with replicated or sharded (FSDP2/HSDP) data parallelism, and replicated
    # stages with tp, cp and ep; sharded stages that also split blocks are not tested yet
    splitting = [f"{name}={degree}" for name, degree in (("tp", plan.tp), ("cp", plan.cp), ("ep", plan.ep))
                 if degree > 1]
    if plan.pp > 1 and fsdp_stages(plan) and splitting:
        raise PlanError(f"ParallelPlan pp={plan.pp} with FSDP2 stages ({fsdp_stages(plan)}) and "
                        f"{', '.join(splitting)}: pipeline stages are sharded (FSDP2/HSDP) or split by tp, cp "
                        "and ep, not both yet; use replicated stages (dp_shard=1, mixed_precision other than "
                        "'cast_params') or set " + " and ".join(f"{d.split('=')[0]}=1" for d in splitting))


def check_pipeline_model(plan: "ParallelPlan", model_cfg: Any) -> None:
    """Enough blocks for the stages, a layout that covers the model, and no tied embeddings.
    Mixture-of-experts models pass: each stage adds its blocks' balance losses to its own
    backward (parallel/pipeline_stages.AuxLossBackward)."""
    from .plan import PlanError

    if plan.pp > 1 and fsdp_stages(plan) and getattr(model_cfg, "n_routed_experts", 0):
        raise PlanError(f"ParallelPlan pp={plan.pp} with FSDP2 stages ({fsdp_stages(plan)}) and a "
                        "mixture-of-experts model: MoE pipeline stages run with replicated data parallelism "
                        "and ep so far; set dp_shard=1 and a mixed_precision other than 'cast_params' "
                        "(and ep to split the experts)")
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


__all__ = ["MULTI_STAGE_SCHEDULES", "ZERO_BUBBLE_SCHEDULES", "fsdp_stages", "stages_per_rank", "num_stages", "microbatches", "stage_ranks_of", "bubble_fraction",
           "in_flight_microbatches", "check_pipeline_plan", "check_pipeline_model", "balanced_layout",
           "stage_blocks"]
