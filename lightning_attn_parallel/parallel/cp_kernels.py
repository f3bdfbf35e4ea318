"""Exact causal attention for a sequence split across the ranks of a context-parallel group.

Every kernel takes the local q (B, Hq, S, Dqk), k (B, Hkv, S, Dqk), v (B, Hkv, S, Dv) of one
rank and returns that rank's rows of the attention over the whole sequence, with gradients
that equal those of the unsplit computation:

- `allgather_attention`: all-gather K/V (Hkv heads, so the traffic is Hkv-sized), attend the
  local queries to each rank's block of keys separately and merge the partial outputs by
  log-sum-exp; the backward gathers K/V again and reduce-scatters their gradients to the owners.
- `ring_attention`: K/V blocks travel round the ring while each rank merges partial outputs by
  log-sum-exp; the next block is in flight while the current one is computed, and blocks that
  lie wholly in the future of the local queries are not computed. The backward is a ring too:
  K/V travel again and their gradient accumulators follow one hop behind.
- `ulysses_attention`: all-to-all from sequence-sharded to head-sharded, causal SDPA over the
  whole sequence for the local heads, all-to-all back.

All-gather and ring share one piece of machinery. Both layouts cut the sequence into equal
chunks held in increasing order, so for one (local queries, rank `src`'s keys) block the
visible part is a rectangle of fully visible chunk pairs (queries after every key), or - for
the rank's own block - a square whose causal mask in local indices is the plain lower triangle.
Each such piece is one call of a fused attention kernel that also returns the log-sum-exp
(flash or memory-efficient attention on CUDA, the flash kernel on CPU), so no score matrix and
no mask is materialised; the pieces are merged by log-sum-exp. The backward of a piece calls the
matching fused backward kernel with the *merged* output and log-sum-exp, which makes every
piece's gradient exactly its share of the full attention's (dS = P * (dP - D) with
P = exp(S - lse_final) and D = rowsum(dO * O_final)). Shapes or dtypes no fused kernel takes run
a plain-math fallback in tiles of at most `_MATH_TILE` x `_MATH_TILE` scores per head.

The kernels know nothing about how the sequence was split: the caller passes the global token
ranges ("chunks") or positions of every rank (see context_parallel.py).
"""
from __future__ import annotations

import functools
import math
import weakref
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F

Chunks = Sequence[tuple[int, int]]  # global [start, stop) token ranges, in local order

# torch 2.13 renames the tensor-in/tensor-out collectives; keep working on the older names too.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# ---------------------------------------------------------------------------------------------
# shape helpers


def _pack(tensors: Sequence[torch.Tensor], rows: int = 1) -> torch.Tensor:
    """Flatten tensors sharing a leading size `rows` into one (rows, n) buffer: one message
    instead of one per tensor (K and V may differ in head dim, so they cannot be stacked)."""
    return torch.cat([t.reshape(rows, -1) for t in tensors], dim=1)


def _unpack(buf: torch.Tensor, shapes: Sequence[torch.Size]) -> list[torch.Tensor]:
    rows = buf.shape[0]
    sizes = [math.prod(s) // rows for s in shapes]
    return [part.reshape(s) for part, s in zip(buf.split(sizes, dim=1), shapes)]


def _ranks_to_seq(x: torch.Tensor) -> torch.Tensor:
    """(cp, B, H, S, D) pieces in rank order -> (B, H, cp*S, D)."""
    cp, b, h, s, d = x.shape
    return x.permute(1, 2, 0, 3, 4).reshape(b, h, cp * s, d)


def _seq_to_ranks(x: torch.Tensor, cp: int) -> torch.Tensor:
    """(B, H, cp*S, D) -> (cp, B, H, S, D): the inverse of `_ranks_to_seq`."""
    return x.unflatten(2, (cp, -1)).permute(2, 0, 1, 3, 4)


def _heads_to_ranks(x: torch.Tensor, cp: int) -> torch.Tensor:
    """(B, cp*h, S, D) -> (cp, B, h, S, D): head group i goes to rank i."""
    return x.unflatten(1, (cp, -1)).movedim(1, 0)


def _ranks_to_heads(x: torch.Tensor) -> torch.Tensor:
    """(cp, B, h, S, D) -> (B, cp*h, S, D): the inverse of `_heads_to_ranks`."""
    return x.movedim(0, 1).flatten(1, 2)


def _repeat_kv(k: torch.Tensor, v: torch.Tensor, n_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Repeat K/V heads up to `n_heads` the way GQA pairs them (query head h uses KV head h // rep)."""
    rep = n_heads // k.shape[1]
    if rep == 1:
        return k, v
    return k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)


def _fold_heads(grad: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """Sum the gradient of repeated K/V heads back onto the KV heads: the adjoint of `_repeat_kv`."""
    if grad.shape[1] == n_kv_heads:
        return grad
    return grad.unflatten(1, (n_kv_heads, -1)).sum(2)


def _group_heads(x: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """(B, Hq, S, D) -> (B, Hkv, rep, S, D) so one KV head broadcasts over its query heads."""
    b, h, s, d = x.shape
    return x.reshape(b, n_kv_heads, h // n_kv_heads, s, d)


def _accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax statistics and gradient accumulators: fp32, or the input dtype if wider."""
    return torch.promote_types(dtype, torch.float32)


def _global_rank(group: Optional[dist.ProcessGroup], group_rank: int) -> int:
    return group_rank if group is None else dist.get_global_rank(group, group_rank)


# ---------------------------------------------------------------------------------------------
# attention of one piece with its log-sum-exp: fused kernels, plain-math fallback

_HALF = (torch.float16, torch.bfloat16)
_LSE_ALIGN = 32  # CUDA memory-efficient attention pads its logsumexp rows to a multiple of this
_MATH_TILE = 1024  # the fallback's score tiles are at most this many rows x columns per head


@functools.lru_cache(maxsize=None)
def _has_flash(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (8, 0)


def _kernel_for(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    """The kernel that computes a piece: 'flash' or 'efficient' (CUDA; SDPA's switches for
    them are honoured), 'cpu' (the CPU flash kernel), or 'math' for whatever none of them takes
    (head dims that are odd or differ for flash, other dtypes and devices)."""
    d, dv = q.shape[-1], v.shape[-1]
    if q.device.type == "cuda":
        aligned = d % 8 == 0 and dv % 8 == 0
        if (q.dtype in _HALF and d == dv and d <= 256 and aligned
                and torch.backends.cuda.flash_sdp_enabled() and _has_flash(q.device.index or 0)):
            return "flash"
        if (q.dtype in (*_HALF, torch.float32) and aligned
                and torch.backends.cuda.mem_efficient_sdp_enabled()):
            return "efficient"
    elif q.device.type == "cpu" and d == dv and q.dtype in (*_HALF, torch.float32, torch.float64):
        return "cpu"
    return "math"


@dataclass
class _Saved:
    """What a piece's backward needs from its forward besides the tensors: the kernel that ran
    and the extra outputs its backward op takes (sequence metadata, RNG state)."""

    kernel: str
    extra: tuple = ()


def _piece_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
                   mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, _Saved]:
    """Attention of q against k/v -> (out (B, Hq, Sq, Dv) in q's dtype or wider, its
    log-sum-exp (B, Hq, Sq) in fp32 or wider, what the backward needs).

    `causal` means a square piece with the top-left causal mask; `mask` (Sq, Sk), True where
    visible, is only for layouts other than the chunked ones and always takes the fallback.
    """
    kernel = "math" if mask is not None else _kernel_for(q, k, v)
    if kernel == "flash":
        kr, vr = _repeat_kv(k, v, q.shape[1])
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = \
            torch.ops.aten._scaled_dot_product_flash_attention(q, kr, vr, 0.0, causal, False,
                                                               scale=scale)
        return out, lse, _Saved(kernel, (cum_q, cum_k, max_q, max_k, seed, offset))
    if kernel == "efficient":
        kr, vr = _repeat_kv(k, v, q.shape[1])
        out, lse, seed, offset = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, kr, vr, None, True, 0.0, causal, scale=scale)
        return out, lse[..., :q.shape[2]], _Saved(kernel, (seed, offset))
    if kernel == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, scale=scale)
        return out, lse, _Saved(kernel)
    out, lse = _math_forward(q, k, v, causal, scale, mask)
    return out, lse, _Saved(kernel)


def _piece_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    out: torch.Tensor, lse: torch.Tensor, causal: bool, scale: float,
                    mask: Optional[torch.Tensor], saved: _Saved
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv of one piece, given the rows' *final* output and log-sum-exp (not the piece's
    own): then the piece's probabilities are its share of the full softmax and its gradients
    add up to the full attention's."""
    lse = lse.contiguous()
    n_kv = k.shape[1]
    if saved.kernel == "flash":
        cum_q, cum_k, max_q, max_k, seed, offset = saved.extra
        kr, vr = _repeat_kv(k, v, q.shape[1])
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            dout, q, kr, vr, out, lse, cum_q, cum_k, max_q, max_k, 0.0, causal, seed, offset,
            scale=scale)
        return dq, _fold_heads(dk, n_kv), _fold_heads(dv, n_kv)
    if saved.kernel == "efficient":
        seed, offset = saved.extra
        kr, vr = _repeat_kv(k, v, q.shape[1])
        padded = F.pad(lse, (0, -lse.shape[-1] % _LSE_ALIGN)).contiguous()
        dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            dout.contiguous(), q, kr, vr, None, out.contiguous(), padded, seed, offset, 0.0,
            [True, True, True, False], causal, scale=scale)
        return dq, _fold_heads(dk, n_kv), _fold_heads(dv, n_kv)
    if saved.kernel == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, causal, scale=scale)
    return _math_backward(dout, q, k, v, out, lse, causal, scale, mask)


def _finite(lse: torch.Tensor) -> torch.Tensor:
    """lse with -inf (rows that see nothing) replaced by 0, to subtract without NaNs."""
    return lse.masked_fill(torch.isneginf(lse), 0.0)


def _merge(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor,
           block_lse: torch.Tensor) -> None:
    """Fold a partial softmax (block_out, block_lse) into the running (out, lse), in place.
    Rows that have seen no key yet (lse = -inf) stay zero instead of turning into NaN."""
    new_lse = torch.logaddexp(lse, block_lse)
    base = _finite(new_lse)
    out.mul_(torch.exp(lse - base).unsqueeze(-1))
    out.add_(block_out * torch.exp(block_lse - base).unsqueeze(-1))
    lse.copy_(new_lse)


def _scores(q5: torch.Tensor, k: torch.Tensor, scale: float,
            mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Scaled scores of grouped queries (B, Hkv, rep, R, D) against keys (B, Hkv, C, D)."""
    scores = torch.matmul(q5, k.unsqueeze(2).transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores


def _tiles(n_rows: int, n_cols: int, causal: bool):
    """(rows, cols, causal mask or None) of the score tiles that can hold a visible entry."""
    t = _MATH_TILE
    for r0 in range(0, n_rows, t):
        r1 = min(r0 + t, n_rows)
        for c0 in range(0, min(n_cols, r1) if causal else n_cols, t):
            c1 = min(c0 + t, n_cols)
            tile_mask = None
            if causal and c1 - 1 > r0:
                tile_mask = torch.arange(r0, r1)[:, None] >= torch.arange(c0, c1)[None, :]
            yield slice(r0, r1), slice(c0, c1), tile_mask


def _tile_mask(tile_mask: Optional[torch.Tensor], mask: Optional[torch.Tensor], rows: slice,
               cols: slice, device: torch.device) -> Optional[torch.Tensor]:
    if mask is not None:
        return mask[rows, cols]
    return None if tile_mask is None else tile_mask.to(device)


def _math_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
                  mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-math attention with its log-sum-exp, tile by tile, merged like the pieces are."""
    acc = _accum_dtype(q.dtype)
    with torch.autocast(q.device.type, enabled=False):
        n_kv = k.shape[1]
        q5, kf, vf = _group_heads(q.to(acc), n_kv), k.to(acc), v.to(acc)
        out = q5.new_zeros(*q5.shape[:-1], v.shape[-1])
        lse = q5.new_full(q5.shape[:-1], float("-inf"))
        for rows, cols, tile_mask in _tiles(q.shape[2], k.shape[2], causal):
            scores = _scores(q5[..., rows, :], kf[..., cols, :], scale,
                             _tile_mask(tile_mask, mask, rows, cols, q.device))
            tile_lse = torch.logsumexp(scores, dim=-1)
            probs = torch.exp(scores - _finite(tile_lse).unsqueeze(-1))
            tile_out = torch.matmul(probs, vf[..., cols, :].unsqueeze(2))
            _merge(out[..., rows, :], lse[..., rows], tile_out, tile_lse)
    return out.flatten(1, 2), lse.flatten(1, 2)


def _math_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   out: torch.Tensor, lse: torch.Tensor, causal: bool, scale: float,
                   mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients recomputed tile by tile from the final lse (the probabilities are never kept)."""
    acc = _accum_dtype(q.dtype)
    with torch.autocast(q.device.type, enabled=False):
        n_kv = k.shape[1]
        q5, kf, vf = _group_heads(q.to(acc), n_kv), k.to(acc), v.to(acc)
        dout5 = _group_heads(dout.to(acc), n_kv)
        delta = (dout5 * _group_heads(out.to(acc), n_kv)).sum(-1)
        lse5 = _finite(lse.to(acc).reshape(delta.shape))
        dq5, dk, dv = torch.zeros_like(q5), torch.zeros_like(kf), torch.zeros_like(vf)
        for rows, cols, tile_mask in _tiles(q.shape[2], k.shape[2], causal):
            q_t, do_t = q5[..., rows, :], dout5[..., rows, :]
            scores = _scores(q_t, kf[..., cols, :], scale,
                             _tile_mask(tile_mask, mask, rows, cols, q.device))
            probs = torch.exp(scores - lse5[..., rows].unsqueeze(-1))
            dv[..., cols, :] += torch.matmul(probs.transpose(-1, -2), do_t).sum(2)
            dprobs = torch.matmul(do_t, vf[..., cols, :].unsqueeze(2).transpose(-1, -2))
            dscores = probs * (dprobs - delta[..., rows].unsqueeze(-1))
            dq5[..., rows, :] += torch.matmul(dscores, kf[..., cols, :].unsqueeze(2)) * scale
            dk[..., cols, :] += torch.matmul(dscores.transpose(-1, -2), q_t).sum(2) * scale
    return dq5.flatten(1, 2), dk, dv


# ---------------------------------------------------------------------------------------------
# which pieces of each block to compute


@dataclass(frozen=True)
class BlockPlan:
    """The part of one (local queries, remote K/V block) pair that needs computing: query rows
    from `q_start` on, key columns before `k_stop`, with a causal mask only if `masked`."""

    q_start: int
    k_stop: int
    masked: bool


def ring_block_plan(q_chunks: Chunks, k_chunks: Chunks) -> Optional[BlockPlan]:
    """Which rows and columns of a block can be non-zero under the causal mask; None if none.

    Chunks are increasing in local order (true of both layouts), so the query rows that see any
    key form a suffix and the keys seen by any query form a prefix. Pure integer arithmetic:
    deciding to skip costs no device synchronisation.
    """
    first_key, last_query = k_chunks[0][0], q_chunks[-1][1] - 1
    seen_queries = [i for i, (_, stop) in enumerate(q_chunks) if stop - 1 >= first_key]
    seen_keys = [i for i, (start, _) in enumerate(k_chunks) if start <= last_query]
    if not seen_queries or not seen_keys:
        return None
    first_q, last_k = seen_queries[0], seen_keys[-1]
    return BlockPlan(q_start=_offsets(q_chunks)[first_q], k_stop=_offsets(k_chunks)[last_k + 1],
                     masked=k_chunks[last_k][1] - 1 > q_chunks[first_q][0])


def _offsets(chunks: Chunks) -> list[int]:
    """Local index where each chunk starts, plus the local length at the end."""
    offsets = [0]
    for start, stop in chunks:
        offsets.append(offsets[-1] + stop - start)
    return offsets


@dataclass(frozen=True)
class _Piece:
    """One fused-kernel call: local query `rows` against key `cols` of one rank's block, either
    all visible, or (`causal`) a square under the top-left causal mask, or - only for layouts
    other than the chunked ones - under an explicit `mask` (rows x cols), which takes the
    plain-math fallback."""

    rows: slice
    cols: slice
    causal: bool = False
    mask: Optional[torch.Tensor] = None
    batch: slice = field(default_factory=lambda: slice(None))  # its batch rows: documents differ per row


def _plan_piece(plan: Optional[BlockPlan], own: bool, local_len: int,
                block_mask: Callable[[], torch.Tensor]) -> Optional[_Piece]:
    """The piece of a block from its plan. A rank's own block is the only masked one in both
    layouts; its positions increase along the local order, so its mask is the lower triangle."""
    if plan is None:
        return None
    rows, cols = slice(plan.q_start, local_len), slice(0, plan.k_stop)
    if not plan.masked:
        return _Piece(rows, cols)
    if own and plan.q_start == 0 and plan.k_stop == local_len:
        return _Piece(rows, cols, causal=True)
    return _Piece(rows, cols, mask=block_mask())


def _accumulators(q: torch.Tensor, dv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Running output (B, Hq, S, Dv) and log-sum-exp (B, Hq, S) of the merged pieces."""
    acc = _accum_dtype(q.dtype)
    return (q.new_zeros(*q.shape[:-1], dv, dtype=acc),
            q.new_full(q.shape[:-1], float("-inf"), dtype=acc))


def _at(t: torch.Tensor, batch: slice, seq: slice) -> torch.Tensor:
    """The (batch, all heads, seq) view of a (B, H, S[, D]) tensor."""
    return t[batch, :, seq]


def _attend_piece(piece: _Piece, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                  out: torch.Tensor, lse: torch.Tensor) -> _Saved:
    """One piece's forward, merged into the running (out, lse) of its rows."""
    b, rows, cols = piece.batch, piece.rows, piece.cols
    block_out, block_lse, saved = _piece_forward(
        _at(q, b, rows), _at(k, b, cols), _at(v, b, cols), piece.causal, scale, piece.mask)
    _merge(_at(out, b, rows), _at(lse, b, rows), block_out, block_lse)
    return saved


def _piece_grads(piece: _Piece, saved: _Saved, dout: torch.Tensor, q: torch.Tensor,
                 k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, rows, cols = piece.batch, piece.rows, piece.cols
    return _piece_backward(_at(dout, b, rows), _at(q, b, rows), _at(k, b, cols), _at(v, b, cols),
                           _at(out, b, rows), _at(lse, b, rows), piece.causal, scale, piece.mask,
                           saved)


Pieces = Union[None, _Piece, Sequence[_Piece]]  # of one source rank's block: none, one, several


def _piece_list(pieces: Pieces) -> Sequence[_Piece]:
    if pieces is None:
        return ()
    return (pieces,) if isinstance(pieces, _Piece) else pieces


def _attend_block(pieces: Pieces, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                  out: torch.Tensor, lse: torch.Tensor) -> list[_Saved]:
    return [_attend_piece(piece, q, k, v, scale, out, lse) for piece in _piece_list(pieces)]


def _block_grads(pieces: Pieces, saved: Sequence[_Saved], dout: torch.Tensor, q: torch.Tensor,
                 k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                 scale: float, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor) -> None:
    """Accumulate the gradients of one source block's pieces into dq and that block's dk, dv."""
    for piece, state in zip(_piece_list(pieces), saved):
        dq_p, dk_p, dv_p = _piece_grads(piece, state, dout, q, k, v, out, lse, scale)
        _at(dq, piece.batch, piece.rows).add_(dq_p)
        _at(dk, piece.batch, piece.cols).add_(dk_p)
        _at(dv, piece.batch, piece.cols).add_(dv_p)


# ---------------------------------------------------------------------------------------------
# all-gather K/V


def _gather_kv(k: torch.Tensor, v: torch.Tensor,
               group: Optional[dist.ProcessGroup]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's K and V, (cp, B, Hkv, S, D) in rank order, in one message."""
    cp = dist.get_world_size(group)
    local = _pack([k, v])
    full = local.new_empty(cp, local.shape[1])
    _all_gather(full, local, group=group)
    k_all, v_all = _unpack(full, [(cp, *k.shape), (cp, *v.shape)])
    return k_all, v_all


def _scatter_kv_grads(dk_all: torch.Tensor, dv_all: torch.Tensor,
                      group: Optional[dist.ProcessGroup]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum every rank's (cp, ...) K/V gradients and hand each rank its own, in one message."""
    full = _pack([dk_all, dv_all], rows=dk_all.shape[0])
    local = full.new_empty(1, full.shape[1])
    _reduce_scatter(local, full, group=group)
    dk, dv = _unpack(local, [dk_all.shape[1:], dv_all.shape[1:]])
    return dk, dv


def _pieces_from_chunks(chunks: Sequence[Chunks], rank: int, local_len: int,
                        device: torch.device) -> list[Optional[_Piece]]:
    """Pieces per source rank from every rank's chunks: integer arithmetic only."""
    def positions(r: int) -> torch.Tensor:
        return torch.cat([torch.arange(start, stop, device=device) for start, stop in chunks[r]])

    def block_mask(src: int, plan: BlockPlan) -> torch.Tensor:
        return positions(rank)[plan.q_start:, None] >= positions(src)[None, :plan.k_stop]

    plans = [ring_block_plan(chunks[rank], chunks[src]) for src in range(len(chunks))]
    return [_plan_piece(plan, src == rank, local_len,
                        lambda src=src, plan=plan: block_mask(src, plan))
            for src, plan in enumerate(plans)]



# ---------------------------------------------------------------------------------------------
# packed documents: a token sees the earlier tokens of its own document only


@dataclass(frozen=True)
class _Run:
    """Consecutive local tokens of one document at consecutive positions."""

    doc: int
    first: int  # position (within its document) of the run's first token
    start: int  # local index range [start, stop)
    stop: int

    @property
    def last(self) -> int:
        return self.first + self.stop - self.start - 1


def _document_runs(docs: Sequence[int], positions: Sequence[int]) -> list[_Run]:
    runs, start = [], 0
    for i in range(1, len(docs) + 1):
        if i == len(docs) or docs[i] != docs[i - 1] or positions[i] != positions[i - 1] + 1:
            runs.append(_Run(docs[start], positions[start], start, i))
            start = i
    return runs


def _document_block_pieces(q_runs: Sequence[_Run], k_runs: Sequence[_Run], own: bool,
                           batch: slice, device: torch.device) -> list[_Piece]:
    """Pieces of one (local queries, block of keys) pair of one batch row under the document
    mask (same document, key position <= query position). Runs of one document on different
    ranks never overlap in positions, so each pair of runs is all visible, all hidden, or - a
    run against itself - the causal square; fully visible key runs adjacent in the block merge
    into one rectangle, and rows with the same rectangle merge too. A pair that overlaps in
    positions otherwise (repeated positions inside a document) keeps an explicit mask."""
    by_doc: dict[int, list[_Run]] = {}
    for run in k_runs:
        by_doc.setdefault(run.doc, []).append(run)
    pieces, full = [], []
    for qr in q_runs:
        rows, cols = slice(qr.start, qr.stop), []
        for kr in by_doc.get(qr.doc, ()):
            if kr.last < qr.first:
                if cols and cols[-1][1] == kr.start:
                    cols[-1] = (cols[-1][0], kr.stop)
                else:
                    cols.append((kr.start, kr.stop))
            elif own and kr.start == qr.start:
                pieces.append(_Piece(rows, slice(kr.start, kr.stop), causal=True, batch=batch))
            elif kr.first <= qr.last:
                mask = (torch.arange(qr.first, qr.last + 1, device=device)[:, None]
                        >= torch.arange(kr.first, kr.last + 1, device=device)[None, :])
                pieces.append(_Piece(rows, slice(kr.start, kr.stop), mask=mask, batch=batch))
        full += [(start, stop, qr.start, qr.stop) for start, stop in cols]
    merged: list[list[int]] = []
    for c0, c1, r0, r1 in sorted(full):
        if merged and merged[-1][:2] == [c0, c1] and merged[-1][3] == r0:
            merged[-1][3] = r1
        else:
            merged.append([c0, c1, r0, r1])
    return pieces + [_Piece(slice(r0, r1), slice(c0, c1), batch=batch) for c0, c1, r0, r1 in merged]


class DocumentLayout:
    """Every rank's document ids and positions for one batch, and what the kernels derive from
    them: the pieces of each source block for the local queries (all-gather, ring) and the
    order that makes the gathered sequence document-contiguous (Ulysses).

    Built once per batch (`document_layout`): one all-gather of two small int64 tensors and one
    host sync, shared by every layer."""

    def __init__(self, docs: torch.Tensor, positions: torch.Tensor, rank: int,
                 device: torch.device) -> None:
        self.docs, self.positions, self.rank = docs, positions, rank  # (cp, B, S_local), host
        self.device = device
        self._pieces: Optional[list[list[_Piece]]] = None
        self._order: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None

    @property
    def pieces(self) -> list[list[_Piece]]:
        if self._pieces is None:
            cp, batch, _ = self.docs.shape
            docs, positions = self.docs.tolist(), self.positions.tolist()
            runs = [[_document_runs(docs[r][b], positions[r][b]) for b in range(batch)]
                    for r in range(cp)]
            self._pieces = [
                [piece for b in range(batch)
                 for piece in _document_block_pieces(runs[self.rank][b], runs[src][b],
                                                     src == self.rank, slice(b, b + 1),
                                                     self.device)]
                for src in range(cp)]
        return self._pieces

    def ulysses_order(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(to_sorted, from_sorted, sorted document ids), each (B, cp*S_local): the gathered
        sequence (rank order) sorted by document, then position; any such order is exactly
        what a document-masked causal kernel over contiguous documents expects."""
        if self._order is None:
            docs = self.docs.permute(1, 0, 2).flatten(1)  # (B, cp*S_local), rank order
            positions = self.positions.permute(1, 0, 2).flatten(1)
            by_position = torch.argsort(positions, dim=1, stable=True)
            to_sorted = by_position.gather(
                1, torch.argsort(docs.gather(1, by_position), dim=1, stable=True))
            self._order = tuple(t.to(self.device) for t in (
                to_sorted, torch.argsort(to_sorted, dim=1), docs.gather(1, to_sorted)))
        return self._order


_DOCUMENT_LAYOUTS: dict[int, tuple[weakref.ref, object, DocumentLayout]] = {}


@torch.compiler.disable  # a collective and a host sync, once per batch
def document_layout(positions: torch.Tensor, document_ids: torch.Tensor,
                    group: Optional[dist.ProcessGroup]) -> DocumentLayout:
    """The layout of this batch, gathered over `group` once and kept for as long as the
    `document_ids` tensor lives (the model hands the same tensor to every layer and to the
    recomputation of checkpointed ones, so every rank gathers at the same call)."""
    hit = _DOCUMENT_LAYOUTS.get(id(document_ids))
    if hit is not None and hit[0]() is document_ids and hit[1] is group:
        return hit[2]
    for key in [key for key, (ref, _, _) in _DOCUMENT_LAYOUTS.items() if ref() is None]:
        del _DOCUMENT_LAYOUTS[key]
    if positions is None or positions.shape != document_ids.shape:
        raise ValueError("context parallelism over packed documents needs per-document positions "
                         f"of the documents' shape {tuple(document_ids.shape)}, got "
                         f"{None if positions is None else tuple(positions.shape)}")
    cp = dist.get_world_size(group)
    local = torch.stack([document_ids.long(), positions.long()]).reshape(1, -1)
    full = local.new_empty(cp, local.shape[1])
    _all_gather(full, local, group=group)
    meta = full.reshape(cp, 2, *document_ids.shape).cpu()
    layout = DocumentLayout(meta[:, 0], meta[:, 1], dist.get_rank(group), document_ids.device)
    _DOCUMENT_LAYOUTS[id(document_ids)] = (weakref.ref(document_ids), group, layout)
    return layout


def _save_merged(ctx, q, k, v, out, lse, pieces, saved, scale, group) -> torch.Tensor:
    """Keep what the backward of a merged (all-gather or ring) attention needs; return the output
    in the input dtype."""
    result = out.to(q.dtype)
    ctx.save_for_backward(q, k, v, result, lse)
    ctx.pieces, ctx.piece_state, ctx.scale, ctx.group = pieces, saved, scale, group
    return result


class _AllGatherAttention(torch.autograd.Function):
    """Local queries against every rank's gathered K/V block, piece by piece. Only the local
    K/V are saved: the backward gathers them again rather than keeping the whole sequence's."""

    @staticmethod
    def forward(ctx, q, k, v, pieces, scale, group):
        k_all, v_all = _gather_kv(k, v, group)
        out, lse = _accumulators(q, v.shape[-1])
        saved = [_attend_block(block, q, k_all[src], v_all[src], scale, out, lse)
                 for src, block in enumerate(pieces)]
        return _save_merged(ctx, q, k, v, out, lse, pieces, saved, scale, group)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dout = dout.contiguous()
        k_all, v_all = _gather_kv(k, v, ctx.group)
        acc = _accum_dtype(q.dtype)
        dq = torch.zeros_like(q, dtype=acc)
        dk_all = torch.zeros_like(k_all, dtype=acc)
        dv_all = torch.zeros_like(v_all, dtype=acc)
        for src, block in enumerate(ctx.pieces):
            _block_grads(block, ctx.piece_state[src], dout, q, k_all[src], v_all[src], out, lse,
                         ctx.scale, dq, dk_all[src], dv_all[src])
        dk, dv = _scatter_kv_grads(dk_all, dv_all, ctx.group)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


# Piece planning reads the layout on the host (and caches it), and the ring's transfers are
# point-to-point: compiled blocks run these kernels eagerly, as a graph break.
@torch.compiler.disable
def allgather_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        layout: Union[Sequence[Chunks], DocumentLayout],
                        scale: Optional[float], group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Local queries against the gathered K/V, one fused call per visible piece of each rank's
    block, merged by log-sum-exp.

    `layout`: every rank's chunks (in rank order; pure integer arithmetic), or the
    `DocumentLayout` of a batch of packed documents (`document_layout`).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    rank = dist.get_rank(group)
    if isinstance(layout, DocumentLayout):
        pieces = layout.pieces
    else:
        pieces = _pieces_from_chunks(layout, rank, q.shape[2], q.device)
    return _AllGatherAttention.apply(q, k, v, pieces, scale, group)


# ---------------------------------------------------------------------------------------------
# ring


class _Ring:
    """Neighbour exchange: send to rank+1 and receive from rank-1 of the group, asynchronously."""

    def __init__(self, group: Optional[dist.ProcessGroup]) -> None:
        self.group = group
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        self.next = _global_rank(group, (self.rank + 1) % self.size)
        self.prev = _global_rank(group, (self.rank - 1) % self.size)

    def shift(self, tensor: torch.Tensor) -> Callable[[], torch.Tensor]:
        """Start sending `tensor` on; return a function that waits and gives what arrived."""
        if self.size == 1:
            return lambda: tensor
        received = torch.empty_like(tensor)
        works = dist.batch_isend_irecv([
            dist.P2POp(dist.isend, tensor, self.next, self.group),
            dist.P2POp(dist.irecv, received, self.prev, self.group),
        ])

        def wait() -> torch.Tensor:
            for work in works:
                work.wait()
            return received

        return wait


def _block_mask(positions: Sequence[torch.Tensor], rank: int, src: int,
                plan: BlockPlan) -> Optional[torch.Tensor]:
    if not plan.masked:
        return None
    return positions[rank][plan.q_start:, None] >= positions[src][None, :plan.k_stop]


def _ring_pieces(plans: Sequence[Optional[BlockPlan]], positions: Sequence[torch.Tensor],
                 rank: int, local_len: int) -> list[Optional[_Piece]]:
    return [_plan_piece(plan, src == rank, local_len,
                        lambda src=src, plan=plan: _block_mask(positions, rank, src, plan))
            for src, plan in enumerate(plans)]


class _RingAttention(torch.autograd.Function):
    """Ring attention: blocks travel in the input dtype, each visible piece is one fused call,
    softmax statistics and gradient accumulators stay fp32 for exactness."""

    @staticmethod
    def forward(ctx, q, k, v, pieces, scale, group):
        ring = _Ring(group)
        out, lse = _accumulators(q, v.shape[-1])
        saved: list[list[_Saved]] = [[] for _ in range(ring.size)]
        kv = _pack([k, v])
        for step in range(ring.size):
            src = (ring.rank - step) % ring.size
            arriving = ring.shift(kv) if step < ring.size - 1 else None
            if _piece_list(pieces[src]):
                k_blk, v_blk = _unpack(kv, [k.shape, v.shape])
                saved[src] = _attend_block(pieces[src], q, k_blk, v_blk, scale, out, lse)
            if arriving is not None:
                kv = arriving()
        return _save_merged(ctx, q, k, v, out, lse, pieces, saved, scale, group)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        ring = _Ring(ctx.group)
        dout = dout.contiguous()
        acc = _accum_dtype(q.dtype)
        dq = torch.zeros_like(q, dtype=acc)
        kv = _pack([k, v])
        grads_arriving = None
        for step in range(ring.size):
            src = (ring.rank - step) % ring.size
            kv_arriving = ring.shift(kv) if step < ring.size - 1 else None
            # The accumulator of block `src` comes from the rank that held it one step ago.
            dkv = grads_arriving() if grads_arriving else kv.new_zeros(kv.shape, dtype=acc)
            if _piece_list(ctx.pieces[src]):
                k_blk, v_blk = _unpack(kv, [k.shape, v.shape])
                dk, dv = _unpack(dkv, [k.shape, v.shape])
                _block_grads(ctx.pieces[src], ctx.piece_state[src], dout, q, k_blk, v_blk, out,
                             lse, ctx.scale, dq, dk, dv)
            grads_arriving = ring.shift(dkv)
            if kv_arriving is not None:
                kv = kv_arriving()
        dk, dv = _unpack(grads_arriving(), [k.shape, v.shape])  # one more hop: back to the owner
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


@torch.compiler.disable
def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   plans: Union[Sequence[Optional[BlockPlan]], DocumentLayout],
                   positions: Optional[Sequence[torch.Tensor]],
                   scale: Optional[float], group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """`plans[src]`: the part of K/V block `src` the local queries see (`ring_block_plan`);
    `positions[r]`: global positions of rank r's tokens, used only for masked blocks other than
    the rank's own (none in the chunked layouts). Or `plans`: the `DocumentLayout` of a batch
    of packed documents (then `positions` is unused): the blocks' document ids need not travel
    with them, the layout already holds every rank's."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if isinstance(plans, DocumentLayout):
        pieces = plans.pieces
    else:
        pieces = _ring_pieces(plans, positions, dist.get_rank(group), q.shape[2])
    return _RingAttention.apply(q, k, v, pieces, scale, group)


# ---------------------------------------------------------------------------------------------
# Ulysses


def _exchange(tensors: Sequence[torch.Tensor], group: Optional[dist.ProcessGroup]) -> list[torch.Tensor]:
    """Swap slice i of each tensor's leading (cp) dim with rank i, all tensors in one message."""
    cp = tensors[0].shape[0]
    send = _pack(tensors, rows=cp)
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=group)
    return _unpack(received, [t.shape for t in tensors])


class _AllToAll(torch.autograd.Function):
    """An equal-split all-to-all is its own adjoint: the backward is the same exchange."""

    @staticmethod
    def forward(ctx, group, *tensors):
        ctx.group = group
        return tuple(_exchange(tensors, group))

    @staticmethod
    def backward(ctx, *grads):
        return (None, *_exchange(grads, ctx.group))


def _ulysses_kv_heads(n_kv_heads: int, cp: int) -> int:
    """KV heads to send so that cp divides them and GQA pairs stay on one rank: lcm(Hkv, cp),
    which divides Hq because both Hkv and cp do."""
    return n_kv_heads * cp // math.gcd(n_kv_heads, cp)


def check_ulysses_heads(n_heads: int, cp: int) -> None:
    if n_heads % cp:
        raise ValueError(
            f"Ulysses context parallelism splits the {n_heads} attention heads (per tensor-parallel "
            f"rank) over cp={cp} ranks, which does not divide them: use a cp that divides "
            f"{n_heads}, or kernel 'allgather' or 'ring'")


def _reorder(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t (B, H, S, D) reordered along S by `index`: (S,) for every row, or (B, S) per row."""
    if index.dim() == 1:
        return t.index_select(2, index)
    return t.gather(2, index[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3]))


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      order: Optional[tuple[torch.Tensor, torch.Tensor]],
                      scale: Optional[float], group: Optional[dist.ProcessGroup],
                      attend: Optional[Callable[..., torch.Tensor]] = None) -> torch.Tensor:
    """`order`: (to_natural, from_natural) permutations between the gathered rank order of the
    sequence and position order ((S,), or (B, S) per row), or None when the gathered order is
    already position order. `attend(q, k, v)`: the attention over the whole reordered sequence
    for the local heads (K/V heads already repeated to Hq); causal SDPA by default, the
    document-masked local kernel for packed documents."""
    cp = dist.get_world_size(group)
    n_heads = q.shape[1]
    check_ulysses_heads(n_heads, cp)
    k, v = _repeat_kv(k, v, _ulysses_kv_heads(k.shape[1], cp))
    q, k, v = (_ranks_to_seq(t) for t in _AllToAll.apply(
        group, _heads_to_ranks(q, cp), _heads_to_ranks(k, cp), _heads_to_ranks(v, cp)))
    if order is not None:
        q, k, v = (_reorder(t, order[0]) for t in (q, k, v))
    k, v = _repeat_kv(k, v, q.shape[1])
    if attend is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    else:
        out = attend(q, k, v)
    if order is not None:
        out = _reorder(out, order[1])
    (out,) = _AllToAll.apply(group, _seq_to_ranks(out, cp))
    return _ranks_to_heads(out)
