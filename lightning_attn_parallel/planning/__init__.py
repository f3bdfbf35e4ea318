"""Planning: memory budget, step-time model, plan selection and the dry-run report.

Nothing here allocates device memory or needs a GPU: models are built on the meta device and
every estimate is arithmetic, so a dry run for a large cluster completes in seconds on a CPU.
"""
from .calibration import DEFAULT_CALIBRATION, Calibration
from .counts import ModelSummary, ParamCounts, analytic_counts, parameter_counts
from .dry_run import dry_run, dry_run_from_config, resolve_gpu
from ..hardware import A100_80GB, CPU, H100_SXM, H200, ClusterSpec, GpuSpec, detect_gpu, gpu_spec
from .memory import MemoryEstimate, estimate_memory, precision_spec
from .select import (Evaluation, FitSuggestion, NoPlanFitsError, PlanReport, candidate_plans,
                     nearest_fit, select_plan)
from .timing import (Group, TimingEstimate, all_gather_time, all_reduce_time, all_to_all_time,
                     estimate_time, reduce_scatter_time)

__all__ = [
    "Calibration", "DEFAULT_CALIBRATION", "ModelSummary", "ParamCounts", "analytic_counts",
    "parameter_counts", "dry_run", "dry_run_from_config", "resolve_gpu", "A100_80GB", "CPU", "H100_SXM", "H200",
    "ClusterSpec", "GpuSpec", "detect_gpu", "gpu_spec", "MemoryEstimate", "estimate_memory",
    "precision_spec", "Evaluation", "FitSuggestion", "NoPlanFitsError", "PlanReport",
    "candidate_plans", "nearest_fit", "select_plan", "Group", "TimingEstimate",
    "all_gather_time", "all_reduce_time", "all_to_all_time", "estimate_time",
    "reduce_scatter_time",
]
