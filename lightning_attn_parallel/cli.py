"""What train.py does with a composed config: check everything (preflight.py), then plan or train.

All checks run before the Trainer (and so before any process group or real allocation): a bad
value fails with one message naming it and the fix.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from .config import ConfigError, StrategyConfig, TrainerConfig
from .plan import ParallelPlan
from .preflight import check_run, checkpoint_dir, target_class, target_kwargs


def build_datamodule(cfg: DictConfig):
    from .data.datamodule import LMDataModule
    from .data.documents import DOCUMENT_KEYS, DocumentDataModule

    values = OmegaConf.to_container(cfg.data, resolve=True)
    try:
        if values["source"] == "documents":
            return DocumentDataModule(**{k: values[k] for k in DOCUMENT_KEYS if k in values})
        return LMDataModule(**{k: v for k, v in values.items() if k not in ("path", "pack")})
    except (ValueError, FileNotFoundError) as error:  # UserErrors pass through unchanged
        raise ConfigError(str(error)) from None


def build_logger(cfg: DictConfig):
    """The logger of conf/logger (a `_target_` node; an empty node means none)."""
    from hydra.utils import instantiate

    if not cfg.logger or "_target_" not in cfg.logger:
        return False
    from lightning.pytorch.loggers import WandbLogger

    if issubclass(target_class(cfg.logger), WandbLogger):
        os.environ.setdefault("WANDB_SILENT", "true")
        # The whole run, for W&B's config table. Through a partial: `instantiate` itself takes
        # an argument named `config`, so it cannot be passed as a keyword there.
        from .lightning_workarounds import without_wandb_anonymous

        return without_wandb_anonymous(
            instantiate(cfg.logger, _partial_=True)(config=OmegaConf.to_container(cfg, resolve=True)))
    return instantiate(cfg.logger)


def build_callbacks(cfg: DictConfig, run_dir: Path) -> list:
    """Checkpointing and the non-finite step guard, plus the callbacks of conf/callbacks (a
    `_target_` returning a callback or a list of them; an empty node means none)."""
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import ModelCheckpoint

    from .callbacks.nonfinite import NonFiniteGuard
    from .callbacks.preemption import Preemption

    callbacks: list = [NonFiniteGuard(cfg.skip_nonfinite)]
    if cfg.preemption_signals:
        callbacks.append(Preemption(list(cfg.preemption_signals), dirpath=str(checkpoint_dir(run_dir))))
    if cfg.trainer.enable_progress_bar:  # refreshed at the log interval, with no per-step GPU stall
        from .callbacks.progress import StepLossProgressBar

        callbacks.append(StepLossProgressBar(refresh_rate=cfg.trainer.log_every_n_steps))
    if cfg.trainer.enable_checkpointing:
        # No version counter: a resumed run overwrites its checkpoints instead of piling up
        # `-v1`, `-v2`... duplicates beside them.
        every = max(1, cfg.trainer.max_steps // 2) if cfg.trainer.max_steps > 0 else None
        callbacks.append(ModelCheckpoint(dirpath=str(checkpoint_dir(run_dir)), save_last=True,
                                         every_n_train_steps=every, enable_version_counter=False))
    if cfg.callbacks and "_target_" in cfg.callbacks:
        made = instantiate(cfg.callbacks)
        callbacks += list(made) if isinstance(made, (list, tuple)) else [made]
    return callbacks


def build_strategy(cfg: DictConfig, plan: ParallelPlan):
    """The strategy of conf/strategy, with the plan the pre-flight checked."""
    from hydra.utils import instantiate

    keys = target_kwargs(cfg.strategy, StrategyConfig)
    node = OmegaConf.masked_copy(cfg.strategy, ["_target_", *[k for k in keys if k != "plan"]])
    # partial, then called: instantiate would turn the ParallelPlan into a DictConfig
    return instantiate(node, _partial_=True)(**({"plan": plan} if "plan" in keys else {}))


def build_trainer(cfg: DictConfig, plan: ParallelPlan, run_dir: Path):
    """The Trainer; Lightning's own refusals of its arguments become ConfigErrors (building it
    starts no process group)."""
    import lightning as L
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    # Every Trainer argument is in the group (trainer_args.py); a non-literal default stays unset.
    trainer_kwargs = {k: v for k, v in OmegaConf.to_container(cfg.trainer, resolve=True).items()
                      if not OmegaConf.is_missing(cfg.trainer, k)}
    logger = build_logger(cfg)
    callbacks = build_callbacks(cfg, run_dir)  # their own refusals name their own keys
    try:
        return L.Trainer(strategy=build_strategy(cfg, plan), logger=logger,
                         callbacks=callbacks, default_root_dir=str(run_dir),
                         **trainer_kwargs), logger
    except (MisconfigurationException, ValueError, TypeError) as error:
        defaults = dataclasses.asdict(TrainerConfig())
        changed = {k: v for k, v in trainer_kwargs.items() if defaults.get(k) != v}
        raise ConfigError(f"the trainer settings ({', '.join(f'trainer.{k}={v!r}' for k, v in changed.items())}) "
                          f"are refused by Lightning: {error}") from None


def run(cfg: DictConfig, config_checked: Optional[tuple] = None) -> Optional[Any]:
    """Train (or dry-run) what `cfg` describes; `config_checked`: check_config's result, if run."""
    checked = check_run(cfg, config_checked)
    model_cfg, plan = checked.model_cfg, checked.plan
    from .run_record import model_line, record_model

    if not cfg.dry_run or cfg.smoke:
        from .models import ModelConfig

        full = ModelConfig(**{k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items()
                              if k != "pretrained"}) if cfg.smoke and not cfg.model.pretrained else None
        print(model_line(cfg.recipe_name, model_cfg, full))
    record_model(cfg, model_cfg)
    if cfg.dry_run:
        from .planning.dry_run import dry_run_from_config

        print(dry_run_from_config(cfg, model_cfg, plan, checked.world_size))
        return None
    import lightning as L

    from .data.fit_corpus import fit_loops_to_data
    from .lightning_workarounds import quiet_upstream_warnings
    from .module import CausalLMModule

    quiet_upstream_warnings()

    datamodule = build_datamodule(cfg)

    for note in fit_loops_to_data(cfg, datamodule, plan.world_size if plan.is_auto else plan.dp):
        print(note)
    run_dir = Path(cfg.run_dir)
    trainer, logger = build_trainer(cfg, plan, run_dir)

    L.seed_everything(cfg.seed, workers=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    # max_steps=-1 (until max_epochs): the schedule spans Lightning's estimated_stepping_batches.
    total_steps = cfg.trainer.max_steps if cfg.trainer.max_steps > 0 else None
    module = CausalLMModule(model_cfg, lr=cfg.optim.lr, min_lr_ratio=cfg.optim.min_lr_ratio,
                            weight_decay=cfg.optim.weight_decay, warmup_steps=cfg.optim.warmup_steps,
                            total_steps=total_steps, loss_chunk_tokens=cfg.optim.loss_chunk_tokens,
                            pretrained=cfg.model.pretrained, fused_loss=cfg.optim.fused_loss)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    requeue = next((c.requested_exit_code for c in trainer.callbacks if getattr(c, "requested_exit_code", None)), None)
    if requeue is not None:  # preempted: checkpointed; the scheduler starts it again
        raise SystemExit(requeue)
    if cfg.export_path:
        from .export import export_model

        export_model(module.model, cfg.export_path, cfg.export_format, cfg.export_dtype,
                     tokenizer_from=cfg.model.pretrained)
    if trainer.is_global_zero:
        print(f"run directory: {run_dir.resolve()}")
        from .callbacks.report import RunReport

        for report in (c for c in trainer.callbacks if isinstance(c, RunReport) and c.report_dir):
            print(f"report: {report.report_dir.resolve()} (loss.png, summary.md and the other plots)")
        from lightning.pytorch.loggers import WandbLogger

        if isinstance(logger, WandbLogger) and logger.experiment is not None:
            print(f"W&B offline run: {logger.experiment.dir.rsplit('/files', 1)[0]}  "
                  "(upload with: wandb sync <that folder>)")
    return trainer
