"""Causal attention restricted to documents: a packed row of several documents, none attending
to another.

`document_ids` (B, S) labels each token with its document; documents are contiguous in a row, so
token i may attend to token j exactly when j <= i and both carry the same id (padding carries its
own id and only attends to padding, so no row is empty and nothing is NaN).

Two paths compute the same function:
- exact path (CPU, and any GPU case FlexAttention cannot take): SDPA with the boolean
  block-diagonal causal mask. It materialises a (B, 1, S, S) mask, fine at test sizes.
- GPU fast path: FlexAttention with a block mask built from `document_ids`, so fully masked
  tiles (other documents) are skipped rather than computed. The block mask is built once per
  batch and shared by every layer (they all see the same `document_ids` tensor).

To measure on H100/H200 (bench.py): FlexAttention here against a varlen flash kernel
(`torch.nn.attention.varlen` / flash_attn_varlen_func with cu_seqlens from `document_ids`), and
both against plain causal SDPA at equal tokens; keep the faster as the fast path.
"""
from __future__ import annotations

import importlib.util
import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F

_FLEX_FAILED = False
_compiled_flex: Any = None
_block_mask_cache: dict[str, Any] = {"ids": None, "shape": None, "mask": None}


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


def _flex_usable(q: torch.Tensor, v: torch.Tensor) -> bool:
    # Half precision only: fp32 tiles of FlexAttention's default blocks overflow an H200's shared
    # memory (seen at head dim 64), and fp32/fp64 runs are the exactness tests' business anyway.
    if _FLEX_FAILED or not q.is_cuda or q.dtype not in (torch.bfloat16, torch.float16):
        return False
    return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


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


def document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, document_ids: torch.Tensor,
                       scale: Optional[float] = None) -> torch.Tensor:
    """Document-masked causal attention of q (B, Hq, S, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv)."""
    global _FLEX_FAILED
    if document_ids.shape != (q.shape[0], q.shape[2]):
        raise ValueError(f"document_ids of shape {tuple(document_ids.shape)} do not match the batch "
                         f"and sequence of q {tuple(q.shape)}: expected ({q.shape[0]}, {q.shape[2]})")
    if _flex_usable(q, v):
        try:
            return flex_document_attention(q, k, v, document_ids, scale)
        except Exception as err:  # noqa: BLE001 - an unsupported shape or GPU: keep training, exactly
            _FLEX_FAILED = True
            warnings.warn(f"FlexAttention failed ({type(err).__name__}: {err}); document masks now use "
                          "SDPA with an explicit mask")
    return masked_document_attention(q, k, v, document_ids, scale)


__all__ = ["document_attention", "document_causal_mask", "masked_document_attention",
           "flex_document_attention"]
