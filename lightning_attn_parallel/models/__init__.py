"""Model zoo: plain nn.Modules that know nothing about parallelism."""
from __future__ import annotations


from .config import ModelConfig, smoke_scale
from .hf import from_pretrained, save_pretrained
from .llama import CausalTransformer, build_llama
from .protocol import expert_modules, is_expert_module, is_expert_parameter, moe_layers


def build_model(cfg: ModelConfig) -> CausalTransformer:
    """Build the family named by `cfg.family` ("llama" or "deepseek")."""
    if cfg.family == "llama":
        return build_llama(cfg)
    if cfg.family == "deepseek":
        from .deepseek import build_deepseek

        return build_deepseek(cfg)
    raise ValueError(f"model.family={cfg.family!r} is unknown: use 'llama' or 'deepseek'")


__all__ = ["ModelConfig", "CausalTransformer", "build_model", "build_llama", "smoke_scale",
           "from_pretrained", "save_pretrained", "is_expert_module", "is_expert_parameter",
           "expert_modules", "moe_layers"]
