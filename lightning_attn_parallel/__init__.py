"""lightning-attn-parallel: attention-aware parallelism for PyTorch Lightning.

Importing the package registers the strategy name, so `Trainer(strategy="attn_hybrid")` and
`Fabric(strategy="attn_hybrid")` work (Lightning has no entry point for strategy names: the import
must come before the Trainer or Fabric).
The names below load on first use, so that a command-line run can check its config before
torch and Lightning are imported (registration.py).
"""
import importlib
from typing import Any

from .registration import register_when_lightning_loads

_EXPORTS = {"ModelConfig": ".models", "build_model": ".models", "CausalLMModule": ".module",
            "ParallelPlan": ".plan", "PlanError": ".plan", "AttnHybridStrategy": ".strategy",
            "register": ".strategy"}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    try:
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


register_when_lightning_loads()

__all__ = ["AttnHybridStrategy", "CausalLMModule", "ModelConfig", "ParallelPlan", "PlanError",
           "build_model", "fabric", "register"]
