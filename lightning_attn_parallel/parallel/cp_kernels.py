"""Exact causal attention for a sequence split across the ranks of a context-parallel group.

Every kernel takes the local q (B, Hq, S, Dqk), k (B, Hkv, S, Dqk), v (B, Hkv, S, Dv) of one
rank and returns that rank's rows of the attention over the whole sequence, with gradients
that equal those of the unsplit computation:

- `allgather_attention`: all-gather K/V (before repeating GQA heads, so the traffic is
  Hkv-sized), attend the local queries to everything under a mask of global positions; the
  backward reduce-scatters the K/V gradients to their owners.
- `ring_attention`: K/V blocks travel round the ring while each rank merges partial outputs by
  log-sum-exp; the next block is in flight while the current one is computed, and blocks that
  lie wholly in the future of the local queries are not computed. The backward is a ring too:
  K/V travel again and their gradient accumulators follow one hop behind.
- `ulysses_attention`: all-to-all from sequence-sharded to head-sharded, causal SDPA over the
  whole sequence for the local heads, all-to-all back.

The kernels know nothing about how the sequence was split: the caller passes the global token
ranges ("chunks") or positions of every rank (see context_parallel.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

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


def _global_rank(group: Optional[dist.ProcessGroup], group_rank: int) -> int:
    return group_rank if group is None else dist.get_global_rank(group, group_rank)


# ---------------------------------------------------------------------------------------------
# all-gather K/V


class _GatherKV(torch.autograd.Function):
    """All-gather K and V along the sequence in one message; the backward reduce-scatters."""

    @staticmethod
    def forward(ctx, k: torch.Tensor, v: torch.Tensor, group: Optional[dist.ProcessGroup]):
        cp = dist.get_world_size(group)
        ctx.group, ctx.shapes = group, (k.shape, v.shape)
        local = _pack([k, v])
        full = local.new_empty(cp, local.shape[1])
        _all_gather(full, local, group=group)
        k_all, v_all = _unpack(full, [(cp, *k.shape), (cp, *v.shape)])
        return _ranks_to_seq(k_all), _ranks_to_seq(v_all)

    @staticmethod
    def backward(ctx, dk: torch.Tensor, dv: torch.Tensor):
        cp = dist.get_world_size(ctx.group)
        full = _pack([_seq_to_ranks(dk, cp), _seq_to_ranks(dv, cp)], rows=cp)
        local = full.new_empty(1, full.shape[1])
        _reduce_scatter(local, full, group=ctx.group)
        dk_local, dv_local = _unpack(local, ctx.shapes)
        return dk_local, dv_local, None


def allgather_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                        scale: Optional[float], group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Local queries against the gathered K/V; `mask` (S_local, cp*S_local) is True where a
    query may see a key, built from the global positions of both (keys in rank order)."""
    k_all, v_all = _GatherKV.apply(k, v, group)
    k_all, v_all = _repeat_kv(k_all, v_all, q.shape[1])
    return F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, scale=scale)


# ---------------------------------------------------------------------------------------------
# ring


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


def _group_heads(x: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """(B, Hq, S, D) -> (B, Hkv, rep, S, D) so one KV head broadcasts over its query heads."""
    b, h, s, d = x.shape
    return x.reshape(b, n_kv_heads, h // n_kv_heads, s, d)


def _scores(q5: torch.Tensor, k: torch.Tensor, scale: float,
            mask: Optional[torch.Tensor]) -> torch.Tensor:
    scores = torch.matmul(q5, k.unsqueeze(2).transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores


def _block_forward(q5: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                   mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one block with its log-sum-exp. Every row of a block sees at least one key
    (a masked block is a rank's own block, where each query sees itself), so lse is finite."""
    scores = _scores(q5, k, scale, mask)
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.exp(scores - lse.unsqueeze(-1)), v.unsqueeze(2))
    return out, lse


def _merge(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor,
           q_start: int) -> None:
    """Fold a block's partial softmax into rows q_start: of the running output, in place."""
    rows_out, rows_lse = out[..., q_start:, :], lse[..., q_start:]
    new_lse = torch.logaddexp(rows_lse, block_lse)
    rows_out.mul_(torch.exp(rows_lse - new_lse).unsqueeze(-1))
    rows_out.add_(block_out * torch.exp(block_lse - new_lse).unsqueeze(-1))
    rows_lse.copy_(new_lse)


def _block_backward(q5: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout5: torch.Tensor,
                    lse: torch.Tensor, delta: torch.Tensor, scale: float,
                    mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one block recomputed from the final lse (the probabilities are not kept:
    that is what keeps ring attention's memory linear in the number of blocks)."""
    probs = torch.exp(_scores(q5, k, scale, mask) - lse.unsqueeze(-1))
    dv = torch.matmul(probs.transpose(-1, -2), dout5).sum(2)
    dprobs = torch.matmul(dout5, v.unsqueeze(2).transpose(-1, -2))
    dscores = probs * (dprobs - delta.unsqueeze(-1))
    dq = torch.matmul(dscores, k.unsqueeze(2)) * scale
    dk = torch.matmul(dscores.transpose(-1, -2), q5).sum(2) * scale
    return dq, dk, dv


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


class _RingAttention(torch.autograd.Function):
    """Ring attention, computed in fp32 whatever the input dtype (blocks travel in the input
    dtype; softmax statistics and gradient accumulators stay fp32 for exactness)."""

    @staticmethod
    def forward(ctx, q, k, v, plans, positions, scale, group):
        ring = _Ring(group)
        q5 = _group_heads(q.float(), k.shape[1])
        out = q5.new_zeros(*q5.shape[:-1], v.shape[-1])
        lse = q5.new_full(q5.shape[:-1], float("-inf"))
        kv = _pack([k, v])
        for step in range(ring.size):
            src = (ring.rank - step) % ring.size
            arriving = ring.shift(kv) if step < ring.size - 1 else None
            plan = plans[src]
            if plan is not None:
                k_blk, v_blk = _unpack(kv, [k.shape, v.shape])
                block = _block_forward(q5[..., plan.q_start:, :], k_blk[..., :plan.k_stop, :].float(),
                                       v_blk[..., :plan.k_stop, :].float(), scale,
                                       _block_mask(positions, ring.rank, src, plan))
                _merge(out, lse, *block, plan.q_start)
            if arriving is not None:
                kv = arriving()
        result = out.reshape(*q.shape[:-1], v.shape[-1]).to(q.dtype)
        ctx.save_for_backward(q, k, v, result, lse)
        ctx.plans, ctx.positions, ctx.scale, ctx.group = plans, positions, scale, group
        return result

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        ring = _Ring(ctx.group)
        n_kv = k.shape[1]
        q5 = _group_heads(q.float(), n_kv)
        dout5 = _group_heads(dout.float(), n_kv)
        delta = (dout5 * _group_heads(out.float(), n_kv)).sum(-1)
        dq5 = torch.zeros_like(q5)
        kv = _pack([k, v])
        grads_arriving = None
        for step in range(ring.size):
            src = (ring.rank - step) % ring.size
            kv_arriving = ring.shift(kv) if step < ring.size - 1 else None
            plan = ctx.plans[src]
            if plan is not None:
                k_blk, v_blk = _unpack(kv, [k.shape, v.shape])
                rows = slice(plan.q_start, None)
                dq_blk, dk_blk, dv_blk = _block_backward(
                    q5[..., rows, :], k_blk[..., :plan.k_stop, :].float(),
                    v_blk[..., :plan.k_stop, :].float(), dout5[..., rows, :], lse[..., rows],
                    delta[..., rows], ctx.scale, _block_mask(ctx.positions, ring.rank, src, plan))
                dq5[..., rows, :] += dq_blk
            # The accumulator of block `src` comes from the rank that held it one step ago.
            dkv = grads_arriving() if grads_arriving else kv.new_zeros(kv.shape, dtype=torch.float32)
            if plan is not None:
                dk, dv = _unpack(dkv, [k.shape, v.shape])
                dk[..., :plan.k_stop, :] += dk_blk
                dv[..., :plan.k_stop, :] += dv_blk
            grads_arriving = ring.shift(dkv)
            if kv_arriving is not None:
                kv = kv_arriving()
        dk, dv = _unpack(grads_arriving(), [k.shape, v.shape])  # one more hop: back to the owner
        dq = dq5.reshape(q.shape)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   plans: Sequence[Optional[BlockPlan]], positions: Sequence[torch.Tensor],
                   scale: Optional[float], group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """`plans[src]`: the part of K/V block `src` the local queries see (`ring_block_plan`);
    `positions[r]`: global positions of rank r's tokens, used only for masked blocks."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _RingAttention.apply(q, k, v, plans, positions, scale, group)


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


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      order: Optional[tuple[torch.Tensor, torch.Tensor]],
                      scale: Optional[float], group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """`order`: (to_natural, from_natural) permutations between the gathered rank order of the
    sequence and position order, or None when the gathered order is already position order."""
    cp = dist.get_world_size(group)
    n_heads = q.shape[1]
    check_ulysses_heads(n_heads, cp)
    k, v = _repeat_kv(k, v, _ulysses_kv_heads(k.shape[1], cp))
    q, k, v = (_ranks_to_seq(t) for t in _AllToAll.apply(
        group, _heads_to_ranks(q, cp), _heads_to_ranks(k, cp), _heads_to_ranks(v, cp)))
    if order is not None:
        q, k, v = (t.index_select(2, order[0]) for t in (q, k, v))
    k, v = _repeat_kv(k, v, q.shape[1])
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    if order is not None:
        out = out.index_select(2, order[1])
    (out,) = _AllToAll.apply(group, _seq_to_ranks(out, cp))
    return _ranks_to_heads(out)
