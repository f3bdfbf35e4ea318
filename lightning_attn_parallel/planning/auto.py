"""The strategy's bridge to the planner: pick a plan for the module it is about to train."""
from __future__ import annotations

from dataclasses import replace
from typing import Any

from lightning.pytorch.utilities.rank_zero import rank_zero_info

from ..hardware import cluster_for_plan, detect_gpu
from ..plan import ParallelPlan
from .select import make_workload, resolve_accumulation, select_plan


def _workload(module: Any, model_cfg: Any) -> tuple[int, int, int]:
    """(micro-batch, sequence length, accumulation) of the coming run, from its data module."""
    trainer = getattr(module, "_trainer", None)
    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    micro_batch = getattr(datamodule, "micro_batch_size", 1)
    seq_len = getattr(datamodule, "seq_len", model_cfg.max_seq_len)
    accumulate = getattr(trainer, "accumulate_grad_batches", 1) if trainer is not None else 1
    return micro_batch, seq_len, accumulate


def resolve_plan(requested: ParallelPlan, strategy: Any, module: Any) -> ParallelPlan:
    """The plan the strategy trains with: the requested one, or for "auto" the planner's when the
    module describes its model (data parallelism otherwise), resolved against the world, with
    accumulation="auto" pinned to one policy. Each choice is logged on rank 0."""
    model_cfg = getattr(module, "model_config", None)
    plan = requested
    if requested.is_auto and model_cfg is None:
        rank_zero_info("attn_hybrid: no model config to plan from; using data parallelism over "
                       f"{strategy.world_size} ranks")
        plan = ParallelPlan()
    elif requested.is_auto:
        plan, reason = auto_plan_for_strategy(model_cfg, strategy, module, requested)
        rank_zero_info(f"attn_hybrid: auto plan {plan.describe()}: {reason}")
    plan = plan.resolve(strategy.world_size)
    policy, reason = accumulation_for_strategy(model_cfg, strategy, module, plan)
    if plan.sharded and plan.accumulation == "auto":
        rank_zero_info(f"attn_hybrid: gradient accumulation {policy}: {reason}")
    return replace(plan, accumulation=policy)


def _cluster(strategy: Any, plan: ParallelPlan):
    return cluster_for_plan(plan, strategy.num_nodes, strategy.num_processes)


def auto_plan_for_strategy(model_cfg: Any, strategy: Any, module: Any,
                           requested: ParallelPlan) -> tuple[ParallelPlan, str]:
    """(plan, reason) for `model_cfg` on the strategy's world, keeping the options of `requested`
    (bucket size, kernels, compile, link speeds...).

    On a CPU there is no card to plan against, so data parallelism is used; on GPUs the planner
    picks the fastest plan that fits and explains why.
    """
    if strategy.root_device.type != "cuda":
        return ParallelPlan(), f"data parallelism over {strategy.world_size} CPU processes"
    micro_batch, seq_len, accumulate = _workload(module, model_cfg)
    plan, report = select_plan(model_cfg, _cluster(strategy, requested), detect_gpu(), micro_batch,
                               seq_len, str(strategy.precision_plugin.precision), grad_accum=accumulate,
                               template=replace(requested, mode="manual"))
    return plan, report.reason


def accumulation_for_strategy(model_cfg: Any, strategy: Any, module: Any,
                              plan: ParallelPlan) -> tuple[str, str]:
    """(accumulation policy, reason) for a resolved `plan` whose policy may still be "auto".

    On GPUs the planner compares the policies by memory and time; without a card or a model
    config to plan from, "auto" keeps every reduction for the step's last micro-batch.
    """
    if plan.accumulation != "auto":
        return plan.accumulation, "requested"
    if not plan.sharded:
        return "defer_all", "parameters are replicated"
    if model_cfg is None or strategy.root_device.type != "cuda":
        return "defer_all", "no card and model to plan against"
    micro_batch, seq_len, accumulate = _workload(module, model_cfg)
    if accumulate == 1:
        return "defer_all", "no accumulation"
    work = make_workload(model_cfg, _cluster(strategy, plan), detect_gpu(), micro_batch, seq_len,
                         str(strategy.precision_plugin.precision), grad_accum=accumulate)
    chosen = resolve_accumulation(work, plan)
    fits = "fastest that fits" if chosen.fits else "least memory; nothing fits"
    return chosen.plan.accumulation, f"{fits} ({chosen.memory.describe()})"
