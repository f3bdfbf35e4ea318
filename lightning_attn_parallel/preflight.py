"""Every check a run can make before its process group starts, in one place.

`check_run(cfg)` is what train.py calls before the Trainer is built: config keys and values, the
Trainer's arguments, the plan against the world and the model, the machine, the data files, the
checkpoint to resume from and the output folders. Each failure is a `ConfigError` (a
`UserError`) whose message names the key, value or path and the fix; nothing is written and
nothing expensive has started when it is raised.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from .config import ConfigError, StrategyConfig, check_known_keys
from .errors import UserError, did_you_mean, first_line
from .models import ModelConfig, smoke_scale
from .plan import ParallelPlan

# Lightning's ckpt_path values that name a checkpoint it finds itself.
LIGHTNING_CKPT_NAMES = ("last", "best", "hpc", "registry")
# A checkpoint holds fp32 weights and AdamW's two fp32 moments per parameter.
CHECKPOINT_BYTES_PER_PARAM = 12
EXPORT_BYTES_PER_PARAM = 4  # the consolidated export is fp32 weights only


@dataclass
class CheckedRun:
    """What the checks derived: the model, the plan (resolved to the world unless auto)."""

    model_cfg: ModelConfig
    plan: ParallelPlan
    world_size: int


def check_run(cfg: DictConfig, checked: Optional[tuple[ModelConfig, ParallelPlan]] = None) -> CheckedRun:
    """Check everything about the run `cfg` describes; raise ConfigError on the first problem.
    `checked`: what `check_config(cfg)` returned already (train.py runs it before the imports)."""
    model_cfg, plan = checked or check_config(cfg)
    check_target_node(cfg.strategy, "strategy", StrategyConfig)
    check_target_node(cfg.logger, "logger")
    check_target_node(cfg.callbacks, "callbacks")
    check_trainer(cfg.trainer)
    world = world_size_of(cfg)
    if cfg.dry_run:
        return CheckedRun(model_cfg, plan, world)
    if not plan.is_auto:
        plan = plan.resolve(world)
        plan.check_model(model_cfg, seq_len=cfg.data.seq_len, micro_batch_size=cfg.data.micro_batch_size)
        for length in cfg.data.lengths or []:
            plan.check_sequence(length, cfg.data.micro_batch_size)
    check_machine(cfg, model_cfg, plan)
    if cfg.model.pretrained:
        from .pretrained import check_data_vocabulary

        if not str(cfg.strategy.get("_target_", "")).endswith("AttnHybridStrategy"):
            raise ConfigError(f"model.pretrained is loaded by the attn_hybrid strategy, but strategy."
                              f"_target_={cfg.strategy.get('_target_')!r}: use strategy=attn_hybrid")
        check_data_vocabulary(cfg.data, model_cfg, cfg.model.pretrained)
    check_data_files(cfg.data, model_cfg)
    if cfg.export_path:
        from .export import check_export_request

        check_export_request(cfg.export_format, cfg.export_dtype, model_cfg)
    if cfg.ckpt_path:
        check_checkpoint_readable(cfg.ckpt_path, model_cfg)
    check_outputs(cfg, model_cfg)
    return CheckedRun(model_cfg, plan, world)


def check_config(cfg: DictConfig) -> tuple[ModelConfig, ParallelPlan]:
    """The checks that need neither torch nor Lightning (seconds to import): keys, values, the
    model and the plan's fields. Run first, so that a refused command answers in about a second."""
    check_known_keys(cfg)
    check_scale_overrides(cfg)
    check_optim(cfg)
    timeout = cfg.strategy.timeout_s
    _require(timeout is None or (not isinstance(timeout, bool) and isinstance(timeout, (int, float)) and timeout > 0),
             "strategy.timeout_s", timeout, "give the longest wait for a collective in seconds, > 0")
    model_cfg = model_config_from(cfg)
    plan = plan_from(cfg)
    check_data_shape(cfg, model_cfg)
    return model_cfg, plan


# ---------------------------------------------------------------------------------- config values
def _user_overrides() -> list[str]:
    """The command line's overrides (empty when the config was composed without Hydra's app)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def check_scale_overrides(cfg: DictConfig) -> None:
    """`+scale=smoke` replaces the data with the embedded corpus; a data path the user gave would
    be silently ignored, so refuse the combination (data.source=tokens keeps the user's data)."""
    if not cfg.smoke or cfg.data.source != "embedded":
        return
    given = [o for o in _user_overrides() if o.split("=", 1)[0].lstrip("+~") == "data"]
    paths = {k: cfg.data[k] for k in ("train_path", "val_path") if cfg.data[k]}
    if paths or (given and given[0].split("=", 1)[1] != "embedded"):
        what = ", ".join(f"data.{k}={v!r}" for k, v in paths.items()) or given[0]
        raise ConfigError(f"+scale=smoke trains on the embedded corpus, so {what} would be ignored: "
                          "add data.source=tokens to smoke-test on your token file, or drop the data "
                          "override to smoke-test on the embedded corpus")


def target_class(node: DictConfig) -> Any:
    """The class or function a `_target_` node names (imported, not called)."""
    from hydra._internal.utils import _locate

    return _locate(node._target_)


# Targets whose **kwargs are passed on to another function, whose parameters then decide: a
# misspelt `logger.entitty` would otherwise reach wandb.init only when the first metric is logged.
# Keyed by the class's defining module, so every import path of it (lightning.pytorch.loggers.
# WandbLogger, ...loggers.wandb.WandbLogger) finds the entry.
KWARGS_PASSED_ON = {"lightning.pytorch.loggers.wandb.WandbLogger": "wandb.init"}


def _signature_parameters(target: Any) -> tuple[set[str], bool]:
    import inspect

    parameters = inspect.signature(target).parameters
    var_keyword = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    return {n for n, p in parameters.items() if p.kind is not inspect.Parameter.VAR_KEYWORD}, var_keyword


def target_parameters(node: Any) -> tuple[set[str], bool]:
    """(named parameters, whether it also takes **kwargs) of a `_target_` node's target; for a
    target that passes its **kwargs on (KWARGS_PASSED_ON), the receiver's parameters count too."""
    from hydra._internal.utils import _locate

    target = target_class(node)
    named, var_keyword = _signature_parameters(target)
    receiver = KWARGS_PASSED_ON.get(f"{target.__module__}.{target.__qualname__}") if var_keyword else None
    if receiver is not None:
        try:
            passed_on, var_keyword = _signature_parameters(_locate(receiver))
        except Exception:  # noqa: BLE001 - the receiver's package is optional: keep **kwargs open
            return named, True
        named = named | passed_on
    return named, var_keyword


def target_kwargs(node: Any, schema: Optional[type] = None) -> list[str]:
    """The keys of a `_target_` node that go to its target: those it names, and with **kwargs
    any key the group's schema does not declare for another target."""
    named, var_keyword = target_parameters(node)
    declared = {f.name for f in dataclasses.fields(schema)} if schema else set()
    return [k for k in node if not str(k).startswith("_") and (k in named or (var_keyword and k not in declared))]


def check_target_node(node: Any, key: str, schema: Optional[type] = None) -> None:
    """A `_target_` node names something importable, and each of its keys is a parameter of it:
    a misspelt key would otherwise fail only once the run starts, or be passed on silently.
    Keys the group's `schema` declares but this target does not take must keep their defaults."""
    if not node:
        return
    if "_target_" not in node:
        raise ConfigError(f"{key}.{next(iter(node))} is set but {key} has no _target_ to pass it to: pick a "
                          f"{key} that has one (e.g. {key}=<name>) or drop the key")
    try:
        named, var_keyword = target_parameters(node)
    except Exception as err:  # noqa: BLE001 - Hydra raises ImportError or its own errors
        raise ConfigError(f"{key}._target_={node._target_!r} cannot be imported ({first_line(err)}): "
                          "give the dotted path of a class or function") from None
    defaults = OmegaConf.structured(schema) if schema else {}
    for name in node:
        if str(name).startswith("_") or name in named:
            continue
        if name in defaults:
            if node[name] != defaults[name]:
                raise ConfigError(f"{key}.{name} does not apply to {node._target_}, which takes no {name}: "
                                  f"use the default strategy (strategy=attn_hybrid), or drop {key}.{name}")
            continue
        if not var_keyword:
            raise ConfigError(f"{key}.{name} is not a parameter of {node._target_}"
                              f"{did_you_mean(name, named - {'self'}, key + '.')}: remove it or fix its "
                              f"spelling (parameters: {', '.join(sorted(named - {'self'}))})")


def _require(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: {rule}")


def check_optim(cfg: DictConfig) -> None:
    o = cfg.optim
    _require(o.lr > 0, "optim.lr", o.lr, "the learning rate must be > 0 (e.g. optim.lr=3e-4)")
    _require(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", o.min_lr_ratio,
             "it is the final learning rate over the peak: use a value in [0, 1]")
    _require(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "it must be >= 0")
    _require(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, "it must be >= 0 (0: no warm-up)")
    _require(o.loss_chunk_tokens is None or o.loss_chunk_tokens >= 1, "optim.loss_chunk_tokens",
             o.loss_chunk_tokens, "use a positive number of tokens, or null for the unchunked loss")


def _lightning_precisions() -> list:
    from lightning.fabric.connector import _PRECISION_INPUT

    def flat(kind: Any) -> list:
        return [v for a in typing.get_args(kind) for v in (flat(a) if typing.get_args(a) else [a])]

    return flat(_PRECISION_INPUT)


def check_trainer(t: DictConfig) -> None:
    """The Trainer arguments Lightning would otherwise reject (or misuse) only once it runs."""
    from lightning.pytorch.accelerators import AcceleratorRegistry

    accelerators = sorted(AcceleratorRegistry.available_accelerators()) + ["auto", "gpu"]
    _require(t.accelerator in accelerators, "trainer.accelerator", t.accelerator,
             f"choose one of {', '.join(accelerators)}")
    precisions = _lightning_precisions()
    _require(t.precision in precisions or str(t.precision) in map(str, precisions), "trainer.precision",
             t.precision, f"choose one of {', '.join(str(p) for p in precisions if isinstance(p, str))}")
    devices = t.devices
    if isinstance(devices, bool) or (isinstance(devices, int) and devices < 1 and devices != -1):
        raise ConfigError(f"trainer.devices={devices!r} is invalid: give a number of devices >= 1, -1 "
                          "for all of them, a list of device indices, or auto")
    if isinstance(devices, str) and devices != "auto" and not all(
            p.strip().lstrip("-").isdigit() for p in devices.split(",") if p.strip()):
        raise ConfigError(f"trainer.devices={devices!r} is invalid: give a number, a list such as "
                          "[0,1], or auto")
    if OmegaConf.is_list(devices) and len(devices) == 0:
        raise ConfigError("trainer.devices=[] names no device: give a number >= 1 or a non-empty list")
    _require(t.num_nodes >= 1, "trainer.num_nodes", t.num_nodes, "it must be >= 1")
    _require(t.max_steps >= 1 or t.max_steps == -1, "trainer.max_steps", t.max_steps,
             "give a number of optimizer steps >= 1 (or -1 with trainer.max_epochs)")
    if t.max_steps == -1 and not t.get("max_epochs"):
        raise ConfigError("trainer.max_steps=-1 trains until trainer.max_epochs, which is not set, and "
                          "the learning-rate schedule needs a known length: set trainer.max_epochs=N "
                          "(the schedule then spans the steps of N epochs) or a positive trainer.max_steps")
    if t.get("max_epochs") is not None:
        _require(t.max_epochs >= 1 or t.max_epochs == -1, "trainer.max_epochs", t.max_epochs,
                 "give a number of epochs >= 1, or null")
    _require(t.accumulate_grad_batches >= 1, "trainer.accumulate_grad_batches", t.accumulate_grad_batches,
             "it must be >= 1")
    _require(t.gradient_clip_val is None or t.gradient_clip_val >= 0, "trainer.gradient_clip_val",
             t.gradient_clip_val, "use a norm >= 0, or null for no clipping")
    _require(t.log_every_n_steps >= 1, "trainer.log_every_n_steps", t.log_every_n_steps, "it must be >= 1")
    for key in ("val_check_interval", "limit_val_batches"):
        value = t[key]
        ok = (isinstance(value, int) and not isinstance(value, bool) and value >= 0) or (
            isinstance(value, float) and 0 <= value <= 1)
        _require(ok and not (key == "val_check_interval" and value == 0), f"trainer.{key}", value,
                 "give a number of batches (an integer) or a fraction in [0, 1] (a float)")


def corpus_model_values(cfg: DictConfig) -> dict:
    """What a prepared corpus decides about the model: its vocabulary, unless the command line
    sets model.vocab_size (a smaller one is refused by check_data_files)."""
    if cfg.data.source != "documents" or OmegaConf.is_missing(cfg.data, "path") or not cfg.data.path:
        return {}
    if any(o.split("=", 1)[0].lstrip("+~") == "model.vocab_size" for o in _user_overrides()):
        return {}
    from .data.documents import DocumentCorpus

    return {"vocab_size": DocumentCorpus.open(cfg.data.path, cfg.data.dtype).vocab_size}


def model_config_from(cfg: DictConfig) -> ModelConfig:
    values = OmegaConf.to_container(cfg.model, resolve=True)
    pretrained = values.pop("pretrained", None)
    if pretrained:  # config.json decides (pretrained.py)
        from .pretrained import model_config_for

        return model_config_for(pretrained, values, cfg.recipe_name, smoke=cfg.smoke)
    values.update(corpus_model_values(cfg))
    try:
        model_cfg = ModelConfig(**values)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if cfg.smoke:
        model_cfg = smoke_scale(model_cfg, max_seq_len=max(256, cfg.data.seq_len))
    return model_cfg


def plan_from(cfg: DictConfig) -> ParallelPlan:
    from .plan import PlanError

    values = OmegaConf.to_container(cfg.strategy.plan, resolve=True)
    known = {f.name for f in dataclasses.fields(ParallelPlan)}
    unknown = [k for k in values if k not in known]
    if unknown:
        raise PlanError(f"strategy.plan.{unknown[0]} is not a ParallelPlan field: remove it or fix its "
                        f"spelling (fields: {', '.join(sorted(known))})")
    return ParallelPlan(**values)


def world_size_of(cfg: DictConfig) -> int:
    import torch

    devices = cfg.trainer.devices
    if isinstance(devices, int) and devices > 0:
        per_node = devices
    elif OmegaConf.is_list(devices) or isinstance(devices, (list, tuple)):
        per_node = len(devices)
    elif isinstance(devices, str) and devices not in ("auto", "-1"):
        per_node = len([p for p in devices.split(",") if p.strip()])
    elif torch.cuda.is_available() and cfg.trainer.accelerator in ("gpu", "cuda", "auto"):
        per_node = torch.cuda.device_count()
    else:
        per_node = 1
    return per_node * cfg.trainer.num_nodes


def check_data_shape(cfg: DictConfig, model_cfg: ModelConfig) -> None:
    d = cfg.data
    _require(d.seq_len >= 1, "data.seq_len", d.seq_len, "it must be >= 1")
    _require(d.micro_batch_size >= 1, "data.micro_batch_size", d.micro_batch_size, "it must be >= 1")
    _require(0 <= d.val_fraction < 1, "data.val_fraction", d.val_fraction, "use a fraction in [0, 1)")
    _require(d.num_workers >= 0, "data.num_workers", d.num_workers, "it must be >= 0")
    if d.seq_len > model_cfg.max_seq_len:
        raise ConfigError(f"data.seq_len={d.seq_len} is longer than the model supports "
                          f"(model.max_seq_len={model_cfg.max_seq_len}): lower data.seq_len or raise "
                          "model.max_seq_len")
    if d.lengths and (min(d.lengths) < 1 or max(d.lengths) > d.seq_len):
        raise ConfigError(f"data.lengths={list(d.lengths)} must lie in [1, data.seq_len={d.seq_len}]: "
                          "raise seq_len to the longest length")


# ---------------------------------------------------------------------------------- the machine
def check_machine(cfg: DictConfig, model_cfg: ModelConfig, plan: ParallelPlan) -> None:
    """Fail fast when the run asks for hardware this machine lacks, or cannot hold the model.

    The memory check is the planner's estimate (planning/memory.py), on the GPU it detects or,
    on CPU, against this machine's RAM."""
    import torch

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
    if plan.is_auto or cfg.skip_fit_check:
        return
    check_fits(cfg, model_cfg, plan, on_gpu=torch.cuda.is_available() and cfg.trainer.accelerator != "cpu")


def check_fits(cfg: DictConfig, model_cfg: ModelConfig, plan: ParallelPlan, on_gpu: bool) -> None:
    """The planner's memory budget for this (resolved) plan; fail with the nearest fit."""
    from .planning import CPU, ClusterSpec, detect_gpu, estimate_memory, nearest_fit, precision_spec

    try:
        precision_spec(cfg.trainer.precision)
    except ValueError:
        return  # a precision the planner does not model (e.g. 64-true): nothing to estimate
    if on_gpu:
        device = detect_gpu()
    else:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        device = dataclasses.replace(CPU, name="this machine's RAM", memory_gib=ram / 2**30)
    from .planning.select import accumulation_options

    kwargs = dict(grad_accum=cfg.trainer.accumulate_grad_batches, loss_chunk_tokens=cfg.optim.loss_chunk_tokens)
    shape = (cfg.data.micro_batch_size, cfg.data.seq_len, cfg.trainer.precision)
    estimate = min((estimate_memory(model_cfg, dataclasses.replace(plan, accumulation=policy), *shape, device,
                                    **kwargs)
                    for policy in accumulation_options(plan, cfg.trainer.accumulate_grad_batches)),
                   key=lambda e: e.total)  # accumulation="auto" takes the leanest
    if estimate.fits:
        return
    per_node = max(1, plan.world_size // cfg.trainer.num_nodes)
    cluster = ClusterSpec(num_nodes=cfg.trainer.num_nodes, gpus_per_node=per_node)
    fixes = nearest_fit(model_cfg, cluster, device, *shape, plan=plan, **kwargs)
    nearest = f" Nearest fit: {fixes[0]}." if fixes else ""
    where = device.name if on_gpu else "this machine (CPU)"
    raise ConfigError(
        f"{plan.describe()} needs about {estimate.describe()} per process, more than the "
        f"{estimate.capacity / 2**30:.1f} GiB usable on {where}.{nearest} (shard more with "
        "strategy.plan.dp_shard, add +scale=smoke, dry_run=true shows every candidate; "
        "skip_fit_check=true runs anyway)")


# ---------------------------------------------------------------------------------- data files
def check_data_files(data: DictConfig, model_cfg: ModelConfig) -> None:
    """Token files exist, hold at least one sequence, match their dtype, and their largest id
    fits the model's vocabulary."""
    from .data.datamodule import check_token_file

    if data.source == "embedded":
        if model_cfg.vocab_size < 256:
            raise ConfigError(f"model.vocab_size={model_cfg.vocab_size} is smaller than the embedded "
                              "corpus's byte vocabulary (256): raise model.vocab_size to 256 or more")
        return
    if data.source == "documents" and data.path:  # no path: the data module says what to set
        from .data.documents import DocumentCorpus

        corpus = DocumentCorpus.open(data.path, data.dtype)  # files against their metadata
        if corpus.vocab_size > model_cfg.vocab_size:
            raise ConfigError(f"model.vocab_size={model_cfg.vocab_size} is smaller than the vocabulary of "
                              f"the corpus {data.path} ({corpus.vocab_size}, tokenizer "
                              f"{corpus.metadata['tokenizer']['name']!r}): set model.vocab_size to at least "
                              f"{corpus.vocab_size}")
        return
    if data.source != "tokens":
        return  # other sources check their own files when their data module is built
    if not data.train_path:
        raise ConfigError("data.source=tokens needs data.train_path (a uint16/uint32 .bin token file)")
    for key in ("train_path", "val_path"):
        if data[key]:
            check_token_file(data[key], data.dtype, data.seq_len, model_cfg.vocab_size, key=f"data.{key}")


# ---------------------------------------------------------------------------------- checkpoints
def check_checkpoint_readable(path: Any, model_cfg: Optional[ModelConfig] = None) -> None:
    """A checkpoint to resume from exists, is complete (checkpoint.py reads only its metadata),
    and was saved from the same model: the saved model config (the module's hyperparameters) is
    compared field by field with `model_cfg`."""
    if str(path) in LIGHTNING_CKPT_NAMES:
        return
    from .checkpoint import CheckpointError, saved_hyperparameters

    path = Path(str(path)).expanduser()
    if not path.exists():
        raise ConfigError(f"ckpt_path={str(path)!r} does not exist: give the path of a saved "
                          "checkpoint (a .ckpt file or a sharded checkpoint folder)")
    try:
        hparams = saved_hyperparameters(path)
    except CheckpointError as err:
        raise ConfigError(f"ckpt_path={err}; give the path of a complete checkpoint saved by this run's "
                          "model (or drop ckpt_path)") from None
    saved = hparams.get("model") if isinstance(hparams, dict) else None
    if model_cfg is not None and isinstance(saved, dict):
        requested = dataclasses.asdict(model_cfg)
        defaults = dataclasses.asdict(ModelConfig())
        differ = [k for k in requested if saved.get(k, defaults.get(k)) != requested[k]]
        if differ:
            shown = ", ".join(f"model.{k}={saved.get(k)!r} there but {requested[k]!r} here" for k in differ[:4])
            raise ConfigError(f"ckpt_path={str(path)!r} was saved from another model ({shown}): resume "
                              "with the model settings (recipe, +scale) it was saved with, or train "
                              "from scratch without ckpt_path")


# ---------------------------------------------------------------------------------- outputs
def estimated_checkpoint_bytes(model_cfg: ModelConfig) -> int:
    from .planning import parameter_counts

    return CHECKPOINT_BYTES_PER_PARAM * parameter_counts(model_cfg).total


def check_outputs(cfg: DictConfig, model_cfg: ModelConfig) -> None:
    """The run directory (and the export file's folder) can be written, with room for what the
    run will write there: a checkpoint of the estimated size, the consolidated export."""
    check_writable_folder(cfg.run_dir, 0, "run_dir", "the run's logs")
    if cfg.trainer.enable_checkpointing:  # its own folder: it may be another mount
        check_writable_folder(checkpoint_dir(cfg.run_dir), estimated_checkpoint_bytes(model_cfg),
                              "the checkpoint folder of run_dir", "the run's checkpoints")
    if cfg.export_path:
        export = Path(cfg.export_path).expanduser()
        if cfg.export_format == "hf":  # a Hugging Face folder
            export = export / "model.safetensors"
        elif export.is_dir():
            raise ConfigError(f"export_path={cfg.export_path!r} is a folder: give a file path, e.g. "
                              f"{cfg.export_path.rstrip('/')}/model.pt")
        from .planning import parameter_counts

        check_writable_folder(export.parent, EXPORT_BYTES_PER_PARAM * parameter_counts(model_cfg).total,
                              "export_path", "the consolidated export")


def checkpoint_dir(run_dir: Any) -> Path:
    """Where a run's checkpoints go (ModelCheckpoint's folder in cli.py)."""
    return Path(str(run_dir)).expanduser() / "checkpoints"


def check_writable_folder(folder: Any, need_bytes: int, key: str, what: str) -> None:
    """`folder` (or its nearest existing parent) accepts a file and has `need_bytes` free.

    Probes with a real temporary file (storage.why_not_writable)."""
    from .storage import existing_folder, why_not_writable

    folder = Path(str(folder)).expanduser().absolute()
    existing = folder if folder.exists() else existing_folder(folder)
    if not existing.is_dir():
        raise ConfigError(f"{key}={str(folder)!r} cannot be created: {existing} is a file, not a folder; "
                          "choose another path")
    unwritable = why_not_writable(existing)
    if unwritable is not None:
        raise ConfigError(f"{key}={str(folder)!r} is not writable ({existing}: {unwritable})")
    free = shutil.disk_usage(existing).free
    if need_bytes > free:
        raise ConfigError(f"{key}={str(folder)!r} has {free / 2**30:.2f} GiB free but {what} need about "
                          f"{need_bytes / 2**30:.2f} GiB: free space, choose another folder, or set "
                          "trainer.enable_checkpointing=false")


__all__ = ["CheckedRun", "check_run", "check_config", "check_target_node", "target_class", "target_kwargs", "check_checkpoint_readable", "check_writable_folder", "checkpoint_dir",
           "estimated_checkpoint_bytes", "model_config_from", "plan_from", "world_size_of", "UserError"]
