"""lightning-attn-parallel: attention-aware parallelism for PyTorch Lightning.

Importing the package registers the strategy name, so `Trainer(strategy="attn_hybrid")` and
`Fabric(strategy="attn_hybrid")` work (Lightning has no entry point for strategy names: the import
must come before the Trainer or Fabric).
"""
from . import fabric
from .models import ModelConfig, build_model
from .module import CausalLMModule
from .plan import ParallelPlan, PlanError
from .strategy import AttnHybridStrategy, register

register()
fabric.register()

__all__ = ["AttnHybridStrategy", "CausalLMModule", "ModelConfig", "ParallelPlan", "PlanError",
           "build_model", "fabric", "register"]
