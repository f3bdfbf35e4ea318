"""The run's saved config is the model that runs, and a shrunk model says what it became.

Hydra writes `<run dir>/.hydra/config.yaml` before the checks derive the model: `+scale=smoke`
shrinks it, a prepared corpus sets its vocabulary, a pretrained folder's config.json decides its
shape. Writing the derived values back into `cfg.model` (and that file) keeps the record, the W&B
config and the checkpoint's hyperparameters in agreement with what trained.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

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


def model_line(recipe: str, model: Any, full: Optional[Any] = None) -> str:
    """One line on the model that trains; with `full`, what `+scale=smoke` made of the recipe's."""
    from .planning import parameter_counts

    def was(key: str) -> str:
        return f" (was {getattr(full, key)})" if full is not None and getattr(full, key) != getattr(model, key) else ""

    moe = (f", {model.n_routed_experts} experts top-{model.moe_top_k}{was('n_routed_experts')}"
           if model.is_moe else "")
    params = _count(parameter_counts(model).total)
    if full is not None:
        params += f" (was {_count(parameter_counts(full).total)})"
    head = f"smoke scale: {recipe} shrunk to" if full is not None else f"model: {recipe},"
    return (f"{head} {model.family} d_model {model.d_model}{was('d_model')}, {model.n_layers} layers"
            f"{was('n_layers')}, {model.n_heads} heads / {model.n_kv_heads} KV, ffn {model.ffn_dim}, vocab "
            f"{model.vocab_size}{was('vocab_size')}{moe}: {params} parameters")


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(int(n))


__all__ = ["record_model", "model_line", "starting_line"]
