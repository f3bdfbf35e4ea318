"""Structured config schemas for train.py, and the registration of recipes.

Every group of conf/ is validated against a dataclass here, so a misspelt key or a value of the
wrong type fails when Hydra composes the config, naming the key, before any process starts.
Recipes (recipes/*.yaml) are registered in Hydra's ConfigStore under the group `recipe`, so
`+recipe=NAME` finds them and an unknown name lists the available ones.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, get_type_hints

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from .errors import UserError, did_you_mean, one_line
from .models.config import ModelConfig
from .plan import ParallelPlan

# Inside the package, so an installed (not editable) package finds them too.
CONF_DIR = Path(__file__).resolve().parent / "conf"
RECIPES_DIR = Path(__file__).resolve().parent / "recipes"


class ConfigError(UserError):
    """A configuration that cannot run; the message names the value and the fix."""


@dataclass
class DataConfig:
    source: str = "embedded"
    seq_len: int = 256
    micro_batch_size: int = 12
    train_path: Optional[str] = None
    val_path: Optional[str] = None
    dtype: str = "uint16"
    cache_dir: str = "~/.cache/lightning_attn_parallel"
    val_fraction: float = 0.05
    num_workers: int = 0
    lengths: Optional[list[int]] = None  # mixed sequence lengths, one drawn per batch
    path: Optional[str] = None  # source=documents: a folder written by data.prepare
    pack: bool = True  # source=documents: pack documents into windows (False: one per window, padded)


@dataclass
class ProjectTrainerDefaults:
    """The Trainer arguments train.py sets differently from Lightning, typed."""

    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    precision: str = "32-true"
    max_steps: int = 150  # -1: until max_epochs (the schedule then spans the steps of max_epochs)
    max_epochs: Optional[int] = None
    accumulate_grad_batches: int = 1
    gradient_clip_val: Optional[float] = 1.0
    val_check_interval: Any = 150
    limit_val_batches: Any = 10
    log_every_n_steps: int = 10
    enable_progress_bar: bool = True
    enable_checkpointing: bool = True
    deterministic: bool = False
    # train.py prints its own model line (run_record.py); Lightning's table shows "Total FLOPs: 0"
    # for a module without an example input
    enable_model_summary: Optional[bool] = False


def _with_every_trainer_argument(base: type) -> type:
    """`base` plus every other `lightning.Trainer` argument at Lightning's default (typed Any,
    as Lightning types many as unions OmegaConf cannot hold), so any of them can be set with
    `trainer.NAME=VALUE` while a misspelt name is still refused when Hydra composes."""
    from .trainer_args import NOT_A_LITERAL, SET_BY_THE_PROJECT, trainer_parameters

    own = {f.name for f in dataclasses.fields(base)}
    extra = [(name, Any, field(default=MISSING if default is NOT_A_LITERAL else default))
             for name, default in trainer_parameters().items()
             if name not in own and name not in SET_BY_THE_PROJECT]
    return dataclasses.make_dataclass("TrainerConfig", extra, bases=(base,))


TrainerConfig = _with_every_trainer_argument(ProjectTrainerDefaults)


@dataclass
class StrategyConfig:
    """The strategy group: a `_target_` plus the keys AttnHybridStrategy takes, typed here so that
    `strategy.plan.tp=2` is checked when Hydra composes. Another target (Lightning's DDP) must
    leave the keys it does not take at these defaults (preflight.py refuses otherwise)."""

    _target_: str = "lightning_attn_parallel.AttnHybridStrategy"
    plan: ParallelPlan = field(default_factory=ParallelPlan)
    save_distributed_checkpoint: bool = True
    async_checkpoint: bool = False  # write checkpoints in the background (async_checkpoint.py)
    timeout_s: Optional[float] = None  # None: the strategy's default


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    warmup_steps: int = 15
    loss_chunk_tokens: Optional[int] = None
    fused_loss: bool = False  # liger's fused LM head + cross-entropy where it runs (extra [liger])


@dataclass
class ModelSection(ModelConfig):
    """The `model` group: a ModelConfig, or a Hugging Face folder to build it from and load."""

    pretrained: Optional[str] = None  # see pretrained.py: config.json decides the shape


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    # strategy, logger and callbacks are `_target_` nodes (conf/<group>/*.yaml) that Hydra
    # instantiates; their keys are checked against the target's parameters (preflight.py).
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logger: Any = None
    callbacks: Any = None
    smoke: bool = False  # set by +scale=smoke: shrink widths and depths, keep the structure
    recipe_name: str = "default"
    dry_run: bool = False
    skip_fit_check: bool = False  # run even when the planner's memory budget says it won't fit
    skip_nonfinite: int = 0  # steps with a NaN/inf loss or grad norm to skip (0: the first one stops the run)
    # signals that checkpoint, stop and exit with 128 + signal for a requeue (callbacks/preemption.py); [] for none
    preemption_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    seed: int = 1234
    run_dir: str = "runs/${recipe_name}"
    ckpt_path: Optional[str] = None
    export_path: Optional[str] = None  # write the trained model there at the end
    export_format: str = "consolidated"  # or "hf": a Hugging Face folder (export.py)
    export_dtype: str = "bf16"  # hf only: bf16 or fp32


def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def run_name(recipe_name: str, data_path: Optional[str]) -> str:
    """The folder under runs/ a run is filed in: its recipe, and the corpus it trains on."""
    corpus = Path(str(data_path)).expanduser().resolve().name if data_path else ""
    if not corpus:
        return recipe_name
    return corpus if recipe_name == "default" else f"{recipe_name}-{corpus}"


def register_configs() -> None:
    """Register the schema, every recipe and the run-name resolver with Hydra (idempotent)."""
    OmegaConf.register_new_resolver("lap_run_name", run_name, replace=True)
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        node = OmegaConf.load(path)
        node.recipe_name = path.stem
        store.store(group="recipe", name=path.stem, node=node, package="_global_")


def _known_fields(schema: type) -> dict[str, Any]:
    """Field name -> type of a dataclass schema (types resolved, so nested schemas are classes)."""
    hints = get_type_hints(schema)
    return {f.name: hints[f.name] for f in dataclasses.fields(schema)}


def check_known_keys(cfg: DictConfig, schema: type = None, prefix: str = "") -> None:
    """Refuse keys the schema does not know, in every group.

    Hydra lets `+group.key=value` add a key even to a structured config; such a key would be
    read by nothing, so the run would silently ignore it.
    """
    schema = schema or TrainConfig
    known = _known_fields(schema)
    for key in cfg.keys():
        if key not in known:
            raise ConfigError(unknown_key_message(f"{prefix}{key}"))
        value = cfg._get_node(key)
        if isinstance(value, DictConfig) and "_target_" in value:
            continue  # checked against its target's parameters (preflight.check_target_node)
        if dataclasses.is_dataclass(known[key]) and isinstance(value, DictConfig) and not value._is_none():
            check_known_keys(value, known[key], f"{prefix}{key}.")


def unknown_key_message(key: str) -> str:
    """One line for a key no schema declares: the closest known key, the keys train.py sets from
    other groups, or where to see every key."""
    from .trainer_args import SET_BY_THE_PROJECT

    *parents, name = key.split(".")
    schema: Any = TrainConfig
    for part in parents:
        schema = _known_fields(schema).get(part) if dataclasses.is_dataclass(schema) else None
    if parents == ["trainer"] and name in SET_BY_THE_PROJECT:
        return (f"{key} is set by train.py itself: use {SET_BY_THE_PROJECT[name]} instead")
    where = ".".join(parents) or "the top level"
    known = list(_known_fields(schema)) if dataclasses.is_dataclass(schema) else []
    hint = did_you_mean(name, known, ".".join(parents) + "." if parents else "")
    if not hint and known:
        hint = f" (known keys: {', '.join(known)})"
    return (f"{key} is not a known key of {where}{hint}: fix its spelling, or see "
            f"`python train.py --cfg job` for every key")


def config_user_error(error: BaseException) -> Optional[ConfigError]:
    """Hydra's and OmegaConf's composition errors as one-line ConfigErrors (None for others).

    Hydra prints these over several lines with hints about its own search path; the user needs
    the key, the value and the choices.
    """
    from hydra.errors import HydraException, MissingConfigException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(error, OverrideParseException):
        return ConfigError(f"the override {error.override!r} is not valid Hydra syntax "
                           f"({str(error).splitlines()[0]}): write key=value, +key=value to add a "
                           "key, and quote values with special characters")
    if isinstance(error, MissingConfigException):
        found = re.search(r"Could not find '([^']+)'", str(error))
        missing = found.group(1) if found else (error.missing_cfg_file or "?")
        group, _, name = missing.rpartition("/")
        options = list(error.options or [])
        if group == "recipe":
            options = options or available_recipes()
        if group:
            return ConfigError(f"{group} '{name}' is unknown: choose one of {', '.join(options) or '(none)'} "
                               f"(e.g. {'+' if group in ('recipe', 'scale') else ''}{group}="
                               f"{options[0] if options else 'NAME'})")
        return ConfigError(one_line(str(error)))
    cause = error.__cause__ if isinstance(error.__cause__, OmegaConfBaseException) else None
    omega = error if isinstance(error, OmegaConfBaseException) else cause
    if omega is not None:
        key = getattr(omega, "full_key", None)
        message = str(omega).split("\n")[0].strip()
        if "not in" in message and key:
            return ConfigError(unknown_key_message(key))
        if key:
            return ConfigError(f"{key}: {message}: give a value of the right type")
        return ConfigError(one_line(message))
    if isinstance(error, HydraException):
        return ConfigError(one_line(str(error)))
    return None
