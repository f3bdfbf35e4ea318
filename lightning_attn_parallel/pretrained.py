"""Load a Hugging Face folder into a model that is already parallelized, each rank reading only
the slices it holds.

After the strategy has applied its plan, every tensor of the model is either plain (replicated)
or a DTensor (FSDP2/HSDP shards, tensor- or expert-parallel shards, or products of them). The
global slice a rank holds follows from the placements (`compute_local_shape_and_global_offset`), and
models/hf.py reads that slice out of the memory-mapped safetensors files (widened to whole heads
where q/k rows are reordered), so no rank ever reads or builds a whole tensor it only holds part of.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Optional

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from .errors import UserError
from .models.config import ModelConfig
from .models.hf import Checkpoint, Index, PathLike, determined_fields, load_into
from .models.materialize import materialize
from .models.protocol import find_transformer
from .parallel.pipeline_stages import is_pipeline_stage
from .parallel.state_dict import state_dict_name


def command_line_model_keys() -> set[str]:
    """`model.X` keys given on the command line of this Hydra run (empty outside one)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = HydraConfig.get().overrides.task
    except (ImportError, ValueError):
        return set()
    keys = (o.split("=", 1)[0].lstrip("+~") for o in overrides)
    return {k.split(".", 1)[1] for k in keys if k.startswith("model.")}


def model_config_for(path: PathLike, values: dict, recipe: str, smoke: bool = False,
                     overridden: Optional[set[str]] = None) -> ModelConfig:
    """The ModelConfig of `python train.py model.pretrained=PATH ...`: config.json's, except
    for fields given explicitly on the command line. Under a recipe, a recipe value that
    config.json contradicts is an error naming the field (the recipe describes another model)."""
    if smoke:
        raise UserError(f"model.pretrained={path!s} cannot be shrunk by +scale=smoke: drop one of them")
    overridden = command_line_model_keys() if overridden is None else overridden
    ckpt = Checkpoint(path)
    table_len = values.get("max_seq_len") or None
    theirs = asdict(ckpt.model_config(table_len))
    for name in sorted(determined_fields()):
        if name in overridden or name not in values:
            continue
        if recipe != "default" and values[name] != theirs[name]:
            raise UserError(f"model.{name}={values[name]!r} in recipe {recipe} but {path}/config.json says "
                            f"{theirs[name]!r}: use the recipe of this model, or override "
                            f"model.{name}={theirs[name]} on the command line")
    chosen = {k: values[k] for k in overridden if k in values}
    keep = {k: values[k] for k in ("init_std", "aux_loss_coef", "bias_update_speed") if k in values}
    try:
        return ModelConfig(**(theirs | keep | chosen))
    except ValueError as error:
        raise UserError(str(error)) from None


def check_data_vocabulary(data, cfg: ModelConfig, path: PathLike) -> None:
    """The data's token ids fit the pretrained model's vocabulary (else the data was tokenized
    with another tokenizer than the folder's)."""
    fix = f"tokenize the data with the tokenizer of {path}"
    if data.source == "embedded" and cfg.vocab_size < 256:
        raise UserError(f"model.vocab_size={cfg.vocab_size} (from {path}/config.json) is smaller than the "
                        f"data's vocabulary (256, the embedded corpus's bytes): {fix}")
    if data.source == "tokens":
        from .data.datamodule import check_token_file

        for key in ("train_path", "val_path"):
            if data[key]:
                try:
                    check_token_file(data[key], data.dtype, data.seq_len, cfg.vocab_size, key=f"data.{key}")
                except UserError as error:
                    raise UserError(f"{error} (model.pretrained={path}: {fix})") from None


def _local_index(name: str, tensor: torch.Tensor) -> Optional[Index]:
    if not isinstance(tensor, DTensor):
        return tuple(slice(0, n) for n in tensor.shape)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    if 0 in shape:
        return None
    return tuple(slice(o, o + n) for o, n in zip(offset, shape))


def _local_of(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def load_pretrained(model: nn.Module, path: PathLike) -> Checkpoint:
    """Fill `model` (a project model, parallelized or not) with the weights of the Hugging Face
    folder `path`; return the opened checkpoint (its `bytes_read` counts what this rank read)."""
    ckpt = Checkpoint(path)
    cfg = model.config  # every tensor's shape is checked against config.json's on the way
    tensors = {state_dict_name(name): tensor for name, tensor in model.state_dict(keep_vars=True).items()}
    # a pipeline stage holds (and reads) its own blocks only
    load_into(ckpt, tensors, cfg, _local_index, _local_of, held_only=is_pipeline_stage(model))
    return ckpt


def load_pretrained_into(module: nn.Module, device: torch.device) -> Optional[Checkpoint]:
    """The strategy's hook, once the plan is applied and before data parallelism lays gradients
    out: allocate on `device` a model built on the meta device (by now only this rank's shards
    exist), then fill its protocol model from `module.pretrained` (if set): a CausalLMModule's
    `model`, or a protocol model itself (Fabric)."""
    path = getattr(module, "pretrained", None)
    on_meta = any(t.is_meta for t in module.parameters())
    if on_meta:
        if not path:
            from .errors import UserError

            raise UserError("the model was built on the meta device (init_module(empty_init=True)) but has "
                            "no pretrained folder to fill it: build a new model under init_module() "
                            "(empty_init=False), or load one with lightning_attn_parallel.fabric.pretrained_model(folder)")
        materialize(module, device)  # tied embeddings stay one tensor
    if not path:
        return None
    return load_pretrained(find_transformer(module), path)


__all__ = ["load_pretrained", "load_pretrained_into", "model_config_for"]
