"""Documents: packing with exact per-document masks, the prepare command, training on its output,
and one clear line for each bad input."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dist_utils import assert_close

from lightning_attn_parallel.data.documents import PADDING_ID, pack_documents, packed_window
from lightning_attn_parallel.models import ModelConfig, build_model
from lightning_attn_parallel.models.loss import IGNORE_INDEX

ROOT = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------------- exactness

LLAMA = dict(family="llama", vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
             ffn_dim=48, max_seq_len=64)
MLA = dict(family="deepseek", attention="mla", vocab_size=64, d_model=32, n_layers=2, n_heads=4,
           kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, ffn_dim=48,
           max_seq_len=64)

# Token counts of documents (EOS included: a document of n tokens gives n - 1 predictions).
CASES = {
    "several documents with padding": [7, 3, 12, 5],
    "documents of length 1": [2, 2, 9, 2, 2],
    "one long document filling the window": [25],
    "a document longer than the window": [40, 6],
}
SEQ_LEN = 24


def _documents(lengths: list[int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    gen = np.random.default_rng(seed)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return gen.integers(1, 64, size=int(offsets[-1])), offsets


def _token_losses(model, input_ids, labels, positions=None, document_ids=None) -> torch.Tensor:
    logits = model.logits(input_ids, positions, document_ids)
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="none").view(labels.shape)


def _grads(model) -> torch.Tensor:
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad()
    return grads


@pytest.mark.parametrize("model_kind", ["llama", "mla"])
@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("case", list(CASES))
def test_packed_window_equals_each_document_alone(case, dtype, rtol, model_kind, one_thread):
    torch.manual_seed(0)
    model = build_model(ModelConfig(**(LLAMA if model_kind == "llama" else MLA))).to(dtype)
    tokens, offsets = _documents(CASES[case])
    packing = pack_documents(offsets, SEQ_LEN)
    windows = [packed_window(tokens, packing, w, pad_id=0) for w in range(packing.num_windows)]
    batch = {k: torch.stack([w[k] for w in windows]) for k in windows[0]}

    packed = _token_losses(model, batch["input_ids"], batch["labels"], batch["positions"],
                           batch["document_ids"])
    packed.sum().backward()
    packed_grads = _grads(model)

    # Reference: every piece (a document, or a seq_len-long part of a longer one) run alone,
    # plain causal attention, positions 0..n-1.
    alone, alone_grad = [], None
    for p in packing.order:
        start, n = int(packing.offset[p]), int(packing.length[p])
        piece = torch.as_tensor(tokens[start:start + n + 1], dtype=torch.long)
        losses = _token_losses(model, piece[None, :-1], piece[None, 1:])
        losses.sum().backward()
        alone.append(losses.detach().flatten())
    alone_grad = _grads(model)

    counted = batch["labels"] != IGNORE_INDEX
    got = packed.detach()[counted]  # windows in order, documents in order within each
    assert int(counted.sum()) == sum(len(a) for a in alone) == int(offsets[-1]) - len(offsets) + 1
    assert_close(got, torch.cat(alone), rtol, name=f"{case}: per-token losses")
    assert_close(packed_grads, alone_grad, rtol, name=f"{case}: gradients")


def test_padding_is_ignored_and_positions_restart():
    tokens, offsets = _documents([4, 2, 3])
    packing = pack_documents(offsets, 10)
    assert packing.num_windows == 1
    w = packed_window(tokens, packing, 0, pad_id=0)
    # best-fit decreasing keeps documents in corpus order inside a window
    assert w["positions"].tolist() == [0, 1, 2, 0, 0, 1, 0, 1, 2, 3]
    assert w["document_ids"].tolist() == [0, 0, 0, 1, 2, 2] + [PADDING_ID] * 4
    assert (w["labels"][6:] == IGNORE_INDEX).all() and (w["labels"][:6] != IGNORE_INDEX).all()
    # labels never cross a document: the last label of each document is its EOS (tokens[end-1])
    assert w["labels"][2] == tokens[3] and w["labels"][3] == tokens[5]


def test_packing_fills_windows_and_padding_mode_reports_waste():
    lengths = np.random.default_rng(1).pareto(1.2, 400).astype(int) * 20 + 2
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    packed, padded = pack_documents(offsets, 256), pack_documents(offsets, 256, pack=False)
    useful = int((lengths - 1).sum())
    for packing in (packed, padded):
        assert int(packing.length.sum()) == useful  # every prediction is in exactly one window
        assert (packing.length <= 256).all()
        sizes = np.add.reduceat(packing.length[packing.order], packing.starts[:-1])
        assert (sizes <= 256).all()
    assert packed.stats(offsets)["packing_efficiency"] > 0.95
    assert padded.stats(offsets)["packing_efficiency"] < 0.5
    assert padded.stats(offsets)["wasted_tokens"] == padded.num_windows * 256 - useful
