"""Load a Hugging Face folder into a model that is already parallelized, each rank reading only
the slices it holds.

After the strategy has applied its plan, every tensor of the model is either plain (replicated),
a DTensor (FSDP2/HSDP shards, tensor-parallel shards, or both), or an expert-parallel block
(parallel/expert_state.py presents it as a DTensor view of the global [E, ...] stack). The global
slice a rank holds follows from the placements (`compute_local_shape_and_global_offset`), and
models/hf.py reads that slice out of the memory-mapped safetensors files (widened to whole heads
where q/k rows are reordered), so no rank ever reads or builds a whole tensor it only holds part of.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from .errors import UserError
from .models.config import ModelConfig
from .models.hf import Checkpoint, Index, PathLike, determined_fields, load_into
from .parallel.expert_state import clean_name, expert_shards, global_view


def check_config_matches(cfg: ModelConfig, ckpt: Checkpoint) -> None:
    """Error naming the first field of `cfg` that the folder's config.json decides otherwise."""
    theirs = ckpt.model_config(cfg.max_seq_len)
    for name in sorted(determined_fields()):
        ours_value, their_value = getattr(cfg, name), getattr(theirs, name)
        if ours_value != their_value:
            raise UserError(f"model.{name}={ours_value!r} but {ckpt.path}/config.json says "
                            f"{their_value!r}: drop model.{name} from the overrides (the model is "
                            "built from config.json)")


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
    cfg = model.config
    check_config_matches(cfg, ckpt)
    shards = expert_shards(model)
    tensors = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        name = clean_name(name)
        tensors[name] = global_view(tensor, shards[name]) if name in shards else tensor
    load_into(ckpt, tensors, cfg, _local_index, _local_of)
    return ckpt


def load_pretrained_into(module: nn.Module) -> Optional[Checkpoint]:
    """The strategy's hook: load `module.pretrained` (if set) into its protocol model `module.model`."""
    path = getattr(module, "pretrained", None)
    if not path:
        return None
    return load_pretrained(module.model, path)


__all__ = ["load_pretrained", "load_pretrained_into", "check_config_matches"]
