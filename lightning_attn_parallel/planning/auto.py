"""Resolving a requested plan for the coming run: the requested one, or for "auto" the planner's
choice, with accumulation="auto" pinned to one policy. Pure arithmetic over a `RunContext`, which
each front-end (the Trainer's strategy, Fabric's) fills from what it knows about the run."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional

from ..hardware import cluster_for_plan, detect_gpu
from ..plan import ParallelPlan
from .select import make_workload, resolve_accumulation, select_plan


@dataclass(frozen=True)
class RunContext:
    """What the planner needs to know about the run: the world, the device and the precision,
    and the workload of one optimizer step (micro-batch, sequence length, accumulation)."""

    world_size: int
    device_type: str
    num_nodes: int = 1
    ranks_per_node: int = 1
    precision: str = "32-true"
    micro_batch: int = 1
    seq_len: Optional[int] = None  # None: the model's max_seq_len
    accumulate: int = 1

    def cluster(self, plan: ParallelPlan):
        return cluster_for_plan(plan, self.num_nodes, self.ranks_per_node)

    def workload(self, model_cfg: Any, plan: ParallelPlan):
        return make_workload(model_cfg, self.cluster(plan), detect_gpu(), self.micro_batch,
                             self.seq_len or model_cfg.max_seq_len, self.precision,
                             grad_accum=self.accumulate)


def resolve_plan(requested: ParallelPlan, run: RunContext,
                 model_cfg: Optional[Any]) -> tuple[ParallelPlan, list[str]]:
    """(the plan to train with, resolved against the world, with its accumulation policy; the
    notes that say why, for the front-end to print on rank 0)."""
    notes = []
    plan = requested
    if requested.is_auto and model_cfg is None:
        notes.append(f"attn_hybrid: no model config to plan from; using data parallelism over "
                     f"{run.world_size} ranks")
        plan = ParallelPlan()
    elif requested.is_auto:
        plan, reason = auto_plan(model_cfg, run, requested)
        notes.append(f"attn_hybrid: auto plan {plan.describe()}: {reason}")
    plan = plan.resolve(run.world_size)
    policy, reason = accumulation_policy(model_cfg, run, plan)
    if plan.sharded and plan.accumulation == "auto":
        notes.append(f"attn_hybrid: gradient accumulation {policy}: {reason}")
    return replace(plan, accumulation=policy), notes


def auto_plan(model_cfg: Any, run: RunContext, requested: ParallelPlan) -> tuple[ParallelPlan, str]:
    """(plan, reason) for `model_cfg` on the run's world, keeping the options of `requested`
    (bucket size, kernels, compile, link speeds...).

    On a CPU there is no card to plan against, so data parallelism is used; on GPUs the planner
    picks the fastest plan that fits and explains why.
    """
    if run.device_type != "cuda":
        return ParallelPlan(), f"data parallelism over {run.world_size} CPU processes"
    plan, report = select_plan(model_cfg, run.cluster(requested), detect_gpu(), run.micro_batch,
                               run.seq_len or model_cfg.max_seq_len, run.precision,
                               grad_accum=run.accumulate, template=replace(requested, mode="manual"))
    return plan, report.reason


def accumulation_policy(model_cfg: Any, run: RunContext, plan: ParallelPlan) -> tuple[str, str]:
    """(accumulation policy, reason) for a resolved `plan` whose policy may still be "auto".

    On GPUs the planner compares the policies by memory and time; without a card or a model
    config to plan from, "auto" keeps every reduction for the step's last micro-batch.
    """
    if plan.accumulation != "auto":
        return plan.accumulation, "requested"
    if not plan.sharded:
        return "defer_all", "parameters are replicated"
    if model_cfg is None or run.device_type != "cuda":
        return "defer_all", "no card and model to plan against"
    if run.accumulate == 1:
        return "defer_all", "no accumulation"
    chosen = resolve_accumulation(run.workload(model_cfg, plan), plan)
    fits = "fastest that fits" if chosen.fits else "least memory; nothing fits"
    return chosen.plan.accumulation, f"{fits} ({chosen.memory.describe()})"


__all__ = ["RunContext", "resolve_plan", "auto_plan", "accumulation_policy"]
