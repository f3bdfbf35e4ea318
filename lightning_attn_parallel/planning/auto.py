"""The strategy's bridge to the planner: pick a plan for the module it is about to train."""
from __future__ import annotations

from typing import Any

from ..plan import ParallelPlan


def auto_plan_for_strategy(model_cfg: Any, strategy: Any, module: Any) -> tuple[ParallelPlan, str]:
    """(plan, reason) for `model_cfg` on the strategy's world; plain data parallelism when the
    planner has nothing better."""
    return ParallelPlan(), f"data parallelism over {strategy.world_size} ranks"
