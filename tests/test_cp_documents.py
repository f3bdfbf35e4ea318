"""Context parallelism over packed documents is exact, balanced, and picks its degree per batch.

- Every CP kernel (all-gather, ring, Ulysses) at cp=2 and cp=4, fp32 and fp64: attention over a
  packed window equals attention of each document run alone (outputs and q/k/v gradients), for
  documents crossing chunk boundaries, documents of length 1, a window of one document, rows of
  a batch with different documents, under head-tail and under the document-balanced layout.
- A model: per-token losses and parameter gradients of a packed window under CP equal those of
  each document run through the model alone, and those of the local document-masked kernel.
- Balance: on a seeded heavy-tailed mix, every window's attention work is within 5% of the mean
  on every rank, tokens are equal, documents shorter than the threshold stay whole.
- Dynamic degree: micro-batches at degree 4, 2 and 1 on the same 4 ranks give the losses and
  gradients of one process.

One spawned world of 4 runs every distributed case (cp=2 runs on both halves of it).
"""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dist_utils import assert_close, run_distributed
from lightning_attn_parallel.mesh import groups_along, new_groups
from lightning_attn_parallel.models import ModelConfig, build_model
from lightning_attn_parallel.models.loss import IGNORE_INDEX
from lightning_attn_parallel.parallel.context_parallel import (ContextParallelAttention,
                                                               apply_context_parallel)
from lightning_attn_parallel.parallel.cp_batch import ContextParallelBatcher
from lightning_attn_parallel.parallel.cp_documents import (
    balanced_document_chunks, choose_cp_degree, document_spans, head_tail_runs, layout_index,
    longest_document, rank_work)
from lightning_attn_parallel.step import StepBatch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from cp_document_balance import balance_table, document_mix, pack  # noqa: E402

KERNELS = ("allgather", "ring", "ulysses")
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
SEQ = 48
# Rows of document lengths (each sums to SEQ): crossing chunk boundaries, length 1, one document.
ROWS = {
    "crossing": [5, 1, 11, 1, 3, 7, 4, 9, 7],
    "ones": [1, 1, 20, 1, 1, 1, 23],
    "one_document": [48],
    "two_long": [30, 18],
}
CASES = [  # (rows of the batch, layout)
    (("crossing", "one_document"), "head_tail"),
    (("ones", "crossing"), "balanced"),
    (("one_document",), "balanced"),
    (("two_long", "ones"), "balanced"),
]
MODEL = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
             max_seq_len=SEQ)


def _document_ids(names) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S) document ids and per-document positions."""
    ids, pos = [], []
    for name in names:
        ids.append(torch.cat([torch.full((n,), d) for d, n in enumerate(ROWS[name])]))
        pos.append(torch.cat([torch.arange(n) for n in ROWS[name]]))
    return torch.stack(ids), torch.stack(pos)


def _layout(docs: torch.Tensor, layout: str, cp: int) -> torch.Tensor:
    """(B, S) permutation: rank r holds columns [r*S/cp, (r+1)*S/cp)."""
    if layout == "balanced":
        return layout_index(docs, cp, min_split_len=4)
    index = [i for runs in head_tail_runs(SEQ, cp) for a, b in runs for i in range(a, b)]
    return torch.tensor(index).expand_as(docs)


def _qkv(batch: int, n_heads: int, n_kv: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    shapes = [(batch, n_heads, SEQ, 8), (batch, n_kv, SEQ, 8), (batch, n_kv, SEQ, 16),
              (batch, n_heads, SEQ, 16)]
    return [torch.randn(s, generator=g, dtype=dtype) for s in shapes]


def _per_document_reference(q, k, v, dout, docs):
    """Each document alone through causal SDPA; outputs and gradients at its window indices."""
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    outs = []
    for b, row in enumerate(docs.tolist()):
        parts = []
        for start, stop in document_spans(row):
            sl = slice(start, stop)
            parts.append(F.scaled_dot_product_attention(
                q[b:b + 1, :, sl], k[b:b + 1, :, sl].repeat_interleave(rep, 1),
                v[b:b + 1, :, sl].repeat_interleave(rep, 1), is_causal=True))
        outs.append(torch.cat(parts, dim=2))
    out = torch.cat(outs)
    (out * dout).sum().backward()
    return [out.detach(), q.grad, k.grad, v.grad]


def _kernel_cases():
    for cp in (2, 4):
        for kernel in KERNELS:
            for dtype in (torch.float32, torch.float64):
                for i, (rows, layout) in enumerate(CASES):
                    yield cp, kernel, dtype, rows, layout, 1000 * cp + i


def _shard(t: torch.Tensor, index: torch.Tensor, rank: int, cp: int) -> torch.Tensor:
    """Rank `rank`'s tokens of t (B, H, S, D) or (B, S) under the permutation."""
    cols = index[:, rank * SEQ // cp:(rank + 1) * SEQ // cp]
    if t.dim() == 2:
        return t.gather(1, cols)
    return t.gather(2, cols[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3]))


def _kernel_worker(rank: int, cp: int, group, kernel: str, dtype, rows, layout, seed):
    docs, pos = _document_ids(rows)
    q, k, v, dout = _qkv(len(rows), 4, 2, dtype, seed)
    index = _layout(docs, layout, cp)
    attn = ContextParallelAttention(group, kernel)
    local = [_shard(t, index, rank, cp).clone().requires_grad_() for t in (q, k, v)]
    out = attn(*local, _shard(pos, index, rank, cp), document_ids=_shard(docs, index, rank, cp))
    (out * _shard(dout, index, rank, cp)).sum().backward()
    return [out.detach()] + [t.grad for t in local]


def _unshard(shards, index, cp):
    """Reassemble (B, H, S, D) tensors from every rank's shard under the permutation."""
    full = torch.zeros(*shards[0].shape[:2], SEQ, shards[0].shape[3], dtype=shards[0].dtype)
    for rank, shard in enumerate(shards):
        cols = index[:, rank * SEQ // cp:(rank + 1) * SEQ // cp]
        full.scatter_(2, cols[:, None, :, None].expand_as(shard), shard)
    return full


# ---------------------------------------------------------------------------------------------
# a model: per-token losses and gradients


def _model(dtype):
    torch.manual_seed(0)
    return build_model(ModelConfig(**MODEL)).to(dtype)


def _tokens(rows):
    g = torch.Generator().manual_seed(7)
    docs, pos = _document_ids(rows)
    return torch.randint(0, MODEL["vocab_size"], docs.shape, generator=g), docs, pos


def _labels(tokens, docs):
    """Next token within the document; the last token of each document predicts nothing."""
    labels = torch.full_like(tokens, IGNORE_INDEX)
    same = docs[:, 1:] == docs[:, :-1]
    labels[:, :-1] = torch.where(same, tokens[:, 1:], torch.full_like(tokens[:, 1:], IGNORE_INDEX))
    return labels


def _token_losses(model, tokens, labels, positions, docs):
    logits = model.logits(tokens, positions, docs)
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none",
                           ignore_index=IGNORE_INDEX).view(labels.shape)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _model_reference(rows, dtype, packed: bool):
    """Per-token losses and gradients of their sum: each document alone, or the packed window
    through the local document-masked kernel."""
    model = _model(dtype)
    tokens, docs, pos = _tokens(rows)
    labels = _labels(tokens, docs)
    if packed:
        losses = _token_losses(model, tokens, labels, pos, docs)
    else:
        losses = torch.zeros(tokens.shape, dtype=dtype)
        for b, row in enumerate(docs.tolist()):
            for start, stop in document_spans(row):
                sl = slice(start, stop)
                losses[b, sl] = _token_losses(model, tokens[b:b + 1, sl], labels[b:b + 1, sl],
                                              None, None)[0]
    losses.sum().backward()
    return losses.detach(), _grads(model)


def _model_worker(rank, cp, group, kernel, dtype, rows):
    model = apply_context_parallel(_model(dtype), group, kernel)
    tokens, docs, pos = _tokens(rows)
    labels = _labels(tokens, docs)
    index = _layout(docs, "balanced", cp)
    shard = lambda t: _shard(t, index, rank, cp)  # noqa: E731
    losses = _token_losses(model, shard(tokens), shard(labels), shard(pos), shard(docs))
    losses.sum().backward()
    grads = _grads(model)
    for g in grads.values():
        dist.all_reduce(g, group=group)
    return losses.detach(), grads


# ---------------------------------------------------------------------------------------------
# dynamic degree through the batcher


DEGREE_ROWS = [  # micro-batches of 4 rows; min_seq_len 12: longest 48 -> 4, 20 -> 2, 9 -> 1
    ("one_document", "two_long", "crossing", "ones"),
    ("ones", "ones", "crossing", "crossing"),
    ("crossing", "crossing", "crossing", "crossing"),
]
DEGREE_MIN_SEQ_LEN = 12


def _batch(rows):
    tokens, docs, pos = _tokens(rows)
    return {"input_ids": tokens, "labels": _labels(tokens, docs), "positions": pos,
            "document_ids": docs}


def _batch_loss(model, batch):
    """The module's loss: summed token loss / num_tokens * loss_scale."""
    step = StepBatch.of(batch)
    logits = model.logits(step.input_ids, step.positions, step.document_ids)
    loss_sum = F.cross_entropy(logits.flatten(0, 1), step.labels.flatten(),
                               ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum / step.loss_denominator((step.labels != IGNORE_INDEX).sum()) * step.loss_scale


def _degree_worker(rank, world, kernel):
    model = apply_context_parallel(_model(torch.float64), dist.group.WORLD, kernel)
    mesh = torch.arange(world).view(1, 1, world, 1)
    meshes = SimpleNamespace(dense=SimpleNamespace(mesh=mesh), group=lambda dim: dist.group.WORLD,
                             coordinate=lambda dim: rank)
    plan = SimpleNamespace(cp=world, cp_min_seq_len=DEGREE_MIN_SEQ_LEN, cp_load_balance=True,
                           cp_kernel=kernel, tp=1)
    batcher = ContextParallelBatcher(model, meshes, plan)
    losses, degrees = [], []
    for rows in DEGREE_ROWS:
        batch = batcher.prepare_batch(_batch(rows))
        loss = _batch_loss(model, batch)
        loss.backward()
        reported = loss.detach() / world
        dist.all_reduce(reported)
        losses.append(reported)
        degrees.append(batcher.last_degree)
    grads = _grads(model)
    for g in grads.values():  # the gradient average over dp x cp (dp = 1)
        dist.all_reduce(g)
        g /= world
    return losses, grads, degrees


# ---------------------------------------------------------------------------------------------
# one spawned world for every distributed case


def _worker(rank, world):
    pairs = groups_along(torch.arange(world).view(2, 2), (1,))
    half = new_groups(pairs)
    results = {}
    for cp, kernel, dtype, rows, layout, seed in _kernel_cases():
        group, r = (half, rank % 2) if cp == 2 else (dist.group.WORLD, rank)
        results[("kernel", cp, kernel, dtype, rows, layout)] = _kernel_worker(
            r, cp, group, kernel, dtype, rows, layout, seed)
    for cp in (2, 4):
        group, r = (half, rank % 2) if cp == 2 else (dist.group.WORLD, rank)
        for kernel in KERNELS:
            results[("model", cp, kernel)] = _model_worker(r, cp, group, kernel, torch.float64,
                                                           ("crossing", "ones"))
    for kernel in ("allgather", "ulysses"):
        results[("degree", kernel)] = _degree_worker(rank, world, kernel)
    return results


@pytest.fixture(scope="module")
def results():
    return run_distributed(_worker, 4)


@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("kernel", KERNELS)
def test_kernels_equal_each_document_alone(results, cp, kernel):
    for case_cp, case_kernel, dtype, rows, layout, seed in _kernel_cases():
        if (case_cp, case_kernel) != (cp, kernel):
            continue
        docs, _ = _document_ids(rows)
        index = _layout(docs, layout, cp)
        expected = _per_document_reference(*_qkv(len(rows), 4, 2, dtype, seed), docs)
        shards = [results[r][("kernel", cp, kernel, dtype, rows, layout)] for r in range(cp)]
        for i, name in enumerate(("out", "dq", "dk", "dv")):
            actual = _unshard([s[i] for s in shards], index, cp)
            assert_close(actual, expected[i], TOL[dtype], f"{kernel} cp={cp} {dtype} {rows} {layout} {name}")


@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("kernel", KERNELS)
def test_model_token_losses_and_grads_equal_each_document_alone(results, cp, kernel):
    rows = ("crossing", "ones")
    alone_losses, alone_grads = _model_reference(rows, torch.float64, packed=False)
    packed_losses, packed_grads = _model_reference(rows, torch.float64, packed=True)
    assert_close(packed_losses, alone_losses, 1e-10, "local document-masked kernel losses")
    for name, g in alone_grads.items():
        assert_close(packed_grads[name], g, 1e-10, f"local kernel grad {name}")
    docs, _ = _document_ids(rows)
    index = _layout(docs, "balanced", cp)
    losses = torch.zeros(docs.shape, dtype=torch.float64)
    for rank in range(cp):
        cols = index[:, rank * SEQ // cp:(rank + 1) * SEQ // cp]
        losses.scatter_(1, cols, results[rank][("model", cp, kernel)][0])
    assert_close(losses, alone_losses, 1e-10, f"{kernel} cp={cp} token losses")
    for name, g in alone_grads.items():
        assert_close(results[0][("model", cp, kernel)][1][name], g, 1e-10, f"{kernel} cp={cp} grad {name}")


@pytest.mark.parametrize("kernel", ["allgather", "ulysses"])
def test_dynamic_degree_equals_one_process(results, kernel):
    model = _model(torch.float64)
    expected = []
    for rows in DEGREE_ROWS:
        loss = _batch_loss(model, _batch(rows))
        loss.backward()
        expected.append(loss.detach())
    grads = _grads(model)
    losses, cp_grads, degrees = results[0][("degree", kernel)]
    for got, want in zip(losses, expected):
        assert_close(got, want, 1e-10, "loss")
    for name, g in grads.items():
        assert_close(cp_grads[name], g, 1e-10, f"grad {name}")
    assert degrees == [4, 2, 1]


# ---------------------------------------------------------------------------------------------
# host-side properties


def test_degree_follows_the_longest_document():
    docs = torch.tensor([[0] * 5 + [1] * 30 + [2] * 13, [0] * 48])
    assert longest_document(docs) == 48
    assert longest_document(docs[:1]) == 30
    assert [choose_cp_degree(n, 8, 100, 8) for n in (99, 100, 199, 200, 399, 400, 5000)] == \
        [1, 2, 2, 4, 4, 8, 8]
    assert choose_cp_degree(10, 8, 100, 2) == 4  # 8/d must divide the 2 rows
    assert choose_cp_degree(150, 6, 100, 6) == 2 and choose_cp_degree(250, 6, 100, 6) == 6


def test_balanced_chunks_on_a_heavy_tailed_mix():
    """Every window of a seeded log-normal mix at 8k-32k, cp=2/4/8: equal tokens, work within 5%
    of the mean on every rank, short documents never cut, every token placed exactly once."""
    for seq_len in (8192, 32768):
        windows = pack(document_mix(seq_len * 8, seed=3), seq_len, 8)
        for cp in (2, 4, 8):
            thr = seq_len // (4 * cp)
            for spans in windows:
                chunks = balanced_document_chunks(spans, cp, thr)
                assert [sum(b - a for a, b in runs) for runs in chunks] == [seq_len // cp] * cp
                assert sorted(i for runs in chunks for a, b in runs for i in range(a, b)) == \
                    list(range(seq_len))
                work = rank_work(chunks, spans)
                assert max(work) / (sum(work) / cp) <= 1.05, (seq_len, cp, spans)
                for d0, d1 in spans:
                    if d1 - d0 < thr:
                        holders = [r for r, runs in enumerate(chunks)
                                   if any(a < d1 and d0 < b for a, b in runs)]
                        assert len(holders) == 1, ((d0, d1), chunks)


def test_head_tail_does_not_balance_documents():
    """The comparison the balance table makes: head-tail's imbalance on the same mix is large."""
    rows = balance_table(seq_lens=(8192,), cps=(4,), n_windows=8, seed=3)
    assert rows[0]["ours_max"] <= 1.05 < rows[0]["head_tail_max"]
