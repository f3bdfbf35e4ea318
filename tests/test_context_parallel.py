"""Context-parallel attention is exact: every kernel, with and without load balancing, on 2 and
4 gloo ranks, gives the outputs and q/k/v gradients of single-process causal SDPA, and a model
with its kernels swapped gives the loss and gradients of the unsplit model.

All-gather and ring attend piece by piece (one fused kernel call per visible region of a block,
merged by log-sum-exp): traced runs check that the calls cover exactly the visible chunk pairs,
with no mask and no score matrix; that the plain-math fallback keeps its score tiles within
chunk x chunk; and that both stay exact.

All distributed cases share one spawned run (a spawn costs seconds).
"""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dist_utils import assert_close, run_distributed
from lightning_attn_parallel.models import ModelConfig, build_model
from lightning_attn_parallel.parallel.context_parallel import (
    ContextParallelAttention, apply_context_parallel, context_parallel_chunks,
    context_parallel_positions, set_context_parallel_active,
    shard_for_context_parallel, validate_cp)
from lightning_attn_parallel.parallel import cp_kernels
from lightning_attn_parallel.parallel.cp_kernels import allgather_attention, ring_block_plan

KERNELS = ("allgather", "ring", "ulysses")


# ---------------------------------------------------------------------------------------------
# cases and the single-process reference


def _make_cases(cp: int) -> list[dict]:
    """Random shapes (seeded) for every kernel x load balance: MHA and GQA, a small odd head
    count where the kernel allows it, Ulysses with fewer KV heads than ranks, Dv != Dqk."""
    rng = random.Random(1234 + cp)
    heads = {
        "allgather": [(3, 3), (6, 2), (4, 1)],
        "ring": [(3, 3), (6, 2), (4, 1)],
        "ulysses": [(cp, cp), (2 * cp, 1), (3 * cp, 3)],
    }
    cases = []
    for kernel in KERNELS:
        for load_balance in (True, False):
            for n_heads, n_kv in heads[kernel]:
                dqk = rng.choice((4, 8, 16))
                cases.append(dict(
                    kernel=kernel, load_balance=load_balance, batch=rng.randint(1, 2),
                    n_heads=n_heads, n_kv=n_kv, seq=2 * cp * rng.randint(1, 4), dqk=dqk,
                    dv=rng.choice((dqk, dqk // 2, 2 * dqk)), scale=rng.choice((None, 0.3)),
                    seed=rng.randrange(1 << 30)))
    return cases


def gather_from_context_parallel(shards: list[torch.Tensor], dim: int, load_balance: bool) -> torch.Tensor:
    """The full tensor from every rank's shard (in rank order): the inverse of
    `shard_for_context_parallel`."""
    cp_size = len(shards)
    seq_len = sum(shard.shape[dim] for shard in shards)
    pieces = []
    for rank, shard in enumerate(shards):
        chunks = context_parallel_chunks(seq_len, rank, cp_size, load_balance)
        parts = shard.split([stop - start for start, stop in chunks], dim=dim)
        pieces += [(start, part) for (start, _), part in zip(chunks, parts)]
    return torch.cat([part for _, part in sorted(pieces, key=lambda p: p[0])], dim=dim)


def _inputs(case: dict) -> list[torch.Tensor]:
    """Full-sequence q, k, v and an output gradient, identical on every rank and in the parent."""
    g = torch.Generator().manual_seed(case["seed"])
    b, s = case["batch"], case["seq"]
    shapes = [(b, case["n_heads"], s, case["dqk"]), (b, case["n_kv"], s, case["dqk"]),
              (b, case["n_kv"], s, case["dv"]), (b, case["n_heads"], s, case["dv"])]
    return [torch.randn(shape, generator=g) for shape in shapes]


def _reference(case: dict) -> dict[str, torch.Tensor]:
    q, k, v, dout = _inputs(case)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    rep = case["n_heads"] // case["n_kv"]
    out = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                         is_causal=True, scale=case["scale"])
    (out * dout).sum().backward()
    return dict(out=out.detach(), dq=q.grad, dk=k.grad, dv=v.grad)


def _sharded(case: dict, group: dist.ProcessGroup) -> dict[str, np.ndarray]:
    rank, cp, lb = dist.get_rank(group), dist.get_world_size(group), case["load_balance"]
    q, k, v, dout = (shard_for_context_parallel(t, 2, rank, cp, lb) for t in _inputs(case))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    if case.get("mode") == "chunks":  # all-gather told every rank's chunks directly
        chunks = [context_parallel_chunks(case["seq"], r, cp, lb) for r in range(cp)]
        out = allgather_attention(q, k, v, chunks, case["scale"], group)
    else:
        attn = ContextParallelAttention(group, case["kernel"], lb, scale=case["scale"])
        out = attn(q, k, v, context_parallel_positions(case["seq"], rank, cp, lb))
    (out * dout).sum().backward()
    return _numpy(dict(out=out, dq=q.grad, dk=k.grad, dv=v.grad))


def _numpy(tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Results travel as numpy arrays: plain pickles, no shared-memory file descriptors."""
    return {name: t.detach().numpy() for name, t in tensors.items()}


# ---------------------------------------------------------------------------------------------
# a tiny model end to end: global RoPE positions, the kernel slot, loss over global tokens

_MODEL = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,
                     max_seq_len=64)


def _model_tokens() -> torch.Tensor:
    """Two sequences of 17 tokens: 16 inputs and 16 next-token targets each."""
    return torch.randint(0, _MODEL.vocab_size, (2, 17), generator=torch.Generator().manual_seed(7))


def _lm_loss(model, inputs, targets, positions, n_tokens: int) -> torch.Tensor:
    """Summed cross-entropy divided by the global token count, backpropagated."""
    logits = model.logits(inputs, positions)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum") / n_tokens
    loss.backward()
    return loss.detach()


def _model_case(kernel: str, group: dist.ProcessGroup) -> tuple[float, dict[str, np.ndarray]]:
    rank, cp = dist.get_rank(group), dist.get_world_size(group)
    torch.manual_seed(0)
    model = apply_context_parallel(build_model(_MODEL), group, kernel, load_balance=True)
    tokens = _model_tokens()
    inputs, targets = (shard_for_context_parallel(t, 1, rank, cp, True)
                       for t in (tokens[:, :-1], tokens[:, 1:]))
    positions = context_parallel_positions(tokens.shape[1] - 1, rank, cp, True)
    loss = _lm_loss(model, inputs, targets, positions, tokens[:, 1:].numel())
    dist.all_reduce(loss, group=group)
    for p in model.parameters():
        dist.all_reduce(p.grad, group=group)
    return loss.item(), _numpy({n: p.grad for n, p in model.named_parameters()})


# ---------------------------------------------------------------------------------------------
# one distributed run: cp=4 over the world, and cp=2 over the sub-groups {0, 1} and {2, 3}
# (which also proves the kernels address ring neighbours by global rank)

WORLD = 4
CP_SIZES = (2, 4)


def _ulysses_heads_error(group: dist.ProcessGroup) -> str:
    cp = dist.get_world_size(group)
    x = torch.randn(1, cp + 1, 4, 8)
    try:
        ContextParallelAttention(group, "ulysses", load_balance=False)(x, x, x)
    except ValueError as exc:
        return str(exc)
    return ""


def _traced_cases(cp: int) -> list[dict]:
    """All-gather (through the kernel, or told every rank's chunks) and ring, both layouts: fused kernels
    (equal head dims) and the plain-math fallback with chunk-sized tiles."""
    base = dict(batch=2, n_heads=4, n_kv=2, seq=4 * cp, dqk=8, dv=8, scale=None, seed=4321 + cp)
    cases = []
    for kernel, mode in (("allgather", "kernel"), ("allgather", "chunks"), ("ring", "plans")):
        for load_balance in (True, False):
            for fallback in (False, True):
                cases.append(dict(base, kernel=kernel, mode=mode, load_balance=load_balance,
                                  fallback=fallback))
    return cases


def _traced_id(case: dict) -> str:
    path = "fallback" if case["fallback"] else "fused"
    return f"{case['kernel']}/{case['mode']} lb={case['load_balance']} {path}"


def _chunk_len(case: dict, cp: int) -> int:
    return case["seq"] // (2 * cp if case["load_balance"] else cp)


def _traced(case: dict, group: dist.ProcessGroup) -> dict:
    """`_sharded` with every fused-kernel call and every score matrix recorded."""
    calls, backward_calls, score_dims = [], [], []
    names = ("_piece_forward", "_piece_backward", "_scores", "_kernel_for", "_MATH_TILE")
    originals = {name: getattr(cp_kernels, name) for name in names}

    def piece_forward(q, k, v, causal, scale, mask=None):
        out, lse, saved = originals["_piece_forward"](q, k, v, causal, scale, mask)
        calls.append((saved.kernel, q.shape[2], k.shape[2], causal, mask is not None))
        return out, lse, saved

    def piece_backward(dout, q, k, v, out, lse, causal, scale, mask, saved):
        backward_calls.append((saved.kernel, q.shape[2], k.shape[2], causal, mask is not None))
        return originals["_piece_backward"](dout, q, k, v, out, lse, causal, scale, mask, saved)

    def scores(q5, k, scale, mask):
        result = originals["_scores"](q5, k, scale, mask)
        score_dims.append(tuple(result.shape[-2:]))
        return result

    patches = dict(_piece_forward=piece_forward, _piece_backward=piece_backward, _scores=scores)
    if case["fallback"]:
        patches.update(_kernel_for=lambda q, k, v: "math",
                       _MATH_TILE=_chunk_len(case, dist.get_world_size(group)))
    for name, value in patches.items():
        setattr(cp_kernels, name, value)
    try:
        result = _sharded(case, group)
    finally:
        for name, value in originals.items():
            setattr(cp_kernels, name, value)
    return dict(result, calls=calls, backward_calls=backward_calls, score_dims=score_dims)


def _worker(rank: int, world: int, cases: dict[int, list[dict]],
            traced: dict[int, list[dict]]) -> dict[int, dict]:
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    groups = {2: pairs[rank // 2], 4: dist.group.WORLD}
    results = {}
    for cp, group in groups.items():
        results[cp] = dict(
            parity=[_sharded(case, group) for case in cases[cp]],
            traced=[_traced(case, group) for case in traced[cp]],
            models={kernel: _model_case(kernel, group) for kernel in KERNELS},
            ulysses_error=_ulysses_heads_error(group))
    return results


@pytest.fixture(scope="module")
def distributed_run() -> tuple[dict[int, list[dict]], list[dict]]:
    cases = {cp: _make_cases(cp) for cp in CP_SIZES}
    traced = {cp: _traced_cases(cp) for cp in CP_SIZES}
    return cases, run_distributed(_worker, WORLD, cases, traced)


def _ranks(results: list[dict], cp: int) -> list[list[dict]]:
    """Per CP group, its ranks' results in group-rank order."""
    return [results[start:start + cp] for start in range(0, WORLD, cp)]


def _case_id(case: dict) -> str:
    return (f"{case['kernel']} lb={case['load_balance']} heads={case['n_heads']}/{case['n_kv']} "
            f"S={case['seq']} D={case['dqk']}/{case['dv']}")


def _assert_runs_match_sdpa(results, kind: str, cases_of, case_id) -> None:
    """Every rank group's gathered outputs and gradients equal single-process SDPA."""
    for cp in CP_SIZES:
        for i, case in enumerate(cases_of(cp)):
            expected = _reference(case)
            for group_results in _ranks(results, cp):
                for key, ref in expected.items():
                    shards = [torch.from_numpy(r[cp][kind][i][key]) for r in group_results]
                    got = gather_from_context_parallel(shards, 2, case["load_balance"])
                    assert_close(got, ref, rtol=1e-5, name=f"cp={cp} {case_id(case)} {key}")


def test_kernels_match_single_process_sdpa(distributed_run):
    cases, results = distributed_run
    _assert_runs_match_sdpa(results, "parity", lambda cp: cases[cp], _case_id)


def _expected_pieces(rank: int, cp: int, local: int, load_balance: bool) -> list[tuple]:
    """(query rows, key columns, causal) of every block's visible region: the own block is a
    causal square, an earlier block is all visible, and with load balancing a later block is
    all visible to the tail chunk of queries (a chunk is local/2 there, local without)."""
    pieces = []
    for src in range(cp):
        if src == rank:
            pieces.append((local, local, True))
        elif src < rank:
            pieces.append((local, local // 2 if load_balance else local, False))
        elif load_balance:
            pieces.append((local // 2, local, False))
    return sorted(pieces)


def _visible_pairs(seq: int, rank: int, cp: int, load_balance: bool) -> int:
    """Query-key pairs of this rank's rows under the causal mask: position p sees p + 1 keys."""
    return int((context_parallel_positions(seq, rank, cp, load_balance) + 1).sum())


def test_pieces_cover_exactly_the_visible_chunk_pairs(distributed_run):
    _, results = distributed_run
    for cp in CP_SIZES:
        for i, case in enumerate(_traced_cases(cp)):
            if case["fallback"]:
                continue
            for group_results in _ranks(results, cp):
                for rank, result in enumerate(group_results):
                    traced = result[cp]["traced"][i]
                    name = f"cp={cp} {_traced_id(case)} rank {rank}"
                    local = case["seq"] // cp
                    assert {c[0] for c in traced["calls"]} == {"cpu"}, name  # the fused kernel
                    assert not any(c[4] for c in traced["calls"]), name  # never a mask
                    assert traced["score_dims"] == [], name  # never a score matrix
                    got = sorted((rows, cols, causal) for _, rows, cols, causal, _ in traced["calls"])
                    assert got == _expected_pieces(rank, cp, local, case["load_balance"]), name
                    work = sum(r * (r + 1) // 2 if causal else r * c for r, c, causal in got)
                    assert work == _visible_pairs(case["seq"], rank, cp, case["load_balance"]), name
                    assert sorted(traced["backward_calls"]) == sorted(traced["calls"]), name


def test_fallback_scores_stay_within_chunk_by_chunk(distributed_run):
    _, results = distributed_run
    for cp in CP_SIZES:
        for i, case in enumerate(_traced_cases(cp)):
            if not case["fallback"]:
                continue
            chunk = _chunk_len(case, cp)
            for group_results in _ranks(results, cp):
                for rank, result in enumerate(group_results):
                    traced = result[cp]["traced"][i]
                    name = f"cp={cp} {_traced_id(case)} rank {rank}"
                    assert {c[0] for c in traced["calls"]} == {"math"}, name
                    assert traced["score_dims"], name
                    assert max(r for r, _ in traced["score_dims"]) <= chunk, name
                    assert max(c for _, c in traced["score_dims"]) <= chunk, name


def test_traced_runs_are_exact(distributed_run):
    _, results = distributed_run
    _assert_runs_match_sdpa(results, "traced", _traced_cases, _traced_id)


def test_model_with_context_parallel_matches_single_process(distributed_run):
    _, results = distributed_run
    torch.manual_seed(0)
    model = build_model(_MODEL)
    tokens = _model_tokens()
    loss = _lm_loss(model, tokens[:, :-1], tokens[:, 1:], None, tokens[:, 1:].numel())
    for cp in CP_SIZES:
        for kernel in KERNELS:
            cp_loss, cp_grads = results[0][cp]["models"][kernel]
            assert_close(torch.tensor(cp_loss), loss, name=f"cp={cp} {kernel} loss")
            for name, p in model.named_parameters():
                assert_close(torch.from_numpy(cp_grads[name]), p.grad, name=f"cp={cp} {kernel} {name}")


def test_ulysses_rejects_heads_not_divisible(distributed_run):
    _, results = distributed_run
    for cp in CP_SIZES:
        message = results[0][cp]["ulysses_error"]
        assert f"{cp + 1} attention heads" in message and f"cp={cp}" in message
        assert "allgather" in message


# ---------------------------------------------------------------------------------------------
# layout and errors, no processes needed


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("load_balance", [True, False])
def test_shard_gather_round_trip_and_positions(world, load_balance):
    seq = 2 * world * 3
    x = torch.arange(2 * seq).view(2, seq)
    shards = [shard_for_context_parallel(x, 1, r, world, load_balance) for r in range(world)]
    assert torch.equal(gather_from_context_parallel(shards, 1, load_balance), x)
    for r, shard in enumerate(shards):
        assert torch.equal(shard[0], context_parallel_positions(seq, r, world, load_balance))


def test_load_balance_is_head_tail():
    # 8 tokens on 2 ranks: chunks of 2, rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2
    assert context_parallel_positions(8, 0, 2, True).tolist() == [0, 1, 6, 7]
    assert context_parallel_positions(8, 1, 2, True).tolist() == [2, 3, 4, 5]


def _plans(world: int, load_balance: bool) -> list[list]:
    chunks = [context_parallel_chunks(8 * world, r, world, load_balance) for r in range(world)]
    return [[ring_block_plan(chunks[r], chunks[s]) for s in range(world)] for r in range(world)]


def test_ring_skips_future_blocks():
    world = 4
    plans = _plans(world, load_balance=False)
    for r in range(world):
        assert [p is not None for p in plans[r]] == [s <= r for s in range(world)]
        assert all(p.masked == (s == r) for s, p in enumerate(plans[r]) if p is not None)


def test_ring_load_balance_halves_every_remote_block():
    world, local = 4, 8
    plans = _plans(world, load_balance=True)
    for r in range(world):
        for s, plan in enumerate(plans[r]):
            if s == r:
                assert (plan.q_start, plan.k_stop, plan.masked) == (0, local, True)
            elif s < r:  # all queries, the head chunk of keys
                assert (plan.q_start, plan.k_stop, plan.masked) == (0, local // 2, False)
            else:  # the tail chunk of queries, all keys
                assert (plan.q_start, plan.k_stop, plan.masked) == (local // 2, local, False)


def test_inactive_kernel_runs_the_original_local_kernel():
    torch.manual_seed(0)
    model = build_model(_MODEL)
    tokens = _model_tokens()
    expected = model.logits(tokens)
    apply_context_parallel(model, None, "ring")
    apply_context_parallel(model, None, "ulysses")  # re-applying wraps the original, not the wrapper
    kernels = [block.attention.kernel for block in model.blocks]
    assert all(isinstance(k, ContextParallelAttention) and k.kernel == "ulysses" for k in kernels)
    assert not any(isinstance(k.local_kernel, ContextParallelAttention) for k in kernels)
    set_context_parallel_active(model, False)
    assert torch.equal(model.logits(tokens), expected)
    set_context_parallel_active(model, True)
    assert all(k.active for k in kernels)


def test_scale_is_kept_when_swapping():
    model = build_model(_MODEL)
    model.blocks[0].attention.kernel.scale = 0.125
    apply_context_parallel(model, None, "allgather")
    assert model.blocks[0].attention.kernel.scale == 0.125
    assert model.blocks[1].attention.kernel.scale is None


@pytest.mark.parametrize("args, match", [
    (dict(kernel="flash"), r"kernel 'flash' is unknown: use one of"),
    (dict(kernel="ulysses", n_heads=6, cp=4), r"6 attention heads .* cp=4 .* use a cp that divides 6"),
    (dict(seq_len=128, max_seq_len=64), r"sequence length 128 exceeds the model's max_seq_len=64"),
    (dict(seq_len=36, cp=4), r"sequence length 36 .* pad or pack sequences to a multiple of 8"),
    (dict(seq_len=30, cp=4, load_balance=False), r"sequence length 30 .* multiple of 4"),
    (dict(cp=0), r"cp=0 is invalid"),
])
def test_validate_cp_errors(args, match):
    full = dict(cp=2, kernel="ring", n_heads=4, seq_len=32, max_seq_len=64) | args
    with pytest.raises(ValueError, match=match):
        validate_cp(**full)


def test_validate_cp_accepts_a_good_plan():
    validate_cp(4, "ulysses", n_heads=8, seq_len=64, max_seq_len=64)
    validate_cp(4, "ring", n_heads=3, seq_len=36, max_seq_len=64, load_balance=False)


def test_shard_rejects_uneven_length():
    with pytest.raises(ValueError, match=r"sequence length 10 .* multiple of 4"):
        shard_for_context_parallel(torch.zeros(10), 0, 0, 2, load_balance=True)


def test_unknown_kernel_rejected_at_construction():
    with pytest.raises(ValueError, match="'flash' is unknown"):
        ContextParallelAttention(None, "flash")


# ---------------------------------------------------------------------------------------------
# pieces one at a time, no processes needed

SCALE = 0.3


def _dense_reference(q, k, v, visible, scale=SCALE):
    """Float64 attention and log-sum-exp of q over k/v (GQA heads repeated) under a (Sq, Sk)
    visibility mask: the score matrix is built in full, so only for tiny shapes."""
    rep = q.shape[1] // k.shape[1]
    q, k, v = q.double(), k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1)
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, -1) @ v, scores.logsumexp(-1)


def _randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=g)


@pytest.mark.parametrize("dv", [8, 4])  # equal head dims: the fused CPU kernel; others: fallback
@pytest.mark.parametrize("causal", [True, False])
def test_piece_forward_gives_attention_and_its_lse(dv, causal):
    g = torch.Generator().manual_seed(3)
    sq, sk = (6, 6) if causal else (5, 9)
    q, k, v = _randn(g, 2, 4, sq, 8), _randn(g, 2, 2, sk, 8), _randn(g, 2, 2, sk, dv)
    assert cp_kernels._kernel_for(q, k, v) == ("cpu" if dv == 8 else "math")
    out, lse, _ = cp_kernels._piece_forward(q, k, v, causal, SCALE)
    visible = torch.ones(sq, sk, dtype=torch.bool)
    ref_out, ref_lse = _dense_reference(q, k, v, visible.tril() if causal else visible)
    assert_close(out, ref_out, name="out")
    assert_close(lse, ref_lse, name="lse")


def _record_scores(monkeypatch) -> list[tuple[int, int]]:
    dims = []
    real = cp_kernels._scores

    def scores(*args):
        result = real(*args)
        dims.append(tuple(result.shape[-2:]))
        return result

    monkeypatch.setattr(cp_kernels, "_scores", scores)
    return dims


def _attend_blocks(pieces, q, blocks, dout):
    """Forward over (piece, (k, v)) pairs merged by lse, then every piece's backward against the
    merged output and lse; K/V gradients per block."""
    out, lse = cp_kernels._accumulators(q, blocks[0][1].shape[-1])
    saved = [cp_kernels._attend_piece(p, q, k, v, SCALE, out, lse)
             for p, (k, v) in zip(pieces, blocks)]
    dq = torch.zeros_like(q)
    dkv = []
    for piece, state, (k, v) in zip(pieces, saved, blocks):
        dq_p, dk_p, dv_p = cp_kernels._piece_grads(piece, state, dout, q, k, v, out, lse, SCALE)
        dq[..., piece.rows, :] += dq_p
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        dk[..., piece.cols, :] += dk_p
        dv[..., piece.cols, :] += dv_p
        dkv.append((dk, dv))
    return out, lse, dq, dkv


@pytest.mark.parametrize("path", ["fused", "fallback", "explicit mask"])
def test_pieces_merged_by_lse_have_exact_gradients(path, monkeypatch):
    """Queries against an earlier, all-visible block and against their own block under the
    causal mask: two pieces merged by lse, each piece's backward given the merged output and
    lse. Together they are the whole attention, forward and backward; the fallback (forced,
    with 3 x 3 tiles that do not line up with the blocks) never scores more than a tile."""
    tile, dims = 3, _record_scores(monkeypatch)
    if path != "fused":
        monkeypatch.setattr(cp_kernels, "_kernel_for", lambda q, k, v: "math")
        monkeypatch.setattr(cp_kernels, "_MATH_TILE", tile)
    g = torch.Generator().manual_seed(5)
    s, early = 7, 5
    q, dout = _randn(g, 2, 4, s, 8), _randn(g, 2, 4, s, 8)
    k, v = _randn(g, 2, 2, early + s, 8), _randn(g, 2, 2, early + s, 8)
    own = torch.ones(s, s, dtype=torch.bool).tril()
    own_piece = (cp_kernels._Piece(slice(0, s), slice(0, s), mask=own) if path == "explicit mask"
                 else cp_kernels._Piece(slice(0, s), slice(0, s), causal=True))
    pieces = [cp_kernels._Piece(slice(0, s), slice(0, early)), own_piece]
    blocks = [(k[..., :early, :], v[..., :early, :]), (k[..., early:, :], v[..., early:, :])]
    out, lse, dq, dkv = _attend_blocks(pieces, q, blocks, dout)

    qr, kr, vr = (t.double().requires_grad_() for t in (q, k, v))
    visible = torch.cat([torch.ones(s, early, dtype=torch.bool), own], dim=1)
    ref_out, ref_lse = _dense_reference(qr, kr, vr, visible)
    (ref_out * dout.double()).sum().backward()
    assert_close(out, ref_out, name="out")
    assert_close(lse, ref_lse, name="lse")
    assert_close(dq, qr.grad, name="dq")
    assert_close(torch.cat([dk for dk, _ in dkv], dim=2), kr.grad, name="dk")
    assert_close(torch.cat([dv for _, dv in dkv], dim=2), vr.grad, name="dv")
    if path == "fused":
        assert dims == []
    else:
        assert dims and max(max(d) for d in dims) <= tile
