"""lightning-attn-parallel: attention-aware parallelism for PyTorch Lightning."""
from .models import ModelConfig, build_model
from .plan import ParallelPlan, PlanError

__all__ = ["ModelConfig", "ParallelPlan", "PlanError", "build_model"]
