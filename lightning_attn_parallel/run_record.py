"""The run's saved config is the model that runs, and a shrunk model says what it became.

Hydra writes `<run dir>/.hydra/config.yaml` before the checks derive the model: `+scale=smoke`
shrinks it, a prepared corpus sets its vocabulary, a pretrained folder's config.json decides its
shape. Writing the derived values back into `cfg.model` (and that file) keeps the record, the W&B
config and the checkpoint's hyperparameters in agreement with what trained.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict


def starting_line(cfg: DictConfig) -> str:
    """The first line of a run, printed before torch and Lightning load (seconds)."""
    what = "dry run" if cfg.dry_run else "training"
    scale = " at smoke scale" if cfg.smoke else ""
    data = cfg.data.source + (f" {cfg.data.path}" if cfg.data.get("path") and not OmegaConf.is_missing(cfg.data, "path")
                              else "")
    steps = "" if cfg.dry_run else f", {cfg.trainer.max_steps} steps"
    return (f"{what}: recipe {cfg.recipe_name}{scale}, data {data}{steps}, {cfg.trainer.num_nodes} node(s) x "
            f"{cfg.trainer.devices} device(s); loading torch and Lightning...")


def record_model(cfg: DictConfig, model_cfg: Any) -> None:
    """Put the derived model config into `cfg.model` and re-save Hydra's record of the run."""
    with open_dict(cfg.model):
        for key, value in dataclasses.asdict(model_cfg).items():
            cfg.model[key] = value
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    hydra = HydraConfig.get()
    if hydra.output_subdir is None:
        return
    saved = Path(hydra.runtime.output_dir) / str(hydra.output_subdir) / "config.yaml"
    if saved.is_file():
        OmegaConf.save(cfg, saved)


def shrunk_model_line(recipe: str, full: Any, shrunk: Any) -> str:
    """One line on what `+scale=smoke` made of a recipe's model."""
    from .planning import parameter_counts

    moe = (f", {shrunk.n_routed_experts} experts top-{shrunk.moe_top_k} (was {full.n_routed_experts})"
           if shrunk.is_moe else "")
    return (f"smoke scale: {recipe} shrunk to d_model {shrunk.d_model} (was {full.d_model}), {shrunk.n_layers} "
            f"layers (was {full.n_layers}), {shrunk.n_heads} heads / {shrunk.n_kv_heads} KV, ffn {shrunk.ffn_dim}, "
            f"vocab {shrunk.vocab_size} (was {full.vocab_size}){moe}: "
            f"{_count(parameter_counts(shrunk).total)} parameters (was {_count(parameter_counts(full).total)})")


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(int(n))


__all__ = ["record_model", "shrunk_model_line", "starting_line"]
