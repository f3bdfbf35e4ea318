"""`precision="bf16-mixed"` with fp32 master weights: the Lightning precision plugin.

Lightning's "-mixed" precisions autocast: the weights stay fp32 and every matmul casts them (and
its inputs) again, while the residual stream, norms and element-wise work stay fp32. Here the
forward and backward run entirely in bf16 on compute copies of the weights, cast once per optimizer
step from fp32 masters that the optimizer updates (parallel/master_weights.py; under FSDP2 its
MixedPrecisionPolicy does the same for sharded parameters). The plugin keeps the module in the
master dtype, creates tensors in the compute dtype during the forward, and casts floating inputs
to it; it runs no autocast. `ParallelPlan(mixed_precision=...)` chooses it (docs in README).
"""
from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager
from typing import Any, Generator

import torch
from lightning.fabric.plugins.precision import MixedPrecision as FabricMixedPrecision
from lightning.fabric.plugins.precision import Precision as FabricPrecision
from lightning.fabric.plugins.precision.utils import _convert_fp_tensor, _DtypeContextManager
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning_utilities import apply_to_collection
from torch import nn


class FabricMasterWeightsPrecision(FabricPrecision):
    """Compute in `compute_dtype` on copies of `master_dtype` weights (bf16 on fp32 by default;
    the exactness tests use fp32 on fp64). Fabric's plugin; the Trainer's adds its hooks."""

    precision = "bf16-mixed"

    def __init__(self, compute_dtype: torch.dtype = torch.bfloat16,
                 master_dtype: torch.dtype = torch.float32) -> None:
        self.compute_dtype = compute_dtype
        self.master_dtype = master_dtype

    def convert_module(self, module: nn.Module) -> nn.Module:
        return module.to(dtype=self.master_dtype)

    def tensor_init_context(self) -> AbstractContextManager:
        return _DtypeContextManager(self.master_dtype)

    def module_init_context(self) -> AbstractContextManager:
        return self.tensor_init_context()

    @contextmanager
    def forward_context(self) -> Generator[None, None, None]:
        """Tensors created during the forward take the compute dtype."""
        with _DtypeContextManager(self.compute_dtype):
            yield

    def convert_input(self, data: Any) -> Any:
        return apply_to_collection(data, function=_convert_fp_tensor, dtype=torch.Tensor,
                                   dst_type=self.compute_dtype)


class MasterWeightsPrecision(FabricMasterWeightsPrecision, Precision):
    """The Trainer's master-weights plugin (Lightning's Precision adds the Trainer's hooks)."""


def with_master_weights(plugin: FabricPrecision, mixed_precision: str) -> FabricPrecision:
    """Lightning's plugin for the run's precision, or, for "bf16-mixed" when the plan asks
    for mixed_precision="master_weights", the master-weights plugin of the same front-end
    (Trainer or Fabric) in its place."""
    if (mixed_precision == "master_weights" and isinstance(plugin, (MixedPrecision, FabricMixedPrecision))
            and plugin.precision == "bf16-mixed"):
        return MasterWeightsPrecision() if isinstance(plugin, Precision) else FabricMasterWeightsPrecision()
    return plugin


__all__ = ["FabricMasterWeightsPrecision", "MasterWeightsPrecision", "with_master_weights"]
