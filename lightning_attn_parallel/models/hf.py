"""Hugging Face checkpoint folders <-> the project's models (pure conversion, no collectives).

A folder is config.json plus model.safetensors, or sharded *.safetensors files with
model.safetensors.index.json. Llama (2, 3, 3.1+) and DeepSeek V2, V2-Lite and V3 are covered;
what a config asks for that the project cannot compute is an error naming the field, never
silently dropped.

Conversion is a table (`weight_specs`) saying, for every tensor of the project's model, which
Hugging Face tensor(s) hold it and how:
- "copy": same tensor under another name;
- "rows": rows permuted inside blocks (one block per head): transformers' Llama rotates
  "half" pairs (i, i + d/2) while the project rotates interleaved pairs (2i, 2i+1), so q and k
  rows are reordered per head (as transformers' convert_llama_weights_to_hf `permute`). DeepSeek
  V2, and V3 with rope_interleave=true, rotate interleaved pairs like the project: no reordering;
- "experts": routed experts stacked (E, D, F) / (E, F, D) from per-expert Linear weights or from
  transformers 5's fused `gate_up_proj` (E, 2F, D) / `down_proj` (E, D, F).
Any slice of a project tensor can be read (`read_converted`) without reading the whole HF tensor,
which is what parallel/load_pretrained.py uses to load only each rank's shard.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from ..errors import UserError
from .config import ModelConfig
from .materialize import materialize

PathLike = Union[str, os.PathLike]
Index = tuple[slice, ...]

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "generation_config.json",
                   "chat_template.jinja")


def _error(message: str) -> UserError:
    return UserError(message)


# ============================================================================ config.json
_ROPE_KEYS = {
    "default": {"rope_type", "type", "rope_theta"},
    "llama3": {"rope_type", "type", "rope_theta", "factor", "low_freq_factor", "high_freq_factor",
               "original_max_position_embeddings"},
    "yarn": {"rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings",
             "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate"},
}


def _rope_fields(hf: Mapping) -> dict:
    """ModelConfig's rope_* fields from config.json's rope_theta + rope_scaling (published
    configs) or rope_parameters (transformers 5)."""
    merged = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    theta = merged.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = merged.get("rope_type", merged.get("type", "default"))
    if kind not in _ROPE_KEYS:
        raise _error(f"config.json: rope_scaling.rope_type={kind!r} is not supported: the project "
                     "implements 'default', 'llama3' and 'yarn'")
    for key in merged:
        if key not in _ROPE_KEYS[kind]:
            if key == "partial_rotary_factor" and merged[key] in (None, 1, 1.0):
                continue
            raise _error(f"config.json: rope_scaling.{key}={merged[key]!r} is not supported for "
                         f"rope_type={kind!r}: the project cannot honour it")
    out: dict = dict(rope_theta=float(theta))
    if kind == "default":
        return out
    original = merged.get("original_max_position_embeddings") or hf["max_position_embeddings"]
    factor = merged.get("factor")
    if factor is None:
        factor = hf["max_position_embeddings"] / original
    out.update(rope_scaling=kind, rope_factor=float(factor), rope_original_max_seq_len=int(original))
    if kind == "llama3":
        out.update(rope_low_freq_factor=float(merged["low_freq_factor"]),
                   rope_high_freq_factor=float(merged["high_freq_factor"]))
    else:  # the reference treats a missing or zero beta/mscale as unset
        out.update(rope_beta_fast=float(merged.get("beta_fast") or 32),
                   rope_beta_slow=float(merged.get("beta_slow") or 1),
                   rope_mscale=float(merged.get("mscale") or 0),
                   rope_mscale_all_dim=float(merged.get("mscale_all_dim") or 0),
                   rope_attention_factor=merged.get("attention_factor"),
                   rope_truncate=bool(merged.get("truncate", True)))
    return out


def _require(hf: Mapping, key: str, allowed: Callable[[object], bool], why: str) -> None:
    if key in hf and not allowed(hf[key]):
        raise _error(f"config.json: {key}={hf[key]!r} is not supported: {why}")


def model_config_from_hf(hf: Mapping, max_seq_len: Optional[int] = None) -> ModelConfig:
    """The ModelConfig of a Hugging Face config.json (as a dict); an error names any field the
    project cannot honour. `max_seq_len` (default max_position_embeddings) only sizes RoPE tables."""
    model_type = hf.get("model_type")
    if model_type not in ("llama", "deepseek_v2", "deepseek_v3"):
        raise _error(f"config.json: model_type={model_type!r} is not supported: the project converts "
                     "'llama', 'deepseek_v2' and 'deepseek_v3' checkpoints")
    _require(hf, "hidden_act", lambda v: v == "silu", "the project's MLPs use SiLU (SwiGLU)")
    _require(hf, "attention_bias", lambda v: not v, "the project's attention has no biases")
    _require(hf, "mlp_bias", lambda v: not v, "the project's MLPs have no biases")
    _require(hf, "quantization_config", lambda v: False,
             "quantized weights must be dequantized to bf16/fp32 first")
    heads = hf["num_attention_heads"]
    base = dict(vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                n_heads=heads, ffn_dim=hf["intermediate_size"],
                max_seq_len=max_seq_len or hf["max_position_embeddings"],
                norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)), **_rope_fields(hf))
    if model_type == "llama":
        _require(hf, "head_dim", lambda v: v in (None, hf["hidden_size"] // heads),
                 "the project's Llama uses head_dim = hidden_size / num_attention_heads")
        return ModelConfig(family="llama", n_kv_heads=hf.get("num_key_value_heads") or heads, **base)
    _require(hf, "num_key_value_heads", lambda v: v in (None, heads),
             "MLA expands its latent to one key per attention head")
    _require(hf, "moe_layer_freq", lambda v: v == 1, "transformers makes every layer after "
             "first_k_dense_replace an MoE layer")
    if model_type == "deepseek_v2":
        _require(hf, "scoring_func", lambda v: v == "softmax", "DeepSeek-V2 routes by softmax")
        _require(hf, "topk_method", lambda v: v in ("greedy", "group_limited_greedy"),
                 "DeepSeek-V2 routing is 'greedy' or 'group_limited_greedy'")
        _require(hf, "norm_topk_prob", lambda v: not v,
                 "transformers' DeepSeek-V2 never normalises the top-k weights")
        grouped = hf.get("topk_method", "greedy") == "group_limited_greedy"
        routing = dict(score_func="softmax", norm_topk_prob=False,
                       n_expert_groups=hf.get("n_group") or 1 if grouped else 1,
                       topk_groups=hf.get("topk_group") or 1 if grouped else 1)
    else:
        _require(hf, "scoring_func", lambda v: v == "sigmoid", "DeepSeek-V3 routes by sigmoid")
        _require(hf, "topk_method", lambda v: v == "noaux_tc", "DeepSeek-V3 routing is 'noaux_tc'")
        routing = dict(score_func="sigmoid", norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
                       n_expert_groups=hf.get("n_group") or 1, topk_groups=hf.get("topk_group") or 1)
    n_layers = hf["num_hidden_layers"]
    first_dense = hf.get("first_k_dense_replace") or 0
    moe = dict(n_routed_experts=hf["n_routed_experts"], n_shared_experts=hf.get("n_shared_experts") or 0,
               moe_top_k=hf["num_experts_per_tok"], moe_ffn_dim=hf["moe_intermediate_size"],
               first_k_dense_replace=first_dense, routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
               **routing) if first_dense < n_layers else {}
    return ModelConfig(family="deepseek", attention="mla", q_lora_rank=hf.get("q_lora_rank"),
                       kv_lora_rank=hf["kv_lora_rank"], qk_nope_head_dim=hf["qk_nope_head_dim"],
                       qk_rope_head_dim=hf["qk_rope_head_dim"], v_head_dim=hf["v_head_dim"],
                       **moe, **base)


def hf_model_type(cfg: ModelConfig) -> str:
    """Which transformers class computes this model; an error when none does."""
    if cfg.attention == "gqa":
        if cfg.is_moe:
            raise _error("model: DeepSeekMoE with grouped-query attention (attention=gqa, "
                         "n_routed_experts > 0) has no transformers class to export to")
        return "llama"
    if cfg.is_moe and cfg.moe_layer_freq != 1:
        raise _error(f"model.moe_layer_freq={cfg.moe_layer_freq} cannot be exported: transformers "
                     "makes every layer after first_k_dense_replace an MoE layer")
    if cfg.is_moe and cfg.score_func == "sigmoid":
        return "deepseek_v3"
    if cfg.is_moe and cfg.norm_topk_prob:
        raise _error("model.norm_topk_prob=true with softmax routing cannot be exported: "
                     "transformers' DeepSeek-V2 never normalises the top-k weights")
    return "deepseek_v2"


def _rope_json(cfg: ModelConfig) -> Optional[dict]:
    if cfg.rope_scaling == "none":
        return None
    out: dict = dict(rope_type=cfg.rope_scaling, type=cfg.rope_scaling, factor=cfg.rope_factor,
                     original_max_position_embeddings=cfg.rope_original_max_seq_len)
    if cfg.rope_scaling == "llama3":
        out.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor)
    else:
        out.update(beta_fast=cfg.rope_beta_fast, beta_slow=cfg.rope_beta_slow, mscale=cfg.rope_mscale,
                   mscale_all_dim=cfg.rope_mscale_all_dim, truncate=cfg.rope_truncate)
        if cfg.rope_attention_factor is not None:
            out["attention_factor"] = cfg.rope_attention_factor
    return out


def hf_config(cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16) -> dict:
    """config.json for `cfg`, in the published style (rope_theta + rope_scaling)."""
    model_type = hf_model_type(cfg)
    out: dict = dict(model_type=model_type, vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
                     intermediate_size=cfg.ffn_dim, num_hidden_layers=cfg.n_layers,
                     num_attention_heads=cfg.n_heads, max_position_embeddings=cfg.max_seq_len,
                     rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, rope_scaling=_rope_json(cfg),
                     tie_word_embeddings=cfg.tie_embeddings, hidden_act="silu", attention_bias=False,
                     torch_dtype=str(dtype).removeprefix("torch."), initializer_range=cfg.init_std)
    if cfg.rope_scaling != "none":
        out["max_position_embeddings"] = max(cfg.max_seq_len, int(cfg.rope_original_max_seq_len * cfg.rope_factor))
    if model_type == "llama":
        out.update(architectures=["LlamaForCausalLM"], num_key_value_heads=cfg.n_kv_heads, mlp_bias=False)
        return out
    arch = "DeepseekV3ForCausalLM" if model_type == "deepseek_v3" else "DeepseekV2ForCausalLM"
    out.update(architectures=[arch], num_key_value_heads=cfg.n_heads, q_lora_rank=cfg.q_lora_rank,
               kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim,
               qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim)
    if cfg.is_moe:
        out.update(n_routed_experts=cfg.n_routed_experts, n_shared_experts=cfg.n_shared_experts,
                   num_experts_per_tok=cfg.moe_top_k, moe_intermediate_size=cfg.moe_ffn_dim,
                   first_k_dense_replace=cfg.first_k_dense_replace, moe_layer_freq=1,
                   routed_scaling_factor=cfg.routed_scaling_factor, n_group=cfg.n_expert_groups,
                   topk_group=cfg.topk_groups, norm_topk_prob=cfg.norm_topk_prob,
                   scoring_func=cfg.score_func)
    else:  # every layer dense
        out.update(first_k_dense_replace=cfg.n_layers, n_routed_experts=1, n_shared_experts=1,
                   num_experts_per_tok=1, moe_intermediate_size=1, n_group=1, topk_group=1)
    if model_type == "deepseek_v3":
        out.update(topk_method="noaux_tc", rope_interleave=True, num_nextn_predict_layers=0)
    else:
        out.update(topk_method="group_limited_greedy" if cfg.topk_groups < cfg.n_expert_groups else "greedy")
    return out


# ============================================================================ tensor layout
@dataclass(frozen=True)
class Spec:
    """Where one project tensor lives in a Hugging Face checkpoint.

    kind "copy": `hf` is the tensor's name. "rows": rows reordered inside blocks of `block` rows,
    rows [rope_start, rope_end) of each block between half and interleaved pairs. "experts":
    `hf` is a per-expert template with "{e}" (Linear weight, transposed) or, when `part` >= 0, a
    fused (E, ...) tensor: part 0/1 the gate/up half of gate_up_proj, part 2 down_proj.
    """

    hf: str
    kind: str = "copy"
    block: int = 0
    rope_start: int = 0
    rope_end: int = 0
    part: int = -1


def _half_to_interleaved(rows: torch.Tensor) -> torch.Tensor:
    r = rows.shape[0]
    return rows.reshape(2, r // 2, *rows.shape[1:]).transpose(0, 1).reshape(rows.shape)


def _interleaved_to_half(rows: torch.Tensor) -> torch.Tensor:
    r = rows.shape[0]
    return rows.reshape(r // 2, 2, *rows.shape[1:]).transpose(0, 1).reshape(rows.shape)


def _permute_blocks(t: torch.Tensor, spec: Spec, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    out = t.clone()
    for start in range(0, t.shape[0], spec.block):
        a, b = start + spec.rope_start, start + spec.rope_end
        out[a:b] = fn(t[a:b])
    return out


def weight_specs(cfg: ModelConfig, fused_experts: bool = False, interleaved: bool = True) -> dict[str, Spec]:
    """Project tensor name -> Spec, for every parameter and persistent buffer of `cfg`'s model.

    `fused_experts`: the checkpoint stores routed experts as transformers 5's fused tensors.
    `interleaved`: DeepSeek's rotary rows are already interleaved (V2; V3 rope_interleave=true).
    """
    specs: dict[str, Spec] = {"tok_embeddings.weight": Spec("model.embed_tokens.weight"),
                              "norm.weight": Spec("model.norm.weight")}
    specs["output.weight"] = Spec("model.embed_tokens.weight" if cfg.tie_embeddings else "lm_head.weight")
    for i in range(cfg.n_layers):
        p, h = f"blocks.{i}.", f"model.layers.{i}."
        specs[p + "attention_norm.weight"] = Spec(h + "input_layernorm.weight")
        specs[p + "ffn_norm.weight"] = Spec(h + "post_attention_layernorm.weight")
        a = h + "self_attn."
        if cfg.attention == "gqa":
            hd = cfg.head_dim
            specs[p + "attention.wq.weight"] = Spec(a + "q_proj.weight", "rows", hd, 0, hd)
            specs[p + "attention.wk.weight"] = Spec(a + "k_proj.weight", "rows", hd, 0, hd)
            specs[p + "attention.wv.weight"] = Spec(a + "v_proj.weight")
            specs[p + "attention.wo.weight"] = Spec(a + "o_proj.weight")
        else:
            qk, nope, rope = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
            q_spec = (lambda name: Spec(name) if interleaved else Spec(name, "rows", qk, nope, qk))
            if cfg.q_lora_rank is None:
                specs[p + "attention.wq.weight"] = q_spec(a + "q_proj.weight")
            else:
                specs[p + "attention.wq_a.weight"] = Spec(a + "q_a_proj.weight")
                specs[p + "attention.q_norm.weight"] = Spec(a + "q_a_layernorm.weight")
                specs[p + "attention.wq_b.weight"] = q_spec(a + "q_b_proj.weight")
            kv_rows = cfg.kv_lora_rank + rope
            specs[p + "attention.wkv_a.weight"] = (
                Spec(a + "kv_a_proj_with_mqa.weight") if interleaved
                else Spec(a + "kv_a_proj_with_mqa.weight", "rows", kv_rows, cfg.kv_lora_rank, kv_rows))
            specs[p + "attention.kv_norm.weight"] = Spec(a + "kv_a_layernorm.weight")
            specs[p + "attention.wkv_b.weight"] = Spec(a + "kv_b_proj.weight")
            specs[p + "attention.wo.weight"] = Spec(a + "o_proj.weight")
        m = h + "mlp."
        if not cfg.is_moe_layer(i):
            for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                specs[p + f"ffn.{ours}.weight"] = Spec(m + f"{theirs}.weight")
            continue
        specs[p + "ffn.router.gate.weight"] = Spec(m + "gate.weight")
        if cfg.score_func == "sigmoid":
            specs[p + "ffn.router.expert_bias"] = Spec(m + "gate.e_score_correction_bias")
        for part, (ours, theirs) in enumerate((("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj"))):
            if fused_experts:
                fused = m + ("experts.down_proj" if part == 2 else "experts.gate_up_proj")
                specs[p + f"ffn.experts.{ours}"] = Spec(fused, "experts", part=part)
            else:
                specs[p + f"ffn.experts.{ours}"] = Spec(m + "experts.{e}." + theirs + ".weight", "experts")
            if cfg.n_shared_experts > 0:
                specs[p + f"ffn.shared_experts.{ours}.weight"] = Spec(m + f"shared_experts.{theirs}.weight")
    return specs


def hf_names(spec: Spec, n_experts: int) -> list[str]:
    """Every Hugging Face tensor name a spec reads."""
    if spec.kind == "experts" and spec.part < 0:
        return [spec.hf.format(e=e) for e in range(n_experts)]
    return [spec.hf]


Reader = Callable[[str, Index], torch.Tensor]


def _full_index(shape: Sequence[int]) -> Index:
    return tuple(slice(0, n) for n in shape)


def read_converted(read: Reader, spec: Spec, index: Index, block_rows: Optional[int] = None) -> torch.Tensor:
    """The project tensor's `index` (one slice per dim, steps of 1) read through `read(name, index)`.

    Only the requested slice is read, widened to whole blocks (heads) where rows are reordered.
    """
    if spec.kind == "copy":
        return read(spec.hf, index)
    if spec.kind == "rows":
        rows = index[0]
        lo = rows.start // spec.block * spec.block
        hi = -(-rows.stop // spec.block) * spec.block
        whole = read(spec.hf, (slice(lo, hi),) + tuple(index[1:]))
        return _permute_blocks(whole, spec, _half_to_interleaved)[rows.start - lo: rows.stop - lo]
    experts, first, second = index  # project layout: (E, D, F) for w1/w3, (E, F, D) for w2
    if spec.part < 0:  # per-expert Linear weights (out, in): transpose
        blocks = [read(spec.hf.format(e=e), (second, first)).transpose(0, 1)
                  for e in range(experts.start, experts.stop)]
        return torch.stack(blocks) if blocks else torch.empty(0, first.stop - first.start, second.stop - second.start)
    if spec.part == 2:  # down_proj (E, D, F) -> (E, F, D)
        return read(spec.hf, (experts, second, first)).transpose(1, 2)
    width = block_rows  # F, the expert width: gate rows [0, F), up rows [F, 2F)
    offset = spec.part * width
    rows = slice(second.start + offset, second.stop + offset)
    return read(spec.hf, (experts, rows, first)).transpose(1, 2)


def to_hf(spec: Spec, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """The Hugging Face tensor(s) of one whole project tensor (per-expert layout for experts)."""
    if spec.kind == "copy":
        yield spec.hf, tensor
    elif spec.kind == "rows":
        yield spec.hf, _permute_blocks(tensor, spec, _interleaved_to_half)
    else:
        for e, block in enumerate(tensor.unbind(0)):
            yield spec.hf.format(e=e), block.transpose(0, 1)


# ============================================================================ folders
def _shard_files(folder: Path) -> dict[str, str]:
    """HF tensor name -> file name, from the index (sharded) or the single file."""
    index = folder / INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        missing = sorted({f for f in weight_map.values() if not (folder / f).exists()})
        if missing:
            raise _error(f"{folder}: shard {missing[0]} named by {INDEX_FILE} is missing "
                         f"({len(missing)} of {len(set(weight_map.values()))} shards absent): "
                         "download the whole folder again")
        return dict(weight_map)
    single = folder / SINGLE_FILE
    if not single.exists():
        raise _error(f"{folder}: neither {SINGLE_FILE} nor {INDEX_FILE} is there: give a Hugging "
                     "Face model folder holding safetensors weights")
    from safetensors import safe_open

    with safe_open(single, framework="pt") as f:
        return {name: SINGLE_FILE for name in f.keys()}


class Checkpoint:
    """A Hugging Face folder opened for reading slices: files are memory-mapped by safetensors,
    and `read` copies out only the requested slice. `bytes_read` counts what was copied."""

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        config = self.path / CONFIG_FILE
        if not config.exists():
            raise _error(f"{self.path}: no {CONFIG_FILE}: give a Hugging Face model folder")
        self.hf_config = json.loads(config.read_text())
        self.files = _shard_files(self.path)
        self._handles: dict[str, object] = {}
        self.bytes_read = 0

    def _handle(self, name: str):
        file = self.files.get(name)
        if file is None:
            raise _error(f"{self.path}: tensor {name} is missing from the checkpoint")
        if file not in self._handles:
            from safetensors import safe_open

            self._handles[file] = safe_open(self.path / file, framework="pt")
        return self._handles[file]

    def shape(self, name: str) -> list[int]:
        return list(self._handle(name).get_slice(name).get_shape())

    def read(self, name: str, index: Index) -> torch.Tensor:
        tensor = self._handle(name).get_slice(name)[index]
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor

    def model_config(self, max_seq_len: Optional[int] = None) -> ModelConfig:
        return model_config_from_hf(self.hf_config, max_seq_len)

    def specs(self, cfg: ModelConfig) -> dict[str, Spec]:
        """Specs for this folder's layout (fused or per-expert experts, rotary layout), checked
        against the tensors present: a missing or mis-shaped tensor is an error naming it."""
        fused = any(name.endswith("mlp.experts.gate_up_proj") for name in self.files)
        interleaved = cfg.attention == "mla" and (
            self.hf_config.get("model_type") == "deepseek_v2" or self.hf_config.get("rope_interleave", True))
        specs = weight_specs(cfg, fused_experts=fused, interleaved=interleaved)
        used = {n for spec in specs.values() for n in hf_names(spec, cfg.n_routed_experts)}
        unused = [n for n in self.files if n not in used]
        extra = [n for n in unused if not self._skippable(n, cfg)]
        if any(re.match(r"model\.layers\.\d+\.", n) for n in unused) and not extra:
            warnings.warn(f"{self.path}: DeepSeek-V3's multi-token-prediction layers (model.layers."
                          f"{cfg.n_layers}+) are not part of the project's model: skipped", stacklevel=2)
        if extra:
            raise _error(f"{self.path}: tensor {extra[0]} has no place in the model config.json "
                         f"describes ({len(extra)} such tensors): config.json and the weights disagree")
        return specs

    @staticmethod
    def _skippable(name: str, cfg: ModelConfig) -> bool:
        if name.endswith("rotary_emb.inv_freq"):
            return True
        match = re.match(r"model\.layers\.(\d+)\.", name)  # DeepSeek-V3 multi-token prediction
        return bool(match) and int(match.group(1)) >= cfg.n_layers and cfg.family == "deepseek"

    def check_shape(self, spec: Spec, expected: Sequence[int], cfg: ModelConfig) -> None:
        """Error unless the HF tensor(s) of `spec` have the shape a project tensor of `expected`
        shape needs."""
        expected = list(expected)
        if spec.kind == "experts":
            e, first, second = expected
            if spec.part < 0:
                names, want = hf_names(spec, e), [second, first]
            else:
                names = [spec.hf]
                want = [e, second, first] if spec.part == 2 else [e, 2 * second, first]
        else:
            names, want = [spec.hf], expected
        for name in names:
            got = self.shape(name)
            if got != want:
                raise _error(f"{self.path}: tensor {name} has shape {tuple(got)} but config.json "
                             f"implies {tuple(want)}: config.json and the weights disagree")

    def read_into(self, spec: Spec, index: Index, cfg: ModelConfig) -> torch.Tensor:
        return read_converted(self.read, spec, index, block_rows=cfg.moe_ffn_dim)


@contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def from_pretrained(path: PathLike, dtype: torch.dtype = torch.float32,
                    max_seq_len: Optional[int] = None) -> nn.Module:
    """The project's model holding the weights of the Hugging Face folder `path`.

    `dtype`: the parameters' dtype (RoPE tables are built in it too). `max_seq_len`: the RoPE
    tables' length (default: config.json's max_position_embeddings; it never changes the function).
    """
    from . import build_model

    ckpt = Checkpoint(path)
    cfg = ckpt.model_config(max_seq_len)
    with _default_dtype(dtype), torch.device("meta"):
        model = build_model(cfg)
    with _default_dtype(dtype):  # RoPE tables are built in `dtype`
        materialize(model, "cpu")
    load_into(ckpt, model.state_dict(keep_vars=True), cfg)
    return model


def load_into(ckpt: Checkpoint, tensors: Mapping[str, torch.Tensor], cfg: ModelConfig,
              local_index: Callable[[str, torch.Tensor], Optional[Index]] = lambda n, t: _full_index(t.shape),
              local_of: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
              held_only: bool = False) -> None:
    """Copy every tensor of a model (`tensors`: state-dict name -> tensor with its global shape)
    from `ckpt`, reading only `local_index(name, tensor)` of each (None: this process holds none
    of it) into `local_of(tensor)`, its local storage (a DTensor's shard; plain tensors: itself).
    `held_only`: `tensors` are a pipeline stage's, the folder's other tensors are not read."""
    specs = ckpt.specs(cfg)
    if held_only:
        specs = {name: spec for name, spec in specs.items() if name in tensors}
    # V2 (softmax) routing has no selection bias: the project's stays zero.
    unknown = sorted(n for n in set(tensors) - set(specs) if not n.endswith("router.expert_bias"))
    if unknown:
        raise _error(f"model tensor {unknown[0]} has no Hugging Face counterpart")
    done: set[int] = set()
    with torch.no_grad():
        for name, spec in specs.items():
            tensor = tensors[name]
            ckpt.check_shape(spec, tensor.shape, cfg)
            local = local_of(tensor)
            if id(tensor) in done:  # tied embeddings: loaded once
                continue
            done.add(id(tensor))
            index = local_index(name, tensor)
            if index is None or local.numel() == 0:
                continue
            local.copy_(ckpt.read_into(spec, index, cfg).to(local.dtype))


# ---------------------------------------------------------------------------- writing
def parse_size(size: Union[int, str]) -> int:
    """Bytes of "5GB" (10^9), "500MiB" (2^20) or an int."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B?\s*", size.upper())
    if not match:
        raise _error(f"max_shard_size={size!r} is not a size: write e.g. 5GB or 500MiB")
    number, unit, binary = match.groups()
    scale = (1024 if binary else 1000) ** "_KMGT".index(unit or "_")
    return int(float(number) * scale)


def hf_tensors(cfg: ModelConfig, state: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) for a full state dict of the project's model (per-expert layout)."""
    specs = weight_specs(cfg)
    missing = sorted(set(specs) - set(state))
    if missing:
        raise _error(f"state dict lacks {missing[0]}: it is not a whole {cfg.family} model")
    if cfg.is_moe and cfg.score_func == "softmax":
        for name in state:
            if name.endswith("router.expert_bias") and bool(state[name].any()):
                raise _error(f"{name} is nonzero but softmax (DeepSeek-V2) routing has no selection "
                             "bias in transformers: export with score_func=sigmoid or zero the bias")
    check_tied_state(cfg, state)
    emitted: set[str] = set()
    for name, spec in specs.items():
        for hf_name, tensor in to_hf(spec, state[name]):
            if hf_name not in emitted:
                emitted.add(hf_name)
                yield hf_name, tensor


def check_tied_state(cfg: ModelConfig, state: Mapping[str, torch.Tensor]) -> None:
    """A tied model is written as one tensor (transformers' `tie_word_embeddings`), so a state whose
    head and embedding differ (saved while they trained apart) would lose its head: refused."""
    head, embedding = state.get("output.weight"), state.get("tok_embeddings.weight")
    if not cfg.tie_embeddings or head is None or embedding is None or head is embedding:
        return
    difference = (head.detach().float() - embedding.detach().float()).abs().max().item()
    if difference > 0:
        raise _error(f"the model says tie_embeddings=True but its output.weight differs from "
                     f"tok_embeddings.weight (max abs {difference:.3g}; saved while they trained apart): "
                     "export it untied (--untie-embeddings writes both, tie_word_embeddings=false)")


def save_state_dict(cfg: ModelConfig, state: Mapping[str, torch.Tensor], out: PathLike,
                    dtype: torch.dtype = torch.bfloat16, max_shard_size: Union[int, str] = "5GB",
                    tokenizer_from: Optional[PathLike] = None) -> None:
    """Write `state` (a full state dict of `cfg`'s model) as a Hugging Face folder at `out`."""
    from safetensors.torch import save_file

    out = Path(out)
    limit = parse_size(max_shard_size)
    config = hf_config(cfg, dtype)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    total = 0
    for name, tensor in hf_tensors(cfg, state):
        tensor = tensor.detach().to("cpu", dtype if tensor.is_floating_point() else tensor.dtype).contiguous()
        if name.endswith("e_score_correction_bias"):
            tensor = tensor.float()  # transformers keeps the selection bias in fp32
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.clone()  # clone: tied or viewed tensors must not share storage
        size += nbytes
        total += nbytes
    for stale in list(out.glob("model*.safetensors")) + [out / INDEX_FILE]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        save_file(shards[0], out / SINGLE_FILE, metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, out / file, metadata={"format": "pt"})
            weight_map.update({name: file for name in shard})
        (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total},
                                                  "weight_map": weight_map}, indent=2))
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    if tokenizer_from is not None:
        copy_tokenizer(tokenizer_from, out)


def save_pretrained(model: nn.Module, out: PathLike, dtype: torch.dtype = torch.bfloat16,
                    max_shard_size: Union[int, str] = "5GB", tokenizer_from: Optional[PathLike] = None) -> None:
    """Write a whole (unparallelized) project model as a folder that
    `transformers.AutoModelForCausalLM.from_pretrained(out)` loads with the same logits."""
    save_state_dict(model.config, model.state_dict(), out, dtype, max_shard_size, tokenizer_from)


def copy_tokenizer(source: PathLike, out: PathLike) -> list[str]:
    """Copy the tokenizer (and generation config) files of a Hugging Face folder; their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(source) / name).exists():
            shutil.copy2(Path(source) / name, Path(out) / name)
            copied.append(name)
    return copied


def determined_fields() -> set[str]:
    """ModelConfig fields that config.json decides (the rest are training choices)."""
    return {f.name for f in fields(ModelConfig)} - {
        "init_std", "aux_loss_coef", "bias_update_speed", "max_seq_len"}


__all__ = ["Checkpoint", "Spec", "from_pretrained", "save_pretrained", "save_state_dict",
           "model_config_from_hf", "hf_config", "weight_specs", "read_converted", "hf_tensors",
           "copy_tokenizer", "parse_size", "determined_fields", "load_into", "check_tied_state"]
