"""Train a causal LM with the attn_hybrid strategy, configured by Hydra.

    python train.py                                   # embedded default: tiny model, CPU ok
    python train.py +recipe=deepseek_67b +scale=smoke # any recipe, shrunk to run on a laptop
    python train.py +recipe=deepseek_67b dry_run=true trainer.num_nodes=16 trainer.devices=8

An installed package runs the same as `python -m lightning_attn_parallel.train` or `lap-train`:
the configs (conf/) and recipes (recipes/) ship inside the package.

Every failure ends as one line on stderr: `error: ...` with exit code 2 for bad input (before
any process group starts), exit code 1 with the path of a traceback log for anything else.
"""
from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

from lightning_attn_parallel.config import CONF_DIR, config_user_error, register_configs
from lightning_attn_parallel.errors import run_or_exit
from lightning_attn_parallel.preflight import check_config
from lightning_attn_parallel.run_record import starting_line


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    def checked_then_run() -> None:
        # The config first and a line to say what runs: both before torch and Lightning load.
        checked = check_config(cfg)
        if os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0":
            print(starting_line(cfg), flush=True)
        from lightning_attn_parallel.cli import run

        run(cfg, checked)

    run_or_exit(checked_then_run, log_dir=lambda: cfg.run_dir, translate=config_user_error)


def _run_dir_is_hydra_dir(argv: list[str]) -> list[str]:
    """`run_dir=X` also names Hydra's own output folder (its .hydra/ config record), unless
    hydra.run.dir is given: otherwise that record would land in a second folder under runs/."""
    given = [a.split("=", 1)[1] for a in argv if a.startswith("run_dir=")]
    if given and not any(a.startswith(("hydra.run.dir=", "++hydra.run.dir=")) for a in argv):
        return argv + [f"hydra.run.dir={given[-1]}"]
    return argv


def main() -> None:
    sys.argv = sys.argv[:1] + _run_dir_is_hydra_dir(sys.argv[1:])
    register_configs()
    # Hydra must re-raise composition errors so that run_or_exit reports them as one line.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    run_or_exit(_hydra_main, translate=config_user_error)


if __name__ == "__main__":
    main()
