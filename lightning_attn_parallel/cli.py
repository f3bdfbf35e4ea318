"""What train.py does with a composed config: validate everything, then plan or train.

All checks run before the Trainer (and so before any process group or real allocation): a bad
value fails with one message naming it and the fix.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from .config import ConfigError, check_known_keys
from .models import ModelConfig, build_model, smoke_scale
from .plan import ParallelPlan, PlanError


def model_config_from(cfg: DictConfig) -> ModelConfig:
    values = OmegaConf.to_container(cfg.model, resolve=True)
    try:
        model_cfg = ModelConfig(**values)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if cfg.smoke:
        model_cfg = smoke_scale(model_cfg, max_seq_len=max(256, cfg.data.seq_len))
    return model_cfg


def plan_from(cfg: DictConfig) -> ParallelPlan:
    values = OmegaConf.to_container(cfg.strategy.plan, resolve=True)
    try:
        return ParallelPlan(**values)
    except PlanError as error:
        raise ConfigError(str(error)) from None


def world_size_of(cfg: DictConfig) -> int:
    devices = cfg.trainer.devices
    if isinstance(devices, int) and devices > 0:
        per_node = devices
    elif isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        per_node = len(devices)
    elif torch.cuda.is_available() and cfg.trainer.accelerator in ("gpu", "cuda", "auto"):
        per_node = torch.cuda.device_count()
    else:
        per_node = 1
    return per_node * cfg.trainer.num_nodes


def check_machine(cfg: DictConfig, model_cfg: ModelConfig, plan: ParallelPlan) -> None:
    """Fail fast when the run asks for hardware this machine lacks, or cannot hold the model."""
    wants_gpu = cfg.trainer.accelerator in ("gpu", "cuda")
    if wants_gpu and not torch.cuda.is_available():
        raise ConfigError(
            f"recipe '{cfg.recipe_name}' needs GPUs (trainer.accelerator={cfg.trainer.accelerator}) "
            "but this machine has none: add +scale=smoke to run its architecture on the CPU, or "
            "dry_run=true to see the plan and memory for the cluster it names")
    if wants_gpu and isinstance(cfg.trainer.devices, int) and cfg.trainer.devices > torch.cuda.device_count():
        raise ConfigError(
            f"trainer.devices={cfg.trainer.devices} but this machine has {torch.cuda.device_count()} "
            f"GPU(s): set trainer.devices={torch.cuda.device_count()} (and trainer.num_nodes on a "
            "cluster), or dry_run=true to plan for the intended cluster")
    if wants_gpu:
        if not plan.is_auto and not cfg.skip_fit_check:
            check_fits_gpu(cfg, model_cfg, plan)
        return
    with torch.device("meta"):
        params = sum(p.numel() for p in build_model(model_cfg).parameters())
    # Weights, gradients and two AdamW states, all fp32: 16 bytes per parameter, split by the
    # degrees that shard parameters.
    shards = plan.dp_shard * plan.tp * (plan.ep if model_cfg.is_moe else 1)
    need = 16 * params / shards
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have:
        raise ConfigError(
            f"{params / 1e9:.2f}B parameters need {need / 2**30:.1f} GiB per process for weights, "
            f"gradients and optimizer state under {plan.describe()}, more than this machine's RAM "
            f"({have / 2**30:.1f} GiB): shard more (strategy.plan.dp_shard), add +scale=smoke, or run "
            "dry_run=true for a plan that fits")


def check_fits_gpu(cfg: DictConfig, model_cfg: ModelConfig, plan: ParallelPlan) -> None:
    """The planner's memory budget for this plan on this card; fail with the nearest fit."""
    from dataclasses import replace

    from .planning import ClusterSpec, detect_gpu, estimate_memory, nearest_fit
    from .planning.select import accumulation_options

    gpu = detect_gpu()
    devices = cfg.trainer.devices if isinstance(cfg.trainer.devices, int) else torch.cuda.device_count()
    cluster = ClusterSpec(num_nodes=cfg.trainer.num_nodes, gpus_per_node=devices)
    resolved = plan.resolve(cluster.world_size)
    accumulate = cfg.trainer.accumulate_grad_batches
    estimate = min((estimate_memory(model_cfg, replace(resolved, accumulation=policy),
                                    cfg.data.micro_batch_size, cfg.data.seq_len, cfg.trainer.precision,
                                    gpu, grad_accum=accumulate, loss_chunk_tokens=cfg.optim.loss_chunk_tokens)
                    for policy in accumulation_options(resolved, accumulate)),  # "auto": the leanest
                   key=lambda e: e.total)
    if estimate.fits:
        return
    fixes = nearest_fit(model_cfg, cluster, gpu, cfg.data.micro_batch_size, cfg.data.seq_len,
                        cfg.trainer.precision, plan=resolved, grad_accum=cfg.trainer.accumulate_grad_batches,
                        loss_chunk_tokens=cfg.optim.loss_chunk_tokens)
    nearest = f" Nearest fit: {fixes[0]}." if fixes else ""
    raise ConfigError(
        f"{plan.describe()} needs about {estimate.describe()} per GPU, more than the "
        f"{estimate.capacity / 2**30:.1f} GiB usable on {gpu.name}.{nearest} (dry_run=true shows every "
        "candidate; skip_fit_check=true runs anyway)")


def build_datamodule(cfg: DictConfig):
    from .data.datamodule import LMDataModule
    from .data.documents import DOCUMENT_KEYS, DocumentDataModule

    values = OmegaConf.to_container(cfg.data, resolve=True)
    try:
        if values["source"] == "documents":
            return DocumentDataModule(**{k: values[k] for k in DOCUMENT_KEYS if k in values})
        return LMDataModule(**{k: v for k, v in values.items() if k not in ("path", "pack")})
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(str(error)) from None


def build_logger(cfg: DictConfig, run_dir: Path):
    name = cfg.logger.name
    if name == "none":
        return False
    if name == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir=str(run_dir), name="csv")
    if name == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        os.environ.setdefault("WANDB_SILENT", "true")
        return WandbLogger(project=cfg.logger.project, save_dir=str(run_dir), offline=cfg.logger.offline,
                           config=OmegaConf.to_container(cfg, resolve=True))
    raise ConfigError(f"logger.name={name!r} is unknown: use wandb, csv or none")


def build_callbacks(cfg: DictConfig, run_dir: Path) -> list:
    from lightning.pytorch.callbacks import ModelCheckpoint

    callbacks: list = []
    if cfg.trainer.enable_checkpointing:
        callbacks.append(ModelCheckpoint(dirpath=str(run_dir / "checkpoints"), save_last=True,
                                         every_n_train_steps=max(1, cfg.trainer.max_steps // 2)))
    if cfg.callbacks.enabled:
        from .callbacks import default_callbacks

        callbacks += default_callbacks(log_every_n_steps=cfg.callbacks.log_every_n_steps,
                                       peak_tflops=cfg.callbacks.peak_tflops,
                                       profile_steps=cfg.callbacks.profile_steps,
                                       report=cfg.callbacks.report, run_dir=str(run_dir))
    return callbacks


def build_strategy(cfg: DictConfig, plan: ParallelPlan):
    if cfg.strategy.name != "attn_hybrid":
        return cfg.strategy.name
    from .strategy import AttnHybridStrategy

    try:
        return AttnHybridStrategy(plan=plan, save_distributed_checkpoint=cfg.strategy.save_distributed_checkpoint,
                                  timeout_s=cfg.strategy.timeout_s)
    except ValueError as error:  # e.g. strategy.timeout_s <= 0
        raise ConfigError(str(error)) from None


def run(cfg: DictConfig) -> Optional[Any]:
    import lightning as L

    from .module import CausalLMModule

    check_known_keys(cfg)
    model_cfg = model_config_from(cfg)
    plan = plan_from(cfg)
    world = world_size_of(cfg)
    if cfg.data.seq_len > model_cfg.max_seq_len:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} is longer than the model supports "
                          f"(model.max_seq_len={model_cfg.max_seq_len}): lower data.seq_len or raise "
                          "model.max_seq_len")
    if cfg.dry_run:
        from .planning.dry_run import dry_run_from_config

        print(dry_run_from_config(cfg, model_cfg, plan, world))
        return None
    try:
        if not plan.is_auto:
            plan.resolve(world)
            plan.check_model(model_cfg)
    except PlanError as error:
        raise ConfigError(str(error)) from None
    check_machine(cfg, model_cfg, plan)
    datamodule = build_datamodule(cfg)
    if datamodule.vocab_size and datamodule.vocab_size > model_cfg.vocab_size:
        raise ConfigError(f"model.vocab_size={model_cfg.vocab_size} is smaller than the data's "
                          f"vocabulary ({datamodule.vocab_size}): raise model.vocab_size")
    if cfg.ckpt_path and not Path(cfg.ckpt_path).exists():
        raise ConfigError(f"ckpt_path={cfg.ckpt_path!r} does not exist: give the path of a saved "
                          "checkpoint (a .ckpt file or a sharded checkpoint folder)")

    L.seed_everything(cfg.seed, workers=True)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    module = CausalLMModule(model_cfg, lr=cfg.optim.lr, min_lr_ratio=cfg.optim.min_lr_ratio,
                            weight_decay=cfg.optim.weight_decay, warmup_steps=cfg.optim.warmup_steps,
                            total_steps=cfg.trainer.max_steps, loss_chunk_tokens=cfg.optim.loss_chunk_tokens)
    callbacks = build_callbacks(cfg, run_dir)
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    logger = build_logger(cfg, run_dir)
    trainer = L.Trainer(strategy=build_strategy(cfg, plan), logger=logger, callbacks=callbacks,
                        default_root_dir=str(run_dir), **trainer_kwargs)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    if cfg.export_path:
        from .checkpoint import export_consolidated

        export_consolidated(cfg.export_path, module.model)
    if trainer.is_global_zero:
        print(f"run directory: {run_dir.resolve()}")
        if cfg.logger.name == "wandb" and logger and logger.experiment is not None:
            print(f"W&B offline run: {logger.experiment.dir.rsplit('/files', 1)[0]}  "
                  "(upload with: wandb sync <that folder>)")
    return trainer
