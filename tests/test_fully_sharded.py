"""FSDP2, HSDP and TP x FSDP equal one process on the global batch; accumulation sends nothing.

One 4-process spawn runs every distributed case: each rank trains on its slice of a global batch
(mean loss over its slice, 2 micro-batches per step with gradient sync off on the first), and
the parameters after two AdamW steps (fp64; fp32 checks loss and gradients) equal a single
process on the whole batch.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.utils._python_dispatch import TorchDispatchMode

from dist_utils import assert_close, run_distributed
from lightning_attn_parallel.parallel.clipping import clip_grad_norm_
from lightning_attn_parallel.parallel.fully_sharded import (
    apply_fully_sharded,
    mixed_precision_for,
    set_gradient_sync,
)
from lightning_attn_parallel.parallel.tensor_parallel import apply_tensor_parallel
from test_tensor_parallel import RTOL, check_parity, make_batch, mean_loss, tiny_model

ROWS = 2  # rows per data-parallel rank and micro-batch


def global_and_local_batches(dp_rank: int, dp: int, steps: int) -> tuple[list, list]:
    """Per step, 2 micro-batches of dp * ROWS rows, and this rank's ROWS-row slice of each."""
    global_steps = [[make_batch(dp * ROWS, seed=10 * step + m) for m in range(2)] for step in range(steps)]
    rows = slice(dp_rank * ROWS, (dp_rank + 1) * ROWS)
    local_steps = [[(t[rows], y[rows]) for t, y in micro] for micro in global_steps]
    return global_steps, local_steps


def _sharded_case(name: str, dp_rank: int, dp: int, shard) -> None:
    """`shard(model)` parallelizes a copy of the reference in place."""
    for dtype, steps in ((torch.float32, 1), (torch.float64, 2)):
        reference = tiny_model(dtype)
        model = copy.deepcopy(reference)
        shard(model)
        global_steps, local_steps = global_and_local_batches(dp_rank, dp, steps)
        check_parity(model, reference, local_steps, RTOL[dtype], f"{name} {dtype}",
                     ref_batches=global_steps, compare_params=dtype == torch.float64,
                     set_sync=set_gradient_sync, average_loss=True)


class _CountCollectives(TorchDispatchMode):
    """Counts the reduce-scatters and all-reduces that reach the dispatcher (c10d or functional)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts = {"reduce_scatter": 0, "all_reduce": 0}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.replace("allreduce", "all_reduce")
        for kind in self.counts:
            self.counts[kind] += kind in name
        return func(*args, **(kwargs or {}))


def _collective_counts(model, tokens, targets, sync: bool) -> dict[str, int]:
    set_gradient_sync(model, sync)
    loss = mean_loss(model, tokens, targets)
    with _CountCollectives() as comm:
        loss.backward()
    return comm.counts


def _count_case(mesh) -> list[dict[str, int]]:
    model = apply_fully_sharded(tiny_model(), mesh)
    tokens, targets = make_batch(ROWS, seed=0)
    return [_collective_counts(model, tokens, targets, sync) for sync in (False, True)]


def _clip_case(mesh) -> None:
    """TP x FSDP puts parameters on two meshes, (dp_shard, tp) and dp_shard: clip across both."""
    reference = tiny_model()
    model = copy.deepcopy(reference)
    apply_fully_sharded(apply_tensor_parallel(model, mesh["tp"]), mesh["dp_shard"])
    dp_rank = mesh.get_local_rank("dp_shard")
    global_steps, local_steps = global_and_local_batches(dp_rank, 2, 1)
    mean_loss(model, *local_steps[0][0]).backward()
    mean_loss(reference, *global_steps[0][0]).backward()
    expected = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm=0.1)
    assert expected > 0.1, "the gradients must be large enough to be clipped"
    total = clip_grad_norm_(model.parameters(), max_norm=0.1)
    assert_close(total, expected, name="total norm")
    for (n, p), ref in zip(model.named_parameters(), reference.parameters()):
        assert_close(p.grad.full_tensor(), ref.grad, name=f"clipped grad {n}")


def _mixed_precision_case(mesh) -> None:
    policy = mixed_precision_for("bf16-mixed")
    reference = tiny_model()
    model = apply_fully_sharded(copy.deepcopy(reference), mesh, policy.param_dtype, policy.reduce_dtype)
    tokens, targets = make_batch(ROWS, seed=mesh.get_local_rank())
    loss = mean_loss(model, tokens, targets)
    loss.backward()
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
    assert_close(loss, mean_loss(reference, tokens, targets), rtol=2e-2, name="bf16 loss")


def _fsdp_worker(rank: int, world: int) -> dict:
    fsdp = init_device_mesh("cpu", (4,), mesh_dim_names=("dp_shard",))
    hsdp = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_replicate", "dp_shard"))
    tp_fsdp = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_shard", "tp"))
    _sharded_case("FSDP dp_shard=4", rank, 4, lambda m: apply_fully_sharded(m, fsdp))
    _sharded_case("HSDP 2x2", rank, 4, lambda m: apply_fully_sharded(m, hsdp))
    _sharded_case("TP x FSDP 2x2 sequence-parallel", tp_fsdp.get_local_rank("dp_shard"), 2,
                  lambda m: apply_fully_sharded(apply_tensor_parallel(m, tp_fsdp["tp"], True),
                                                tp_fsdp["dp_shard"]))
    _clip_case(tp_fsdp)
    _mixed_precision_case(fsdp)
    return {"fsdp": _count_case(fsdp), "hsdp": _count_case(hsdp)}


def test_fully_sharded_parity_and_accumulation_traffic():
    counts = run_distributed(_fsdp_worker, 4)
    groups = tiny_model().config.n_layers + 1  # one FSDP unit per block, plus the root
    for rank_counts in counts:
        (fsdp_off, fsdp_on), (hsdp_off, hsdp_on) = rank_counts["fsdp"], rank_counts["hsdp"]
        assert fsdp_off == {"reduce_scatter": 0, "all_reduce": 0}, fsdp_off
        assert fsdp_on == {"reduce_scatter": groups, "all_reduce": 0}, fsdp_on
        assert hsdp_off == {"reduce_scatter": 0, "all_reduce": 0}, hsdp_off
        assert hsdp_on == {"reduce_scatter": groups, "all_reduce": groups}, hsdp_on


def test_mixed_precision_for_lightning_strings():
    assert mixed_precision_for("bf16-mixed").param_dtype is torch.bfloat16
    assert mixed_precision_for("bf16-mixed").reduce_dtype is torch.float32
    assert mixed_precision_for("16-mixed").param_dtype is torch.float16
    for precision in ("32-true", "bf16-true", "16-true"):
        assert mixed_precision_for(precision).param_dtype is None
    with pytest.raises(ValueError, match="precision='transformer-engine'.*bf16-mixed"):
        mixed_precision_for("transformer-engine")
