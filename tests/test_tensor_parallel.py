"""Tensor parallelism is exact: loss, gradients and AdamW steps equal one process.

All cases run in one 4-process spawn: tp=4 (KV heads replicated, since n_kv_heads=2 < tp) with
and without sequence parallelism; 2 replicas x tp=2 (KV heads sharded) with sequence
parallelism, and without it but with tied embeddings; DeepSeek models (MLA split by heads, the
MoE ffn left replicated) at tp=2 with sequence parallelism and at tp=4 with a q latent; the
vocabulary-parallel loss; and the error cases. The helpers here are shared by the FSDP and
checkpoint tests.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from dist_utils import assert_close, run_distributed
from lightning_attn_parallel.models import ModelConfig, build_model
from lightning_attn_parallel.models.loss import cross_entropy_sum
from lightning_attn_parallel.parallel.vocab_parallel_loss import VocabParallelLoss
from lightning_attn_parallel.parallel.tensor_parallel import (
    apply_tensor_parallel,
)

TINY = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=32)
SEQ = 8
DEEPSEEK = dict(family="deepseek", attention="mla", kv_lora_rank=16, qk_nope_head_dim=8,
                qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4, n_shared_experts=1,
                moe_top_k=2, moe_ffn_dim=32, first_k_dense_replace=1)


def tiny_model(dtype: torch.dtype = torch.float32, **overrides):
    torch.manual_seed(0)
    return build_model(ModelConfig(**{**TINY, **overrides})).to(dtype)


def make_batch(rows: int, seed: int, seq: int = SEQ) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, TINY["vocab_size"], (rows, seq + 1), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


def mean_loss(model, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean token loss through the package's loss, the LM head applied to the final hidden states."""
    total, count = cross_entropy_sum(model(tokens), model.output, targets, kernel=model.loss_kernel)
    return total / count


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def full_params(model) -> dict[str, torch.Tensor]:
    return {n: full(p.detach()).clone() for n, p in model.named_parameters()}


RTOL = {torch.float32: 1e-5, torch.float64: 1e-10}
"""fp32 checks the loss and gradients of one step at the spec's tolerance. Parameters after
several AdamW steps are compared in fp64, where any parallelism error stands out by orders of
magnitude: in fp32 Adam's first update, lr * g / (|g| + eps), flips sign on near-zero gradients
whose last bits differ, which moves parameters by 2 lr even between two exact methods."""


def train(model, batches, lr: float = 1e-2, set_sync=None, average_loss: bool = False,
          on_first_backward=None) -> list[float]:
    """AdamW steps; each step is a list of micro-batches whose mean losses are averaged.

    `set_sync(model, enabled)` runs before each micro-batch, enabled on the last one only;
    `average_loss` averages each step's loss over all ranks (each rank saw its own slice).
    """
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    losses = []
    for step, micro_batches in enumerate(batches):
        step_loss = torch.zeros((), dtype=torch.float64)
        for i, (tokens, targets) in enumerate(micro_batches):
            if set_sync is not None:
                set_sync(model, i == len(micro_batches) - 1)
            loss = mean_loss(model, tokens, targets) / len(micro_batches)
            loss.backward()
            step_loss += loss.detach()
        if average_loss:
            dist.all_reduce(step_loss, op=dist.ReduceOp.AVG)
        if step == 0 and on_first_backward is not None:
            on_first_backward(model)
        opt.step()
        opt.zero_grad()
        losses.append(step_loss.item())
    return losses


def check_parity(model, reference, batches, rtol: float, name: str, ref_batches=None,
                 compare_params: bool = True, **train_kwargs) -> None:
    """Train both (the reference on `ref_batches`, default the same batches): per-step losses,
    first-step gradients and (if `compare_params`) final parameters match."""
    ref_grads, grads = {}, {}
    ref_losses = train(reference, ref_batches or batches, on_first_backward=lambda m: ref_grads.update(
        {n: p.grad.clone() for n, p in m.named_parameters()}))
    losses = train(model, batches, **train_kwargs, on_first_backward=lambda m: grads.update(
        {n: full(p.grad).clone() for n, p in m.named_parameters()}))
    # the package's loss upcasts logits to fp32 whatever the model dtype: fp32 tolerance
    assert_close(torch.tensor(losses), torch.tensor(ref_losses), RTOL[torch.float32],
                 name=f"{name} losses")
    for n, g in ref_grads.items():
        assert_close(grads[n], g, rtol, name=f"{name} grad {n}")
    if not compare_params:
        return
    params = full_params(model)
    for n, p in reference.named_parameters():
        assert_close(params[n], p, rtol, name=f"{name} param {n}")


def step_batches(dp_rank: int, steps: int, rows: int = 2) -> list:
    """`steps` steps of 2 micro-batches each, different for every data-parallel rank."""
    return [[make_batch(rows, seed=100 * dp_rank + 10 * step + m) for m in range(2)]
            for step in range(steps)]


def tp_replicated_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of every parameter tensor parallelism left as a plain tensor."""
    return [(name, p) for name, p in model.named_parameters() if not isinstance(p, DTensor)]


def _tp_case(tp_mesh, dp_rank: int, sequence_parallel: bool, **overrides) -> None:
    for dtype, steps in ((torch.float32, 1), (torch.float64, 2)):
        name = f"tp={tp_mesh.size()} sp={sequence_parallel} {dtype} {overrides}"
        reference = tiny_model(dtype, **overrides)
        model = apply_tensor_parallel(copy.deepcopy(reference), tp_mesh, sequence_parallel)
        check_parity(model, reference, step_batches(dp_rank, steps), RTOL[dtype], name,
                     compare_params=dtype == torch.float64)
    mean_loss(model, *make_batch(2, seed=0)).backward()  # replicated params get summed grads
    assert all(p.grad.placements == p.placements for p in model.parameters() if isinstance(p, DTensor))
    plain = tp_replicated_parameters(model)
    assert "blocks.0.ffn.w1.weight" not in {n for n, _ in plain}  # dense MLPs are split
    if overrides.get("attention") == "mla":  # per-head projections split, latents whole
        names = {n for n, _ in plain}
        assert "blocks.0.attention.wkv_b.weight" not in names and "blocks.0.attention.wo.weight" not in names
        assert "blocks.0.attention.wkv_a.weight" in names
    tied = overrides.get("tie_embeddings", False)
    # the head is vocabulary-parallel unless tied to the (then replicated) embedding
    assert any(p is model.output.weight for _, p in plain) == tied
    if not tied:
        vocab, tp = TINY["vocab_size"], tp_mesh.size()
        assert model.output.weight.to_local().shape[0] == vocab // tp
        logits = model.logits(make_batch(2, seed=0)[0])
        assert logits.to_local().shape[-1] == vocab // tp  # each rank holds 1/tp of the logits


def _vocab_parallel_loss_case(tp_mesh) -> None:
    """The vocabulary-parallel loss equals F.cross_entropy on the whole logits: uneven shards
    (30 words over 4 ranks: 8, 8, 8, 6), ignored targets, targets on every shard, and the
    chunked path through a column-parallel head; loss and the gradients of head and input."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    torch.manual_seed(0)
    vocab, d, tokens = 30, 16, 13
    reference = torch.nn.Linear(d, vocab, bias=False).double()
    head = parallelize_module(copy.deepcopy(reference), tp_mesh, ColwiseParallel(
        input_layouts=Replicate(), output_layouts=Shard(-1), use_local_output=False))
    hidden = torch.randn(tokens, d, dtype=torch.float64)
    targets = torch.randint(0, vocab, (tokens,))
    targets[[2, 7]] = -100  # ignored
    targets[:4] = torch.tensor([0, 9, -100, 29])  # first and last shard
    for chunk in (None, 4):
        ref_hidden, par_hidden = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
        expected = torch.nn.functional.cross_entropy(reference(ref_hidden).float(), targets,
                                                     ignore_index=-100, reduction="sum")
        total, count = cross_entropy_sum(par_hidden, head, targets, chunk_tokens=chunk,
                                         kernel=VocabParallelLoss())
        assert int(count) == tokens - 2
        assert_close(total, expected, 1e-6, name=f"vocab-parallel loss chunk={chunk}")
        expected.backward()
        total.backward()
        assert_close(par_hidden.grad, ref_hidden.grad, 1e-6, name=f"input grad chunk={chunk}")
        assert_close(head.weight.grad.full_tensor(), reference.weight.grad, 1e-6,
                     name=f"head grad chunk={chunk}")
        reference.zero_grad()
        head.zero_grad()


def _error_cases(tp4, tp2) -> list[str]:
    messages = []
    for overrides, tp_mesh in ((dict(d_model=48, n_heads=6, n_kv_heads=6), tp4),
                               (dict(d_model=48, n_heads=6, n_kv_heads=3), tp2)):
        with pytest.raises(ValueError) as info:
            apply_tensor_parallel(tiny_model(**overrides), tp_mesh)
        messages.append(str(info.value))
    model = apply_tensor_parallel(tiny_model(), tp4, sequence_parallel=True)
    with pytest.raises(ValueError) as info:
        model(make_batch(1, seed=0, seq=6)[0])
    messages.append(str(info.value))
    return messages


def _tp_worker(rank: int, world: int) -> list[str]:
    tp4 = init_device_mesh("cpu", (4,))
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    dp_rank = mesh.get_local_rank("dp")
    for sp in (False, True):
        _tp_case(tp4, 0, sp)  # n_kv_heads=2 < tp=4: KV projections replicated
    # two replicas, each tp=2 with KV heads sharded
    _tp_case(mesh["tp"], dp_rank, True)
    _tp_case(mesh["tp"], dp_rank, False, tie_embeddings=True)
    # MLA attention split by heads (latents whole); the MoE ffn has no handler and stays
    # replicated; the dense ffn is split. With sequence parallelism, and with a q latent at tp=4.
    _tp_case(mesh["tp"], dp_rank, True, **DEEPSEEK)
    _tp_case(tp4, 0, False, **DEEPSEEK, q_lora_rank=16)
    _vocab_parallel_loss_case(tp4)
    return _error_cases(tp4, mesh["tp"])


def test_tensor_parallel_parity_and_errors():
    messages = run_distributed(_tp_worker, 4)[0]
    assert "tp=4 does not divide n_heads=6" in messages[0]
    assert "n_kv_heads=3" in messages[1] and "tp=2" in messages[1] and "choose tp among" in messages[1]
    assert "sequence length (6)" in messages[2] and "tp=4" in messages[2]
