"""Model zoo: plain nn.Modules that know nothing about parallelism.

The config (config.py) loads without torch; the modules load on first use, so that a command-line
run can check its config before torch is imported.
"""
from __future__ import annotations

import importlib
from typing import Any

from .config import ModelConfig, smoke_scale

_EXPORTS = {"from_pretrained": ".hf", "save_pretrained": ".hf", "CausalTransformer": ".llama",
            "build_llama": ".llama", "expert_modules": ".protocol", "is_expert_module": ".protocol",
            "is_expert_parameter": ".protocol", "moe_layers": ".protocol"}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_model(cfg: ModelConfig) -> "CausalTransformer":
    """Build the family named by `cfg.family` ("llama" or "deepseek")."""
    if cfg.family == "llama":
        from .llama import build_llama

        return build_llama(cfg)
    if cfg.family == "deepseek":
        from .deepseek import build_deepseek

        return build_deepseek(cfg)
    raise ValueError(f"model.family={cfg.family!r} is unknown: use 'llama' or 'deepseek'")


__all__ = ["ModelConfig", "CausalTransformer", "build_model", "build_llama", "smoke_scale",
           "from_pretrained", "save_pretrained", "is_expert_module", "is_expert_parameter",
           "expert_modules", "moe_layers"]
