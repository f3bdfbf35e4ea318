"""Every lightning.Trainer argument can be set under `trainer.`; a misspelt one is one line that
names the closest key."""
from __future__ import annotations

import inspect

import lightning
import pytest
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from test_cli import QUICK, compose_config

from lightning_attn_parallel.cli import build_trainer
from lightning_attn_parallel.config import config_user_error
from lightning_attn_parallel.preflight import check_run
from lightning_attn_parallel.trainer_args import SET_BY_THE_PROJECT, _from_signature, trainer_parameters


def test_names_and_defaults_read_from_the_source_are_the_signatures():
    signature = inspect.signature(lightning.Trainer.__init__).parameters
    assert trainer_parameters() == _from_signature()
    assert set(trainer_parameters()) == set(signature) - {"self"}


def test_an_argument_outside_the_project_defaults_reaches_the_trainer(tmp_path):
    cfg = compose_config(["trainer.check_val_every_n_epoch=null", "trainer.limit_train_batches=3",
                          "trainer.num_sanity_val_steps=0", "trainer.accelerator=cpu"] + QUICK,
                         run_dir=str(tmp_path / "run"))
    checked = check_run(cfg)
    trainer, _ = build_trainer(cfg, checked.plan.resolve(1), tmp_path / "run")
    assert trainer.check_val_every_n_epoch is None
    assert trainer.limit_train_batches == 3 and trainer.num_sanity_val_steps == 0


@pytest.mark.parametrize("override, words", [
    ("trainer.check_val_every_n_epohc=null", ["trainer.check_val_every_n_epohc", "did you mean trainer.check_val_every_n_epoch?"]),
    ("trainer.max_stepz=3", ["did you mean trainer.max_steps?"]),
    ("strategy.plan.tpp=2", ["did you mean strategy.plan.tp?"]),
    ("trainer.strategy=ddp", ["trainer.strategy is set by train.py", "strategy=NAME"]),
])
def test_a_misspelt_key_is_one_line_with_the_closest_key(override, words):
    with pytest.raises((HydraException, OmegaConfBaseException)) as info:
        compose_config([override])
    message = str(config_user_error(info.value))
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_the_project_keys_stay_out_of_the_trainer_group():
    cfg = compose_config([])
    assert not set(SET_BY_THE_PROJECT) & set(cfg.trainer)
