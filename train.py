"""Train a causal LM with the attn_hybrid strategy, configured by Hydra.

    python train.py                                   # embedded default: tiny model, CPU ok
    python train.py +recipe=deepseek_67b +scale=smoke # any recipe, shrunk to run on a laptop
    python train.py +recipe=deepseek_67b dry_run=true trainer.num_nodes=16 trainer.devices=8
"""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from lightning_attn_parallel.config import register_configs

register_configs()


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from lightning_attn_parallel.cli import ConfigError, run

    try:
        run(cfg)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
