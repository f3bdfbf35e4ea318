"""Gradient clipping by the norm over every rank and mesh equals one process, for the 2-norm and
for norm_type=inf (the max, which a sum of p-th powers over ranks would get wrong).

World 4 on gloo, float64 (relative error < 1e-10): the tiny MoE model parallelized by the
package's own `parallelize` under FSDP2 x ep=2 (experts on the (edp, ep) mesh, dense parameters
on the data mesh), ep=4 with replicated attention (experts on the ep mesh beside plain tensors)
and tp=2 x FSDP2 (parameters on two meshes). Each rank trains on its own rows; the reference is
one process on all of them.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

from dist_utils import assert_close, run_distributed

from lightning_attn_parallel.hardware import ClusterSpec
from lightning_attn_parallel.mesh import build_meshes
from lightning_attn_parallel.models import ModelConfig, build_model
from lightning_attn_parallel.models.loss import cross_entropy_sum
from lightning_attn_parallel.parallel.apply import parallelize
from lightning_attn_parallel.parallel.clipping import clip_grad_norm_
from lightning_attn_parallel.plan import ParallelPlan

MOE = ModelConfig(family="deepseek", attention="mla", vocab_size=64, d_model=32, n_layers=3, n_heads=4,
                  kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, ffn_dim=64,
                  max_seq_len=32, n_routed_experts=8, n_shared_experts=1, moe_top_k=2, moe_ffn_dim=16,
                  first_k_dense_replace=1)
PLANS = {"fsdp2_ep2": dict(dp_shard=2, ep=2), "ep4": dict(ep=4), "tp2_fsdp2": dict(dp_shard=2, tp=2)}
NORMS = (2.0, math.inf)
WORLD, ROWS, SEQ = 4, 2, 8


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(MOE).double()


def _tokens() -> torch.Tensor:
    return torch.randint(0, MOE.vocab_size, (WORLD * ROWS, SEQ + 1), generator=torch.Generator().manual_seed(3))


def _mean_loss(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    hidden = model(tokens[:, :-1])
    total, count = cross_entropy_sum(hidden, model.output, tokens[:, 1:], None, model.loss_kernel)
    return total / count


def _max_norm(norm_type: float) -> float:
    """Below the gradients' norm, so every case clips (the reference checks it)."""
    return 0.5 if norm_type == 2.0 else 0.01


def _clipped(rank: int, plan_kwargs: dict, norm_type: float) -> dict:
    plan = ParallelPlan(**plan_kwargs).resolve(WORLD)
    meshes = build_meshes(plan, "cpu", WORLD)
    model = _model()
    result = parallelize(model, model, plan, meshes, precision="64-true", cluster=ClusterSpec())
    # the global batch split over the data-parallel ranks (tp ranks share their rows)
    rows = _tokens().view(plan.dp, -1, SEQ + 1)[meshes.dp_rank]
    result.gradients.before_backward()
    _mean_loss(model, rows).backward()
    result.gradients.after_backward()
    total = clip_grad_norm_(model.parameters(), _max_norm(norm_type), norm_type)
    grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
             for n, p in model.named_parameters()}
    return {"total": total, "grads": grads}


def _worker(rank: int, world: int) -> dict:
    return {(name, norm): _clipped(rank, plan, norm) for name, plan in PLANS.items() for norm in NORMS}


@pytest.fixture(scope="module")
def results():
    return run_distributed(_worker, WORLD, timeout=600)


@pytest.mark.parametrize("norm_type", NORMS)
@pytest.mark.parametrize("name", list(PLANS))
def test_clipping_over_ranks_equals_one_process(results, name, norm_type):
    reference = _model()
    _mean_loss(reference, _tokens()).backward()
    expected = torch.nn.utils.clip_grad_norm_(reference.parameters(), _max_norm(norm_type), norm_type)
    assert expected > _max_norm(norm_type), "the gradients must be large enough to be clipped"
    for rank, result in enumerate(results):
        r = result[(name, norm_type)]
        assert_close(r["total"], expected, rtol=1e-10, name=f"{name} norm {norm_type} rank {rank} total")
        for n, p in copy.copy(dict(reference.named_parameters())).items():
            assert_close(r["grads"][n], p.grad, rtol=1e-10, name=f"{name} norm {norm_type} rank {rank} {n}")
