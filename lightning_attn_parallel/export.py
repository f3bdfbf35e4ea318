"""Export a training checkpoint as a Hugging Face folder (or a consolidated file).

    python -m lightning_attn_parallel.export CKPT OUT --format hf [--dtype bf16|fp32] [--max-shard-size 5GB]
        [--untie-embeddings]

CKPT is what a run saved: a single .ckpt file or a sharded checkpoint folder (checkpoint.py),
under any plan. Sharded folders hold every tensor with its global shape, experts included, so
the export is the same whatever the plan was. A folder is read one tensor at a time
(DCP loads just the requested key), so the export holds one tensor plus one output shard in
memory, never the whole model. When the run started from a Hugging Face folder
(`model.pretrained`), its tokenizer files are copied next to the weights.
"""
from __future__ import annotations

import argparse
import warnings
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch

from .errors import UserError, run_or_exit
from .models.config import ModelConfig
from .models.hf import PathLike, save_state_dict

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
FORMATS = ("hf", "consolidated")


def _model_key(key: str) -> Optional[str]:
    """A checkpoint key as the protocol model names it (None: not a model tensor). Lightning
    prefixes the LightningModule's attribute ("model."), DCP folders the state's ("model.")."""
    return key[len("model."):] if key.startswith("model.") else None


class _FolderState(Mapping):
    """The model tensors of a sharded checkpoint folder, read one key at a time on access."""

    def __init__(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp

        self.path = path
        metadata = dcp.FileSystemReader(str(path)).read_metadata()
        self.meta = {}
        for key, item in metadata.state_dict_metadata.items():
            outer = _model_key(key)  # the folder's "model" entry
            name = _model_key(outer) if outer is not None else None  # LightningModule.model
            if name is not None and hasattr(item, "size"):
                self.meta[name] = (key, item)

    def __getitem__(self, name: str) -> torch.Tensor:
        import torch.distributed.checkpoint as dcp

        key, item = self.meta[name]
        tensor = torch.empty(item.size, dtype=item.properties.dtype)
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load({key: tensor}, checkpoint_id=str(self.path), no_dist=True)
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self.meta)

    def __len__(self) -> int:
        return len(self.meta)


def read_training_checkpoint(path: PathLike) -> tuple[ModelConfig, Mapping[str, torch.Tensor], dict]:
    """(model config, model tensors by name, hyper-parameters) of a .ckpt file or folder."""
    from .checkpoint import EXTRA_FILE, read_checkpoint_file, read_extra

    path = Path(path)
    if path.is_dir():
        if not (path / EXTRA_FILE).exists():
            raise UserError(f"{path} is not a checkpoint folder of this package (no {EXTRA_FILE}): "
                            "give a folder that trainer.save_checkpoint wrote, or a .ckpt file")
        extra = read_extra(path)
        state: Mapping[str, torch.Tensor] = _FolderState(path)
    elif path.is_file():
        extra = read_checkpoint_file(path)
        state = {name: v for k, v in extra.pop("state_dict", {}).items() if (name := _model_key(k))}
    else:
        raise UserError(f"checkpoint {path} does not exist: give a .ckpt file or a checkpoint folder")
    hparams = dict(extra.get("hyper_parameters") or {})
    if "model" not in hparams:
        raise UserError(f"{path} has no model hyper-parameters: it was not saved from CausalLMModule")
    return ModelConfig(**hparams["model"]), state, hparams


def export(ckpt: PathLike, out: PathLike, fmt: str = "hf", dtype: Union[str, torch.dtype] = "bf16",
           max_shard_size: Union[int, str] = "5GB", untie_embeddings: bool = False) -> Path:
    """Write `ckpt` (a .ckpt file or a checkpoint folder) to `out` in `fmt`; return `out`.

    `untie_embeddings`: write the LM head as its own tensor even where the model ties it to the
    embedding (a checkpoint whose tied tensors trained apart is refused otherwise)."""
    if fmt not in FORMATS:
        raise UserError(f"--format={fmt!r} is unknown: use one of {', '.join(FORMATS)}")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise UserError(f"--dtype={dtype!r} is unknown: use bf16 or fp32")
        dtype = DTYPES[dtype]
    cfg, state, hparams = read_training_checkpoint(ckpt)
    if untie_embeddings:
        cfg = replace(cfg, tie_embeddings=False)
    out = Path(out)
    if fmt == "consolidated":
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}, out)
        return out
    save_state_dict(cfg, state, out, dtype=dtype, max_shard_size=max_shard_size,
                    tokenizer_from=hparams.get("pretrained"))
    return out


def check_export_request(fmt: str, dtype: str, cfg: ModelConfig) -> None:
    """Before a run trains: the end-of-run export it asks for (export_format, export_dtype) can
    be written for this model."""
    if fmt not in FORMATS:
        raise UserError(f"export_format={fmt!r} is unknown: use one of {', '.join(FORMATS)}")
    if fmt == "hf":
        if dtype not in DTYPES:
            raise UserError(f"export_dtype={dtype!r} is unknown: use bf16 or fp32")
        from .models.hf import hf_model_type

        hf_model_type(cfg)


def export_model(model: torch.nn.Module, out: PathLike, fmt: str = "hf", dtype: Any = "fp32",
                 max_shard_size: Union[int, str] = "5GB", tokenizer_from: Optional[PathLike] = None) -> None:
    """End-of-run export of a (possibly parallelized) model (collective: every rank calls it).
    Shards (experts included) are gathered to rank 0 one tensor at a time, as
    export_consolidated does."""
    import torch.distributed as dist

    from .checkpoint import export_consolidated

    if fmt == "consolidated":
        export_consolidated(out, model)
        return
    check_export_request(fmt, dtype, model.config)
    from .parallel.state_dict import model_state

    state = model_state(model, full=True)
    if not dist.is_initialized() or dist.get_rank() == 0:
        save_state_dict(model.config, state, out, dtype=DTYPES.get(dtype, dtype),
                        max_shard_size=max_shard_size, tokenizer_from=tokenizer_from)
    if dist.is_initialized():
        dist.barrier()


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lightning_attn_parallel.export", description=__doc__.split("\n")[0])
    parser.add_argument("ckpt", help="a .ckpt file or a sharded checkpoint folder")
    parser.add_argument("out", help="the folder (hf) or file (consolidated) to write")
    parser.add_argument("--format", default="hf", choices=FORMATS)
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--max-shard-size", default="5GB")
    parser.add_argument("--untie-embeddings", action="store_true",
                        help="write the LM head and the embedding as two tensors (tie_word_embeddings=false)")
    args = parser.parse_args(argv)
    out = export(args.ckpt, args.out, args.format, args.dtype, args.max_shard_size, args.untie_embeddings)
    print(f"wrote {out}")


if __name__ == "__main__":
    run_or_exit(main)
