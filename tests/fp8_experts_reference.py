"""A CPU stand-in for torchao's fp8 rowwise grouped GEMM that checks torchao's contract.

torchao's kernel runs on sm90 GPUs only. The stand-in asserts everything torchao 0.18 asserts of
its operands (and that the group sizes it cannot check itself are multiples of 16, which its
kernels assume) and then multiplies exactly, in the operands' dtype, with `torch._grouped_mm`
(fp32 runs on the CPU). So a model routed through it proves the plumbing: padding, layouts and
offsets, while the fp8 arithmetic is torchao's, tested on the GPU.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from lightning_attn_parallel.models import deepseek


def contract_checked_grouped_mm(a: torch.Tensor, b_t: torch.Tensor, offs: torch.Tensor,
                                pad_token_groups_for_grouped_mm: bool = True) -> torch.Tensor:
    from torchao.prototype.moe_training.utils import _is_column_major

    assert not pad_token_groups_for_grouped_mm, "torchao 0.18 cannot pad the groups itself"
    assert a.ndim == 2 and b_t.ndim == 3 and a.shape[1] == b_t.shape[1]
    assert a.shape[1] % 16 == 0 and b_t.shape[2] % 16 == 0, (a.shape, b_t.shape)
    assert not _is_column_major(a), "A must be row-major"
    assert _is_column_major(b_t), "B must be column-major"
    assert offs.dtype == torch.int32 and offs.shape == (b_t.shape[0],)
    if not torch.compiler.is_compiling():  # data-dependent checks break a compiled graph
        sizes = torch.diff(offs, prepend=offs.new_zeros(1))
        assert int(offs[-1]) == a.shape[0], "the groups must cover A"
        assert bool((sizes % 16 == 0).all()), f"group sizes {sizes.tolist()} must be multiples of 16"
    return torch._grouped_mm(a, b_t, offs=offs)


@contextlib.contextmanager
def reference_fp8_experts(dtype: torch.dtype = torch.float32) -> Iterator[None]:
    """Route fp8 experts through the stand-in, and let the grouped path run on the CPU in `dtype`."""
    import torchao.prototype.moe_training as moe_training

    saved = moe_training._to_fp8_rowwise_then_scaled_grouped_mm, deepseek._grouped_mm_dtype
    moe_training._to_fp8_rowwise_then_scaled_grouped_mm = contract_checked_grouped_mm
    deepseek._grouped_mm_dtype = lambda x, experts: dtype if experts.use_grouped_mm and x.shape[0] else None
    try:
        yield
    finally:
        moe_training._to_fp8_rowwise_then_scaled_grouped_mm, deepseek._grouped_mm_dtype = saved


@contextlib.contextmanager
def counting_fp8_calls() -> Iterator[list]:
    """Inside `reference_fp8_experts`: the row counts of each call of the fp8 kernel, in order."""
    import torchao.prototype.moe_training as moe_training

    inner, calls = moe_training._to_fp8_rowwise_then_scaled_grouped_mm, []

    def counted(a: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        calls.append(a.shape[0])
        return inner(a, *args, **kwargs)

    moe_training._to_fp8_rowwise_then_scaled_grouped_mm = counted
    try:
        yield calls
    finally:
        moe_training._to_fp8_rowwise_then_scaled_grouped_mm = inner
