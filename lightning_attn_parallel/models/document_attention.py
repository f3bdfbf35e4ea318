"""Causal attention restricted to documents: a packed row of several documents, none attending
to another.

`document_ids` (B, S) labels each token with its document; documents are contiguous in a row, so
token i may attend to token j exactly when j <= i and both carry the same id (padding carries its
own id and only attends to padding, so no row is empty and nothing is NaN).

Three paths compute the same function:
- exact path (CPU, fp32/fp64, and any GPU case the others cannot take): SDPA with the boolean
  block-diagonal causal mask. It materialises a (B, 1, S, S) mask, fine at test sizes.
- GPU, first choice: torch's varlen flash kernel, each document (segment) a sequence of its own,
  so no masked tile is computed. Needs equal q and v head widths.
- GPU, otherwise (MLA): FlexAttention with a block mask built from `document_ids`, which skips
  fully masked tiles. Segments and block mask are built once per batch and shared by every layer
  (they all see the same `document_ids` tensor).

benchmarks/documents_gpu.py measures the GPU paths against each other and against plain causal
SDPA at equal tokens (results in benchmarks/RESULTS.md).
"""
from __future__ import annotations

import importlib.util
import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F

# GPU fast paths, tried in this order. Measured on one H200 (benchmarks/documents_gpu.py,
# RESULTS.md): the varlen flash kernel ran the 1B model's step 1.15-1.22x faster than FlexAttention
# at 8k-32k tokens; FlexAttention remains for MLA (q and v head widths differ).
GPU_PATHS: tuple[str, ...] = ("varlen", "flex")
_FAILED: set[str] = set()
_compiled_flex: Any = None
_block_mask_cache: dict[str, Any] = {"ids": None, "shape": None, "mask": None}
_segments_cache: dict[str, Any] = {"ids": None, "shape": None, "segments": None}


def document_causal_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, S, S) boolean mask: True where query i may attend key j (same document, j <= i)."""
    same = document_ids.unsqueeze(-1) == document_ids.unsqueeze(-2)
    s = document_ids.shape[-1]
    causal = torch.ones(s, s, dtype=torch.bool, device=document_ids.device).tril()
    return (same & causal).unsqueeze(1)


def _repeat_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if k.shape[1] == q.shape[1]:
        return k, v
    rep = q.shape[1] // k.shape[1]
    return k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)


def masked_document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              document_ids: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    """The exact path: SDPA with the explicit document mask (what the CPU tests check)."""
    k, v = _repeat_kv(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=document_causal_mask(document_ids),
                                          scale=scale)


def _gpu_paths(q: torch.Tensor, v: torch.Tensor) -> list[str]:
    """The fast paths this call may take, in the order of GPU_PATHS. Half precision only: fp32
    tiles of FlexAttention's default blocks overflow an H200's shared memory (seen at head dim 64),
    and fp32/fp64 runs are the exactness tests' business. The flash varlen kernel needs equal q and
    v head widths (not MLA's 192 / 128)."""
    if not q.is_cuda or q.dtype not in (torch.bfloat16, torch.float16):
        return []
    usable = {"flex": importlib.util.find_spec("torch.nn.attention.flex_attention") is not None,
              "varlen": (importlib.util.find_spec("torch.nn.attention.varlen") is not None
                         and q.shape[-1] == v.shape[-1])}
    return [p for p in GPU_PATHS if usable.get(p) and p not in _FAILED]


def _document_block_mask(document_ids: torch.Tensor):
    """The FlexAttention block mask of this batch, built once and reused by every layer (cached on
    the identity of the `document_ids` tensor, which the model passes unchanged to each block)."""
    from torch.nn.attention.flex_attention import create_block_mask

    cache = _block_mask_cache
    if cache["ids"] is document_ids and cache["shape"] == tuple(document_ids.shape):
        return cache["mask"]

    def mask_mod(b, h, q_idx, kv_idx):
        return (document_ids[b, q_idx] == document_ids[b, kv_idx]) & (kv_idx <= q_idx)

    b, s = document_ids.shape
    mask = create_block_mask(mask_mod, B=b, H=None, Q_LEN=s, KV_LEN=s, device=document_ids.device)
    cache.update(ids=document_ids, shape=(b, s), mask=mask)
    return mask


def flex_document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            document_ids: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    """The GPU fast path: compiled FlexAttention (compiled once; recompiles only per new shape)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention)
    return _compiled_flex(q, k, v, block_mask=_document_block_mask(document_ids), scale=scale,
                          enable_gqa=k.shape[1] != q.shape[1])


def document_segments(document_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(cu_seqlens (N + 1,) int32, longest segment) of the flattened (B * S) tokens: a segment
    starts at every row start and wherever the document id changes (padding is a segment too).
    Reading the longest length syncs with the host once; callers cache it per batch."""
    b, s = document_ids.shape
    flat = document_ids.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts[::s] = True
    cu = torch.cat([torch.nonzero(starts).flatten(), flat.new_tensor([b * s])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def segment_loop_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, document_ids: torch.Tensor,
                           scale: Optional[float] = None) -> torch.Tensor:
    """Reference of the varlen path: plain causal SDPA on each segment of `document_segments`."""
    b, hq, s, _ = q.shape
    k, v = _repeat_kv(q, k, v)
    flat = [t.transpose(1, 2).reshape(b * s, t.shape[1], t.shape[3]) for t in (q, k, v)]
    cu, _ = document_segments(document_ids)
    outs = [F.scaled_dot_product_attention(*(t[a:e].transpose(0, 1) for t in flat), is_causal=True,
                                           scale=scale).transpose(0, 1)
            for a, e in zip(cu[:-1].tolist(), cu[1:].tolist())]
    return torch.cat(outs).view(b, s, hq, -1).transpose(1, 2)


def varlen_document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              document_ids: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    """GPU path through torch's varlen flash kernel: every segment is a sequence of its own, so no
    masked tile is ever computed. Causal is `is_causal=True` (torch 2.11) or `window_size=(-1, 0)`
    (later); GQA is native where `enable_gqa` exists."""
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    cache = _segments_cache
    if not (cache["ids"] is document_ids and cache["shape"] == tuple(document_ids.shape)):
        cache.update(ids=document_ids, shape=tuple(document_ids.shape), segments=document_segments(document_ids))
    cu, longest = cache["segments"]
    params = inspect.signature(varlen_attn).parameters
    kwargs: dict[str, Any] = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    if "enable_gqa" in params:
        kwargs["enable_gqa"] = k.shape[1] != q.shape[1]
    else:
        k, v = _repeat_kv(q, k, v)
    b, hq, s, _ = q.shape
    flat = [t.transpose(1, 2).reshape(b * s, t.shape[1], t.shape[3]) for t in (q, k, v)]
    out = varlen_attn(*flat, cu, cu, longest, longest, scale=scale, **kwargs)
    return out.view(b, s, hq, -1).transpose(1, 2)


def document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, document_ids: torch.Tensor,
                       scale: Optional[float] = None) -> torch.Tensor:
    """Document-masked causal attention of q (B, Hq, S, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv)."""
    if document_ids.shape != (q.shape[0], q.shape[2]):
        raise ValueError(f"document_ids of shape {tuple(document_ids.shape)} do not match the batch "
                         f"and sequence of q {tuple(q.shape)}: expected ({q.shape[0]}, {q.shape[2]})")
    for path in _gpu_paths(q, v):
        try:
            return _PATHS[path](q, k, v, document_ids, scale)
        except Exception as err:  # noqa: BLE001 - an unsupported shape or GPU: keep training, exactly
            _FAILED.add(path)
            warnings.warn(f"document attention: the {path} path failed ({type(err).__name__}: {err}); "
                          "falling back")
    return masked_document_attention(q, k, v, document_ids, scale)


_PATHS = {"flex": flex_document_attention, "varlen": varlen_document_attention}


__all__ = ["document_attention", "document_causal_mask", "masked_document_attention",
           "flex_document_attention", "varlen_document_attention", "segment_loop_attention",
           "document_segments"]
