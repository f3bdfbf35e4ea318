"""train.py's config surface: every recipe runs at +scale=smoke, and bad input fails early with
one clear message naming the value and the fix."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from dist_utils import run_distributed

from lightning_attn_parallel.cli import run
from lightning_attn_parallel.errors import UserError
from lightning_attn_parallel.config import CONF_DIR, available_recipes, register_configs

ROOT = Path(__file__).resolve().parent.parent
QUICK = ["logger=none", "callbacks=none", "trainer.enable_checkpointing=false",
         "trainer.enable_progress_bar=false"]


def compose_config(overrides: list[str], run_dir: str = "/tmp/lap-test-run"):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose("config", overrides=overrides + [f"run_dir={run_dir}"])


def _run_recipes(rank: int, world: int, run_dir: str) -> dict:
    import torch

    torch.set_num_threads(1)
    losses = {}
    for name in available_recipes():
        cfg = compose_config([f"+recipe={name}", "+scale=smoke", "trainer.max_steps=2",
                              "trainer.limit_val_batches=1", "trainer.val_check_interval=2"] + QUICK,
                             run_dir=f"{run_dir}/{name}")
        trainer = run(cfg)
        losses[name] = float(trainer.callback_metrics["train/loss"])
    return losses


def test_every_recipe_runs_a_few_steps_at_smoke_scale(tmp_path):
    losses = run_distributed(_run_recipes, 1, str(tmp_path), timeout=600)[0]
    assert set(losses) >= {"tiny", "llama3_8b", "deepseek_67b", "deepseek_v2_lite", "deepseek_v2_236b",
                           "deepseek_moe_16b", "tiny_moe"}
    for name, loss in losses.items():
        assert 0 < loss < 10, f"{name}: loss {loss}"


def test_unknown_recipe_lists_the_available_ones():
    with pytest.raises(HydraException) as info:
        compose_config(["+recipe=no_such_recipe"])
    message = str(info.value)
    assert "no_such_recipe" in message and "tiny" in message and "deepseek_67b" in message


@pytest.mark.parametrize("override, key", [("trainer.max_stepz=3", "max_stepz"),
                                           ("trainer.max_steps=many", "max_steps"),
                                           ("strategy.plan.tpp=2", "tpp")])
def test_bad_config_keys_and_types_fail_at_composition(override, key):
    with pytest.raises((HydraException, OmegaConfBaseException)) as info:
        compose_config([override])
    assert key in str(info.value)


@pytest.mark.parametrize("overrides, words", [
    (["trainer.accelerator=cpu", "trainer.devices=3", "strategy.plan.tp=2"], ["tp=2", "world size 3"]),
    (["trainer.accelerator=cpu", "trainer.devices=2", "strategy.plan.tp=2", "model.n_heads=3",
      "model.n_kv_heads=3", "model.d_model=96"], ["tp=2", "n_heads=3"]),
    (["data=tokens", "data.seq_len=256", "data.train_path=/nonexistent/tokens.bin"], ["/nonexistent/tokens.bin", "does not exist"]),
    (["data.seq_len=4096"], ["data.seq_len=4096", "max_seq_len=1024"]),
    (["model.n_kv_heads=4"], ["n_kv_heads=4", "n_heads=6"]),
    (["strategy.plan.cp_kernel=zigzag"], ["cp_kernel='zigzag'", "allgather"]),
    (["+recipe=tiny_moe", "trainer.accelerator=cpu", "trainer.devices=3", "strategy.plan.ep=3"],
     ["ep=3", "n_routed_experts=8", "[1, 2, 4, 8]"]),
    (["trainer.accelerator=gpu"], ["needs GPUs", "+scale=smoke"]),
    (["ckpt_path=/nonexistent.ckpt"], ["/nonexistent.ckpt", "does not exist"]),
])
def test_bad_values_raise_one_clear_error_before_training(overrides, words, tmp_path):
    cfg = compose_config(overrides + QUICK, run_dir=str(tmp_path / "run"))
    with pytest.raises(UserError) as info:
        run(cfg)
    for word in words:
        assert word in str(info.value), str(info.value)
    assert not (tmp_path / "run").exists(), "nothing may be written before the checks pass"


def test_command_line_errors_are_one_line_with_exit_code_2(tmp_path):
    result = subprocess.run([sys.executable, "train.py", "trainer.devices=3", "trainer.accelerator=cpu",
                             "strategy.plan.tp=2", f"run_dir={tmp_path}"] + QUICK,
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().startswith("error: ParallelPlan")
    assert "Traceback" not in result.stderr


def test_dry_run_of_the_big_recipe_plans_without_training(tmp_path):
    cfg = compose_config(["+recipe=deepseek_67b", "dry_run=true", "trainer.num_nodes=16",
                          "trainer.devices=8"], run_dir=str(tmp_path / "run"))
    run(cfg)
    assert not (tmp_path / "run").exists()


def test_default_logger_is_offline_wandb_with_the_run_config(tmp_path):
    """`python train.py` logs to W&B offline by default, with the whole run as W&B's config."""
    from lightning.pytorch.loggers import WandbLogger

    from lightning_attn_parallel.cli import build_logger

    cfg = compose_config([], run_dir=str(tmp_path / "run"))
    logger = build_logger(cfg)
    assert isinstance(logger, WandbLogger)
    assert logger._wandb_init["config"]["model"]["d_model"] == cfg.model.d_model
    assert logger._offline
