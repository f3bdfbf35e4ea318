"""FP8 training of the blocks' linear layers through torchao's float8 (`[fp8]` extra).

torchao swaps each chosen `nn.Linear` for a `Float8Linear` whose matmuls run in fp8 with dynamic
scales: per tensor ("tensorwise") or per row ("rowwise"). Under FSDP2 with tensorwise scales the
weights are also all-gathered in fp8 (`enable_fsdp_float8_all_gather`), halving that traffic.
Left in bf16: the LM head (its logits feed the loss, where fp8's error hurts most) and layers
with a dimension under `min_features` or not a multiple of 16 (fp8 GEMMs need the multiple;
on small shapes the casts cost more than the faster GEMM saves, e.g. the KV projections of GQA).

With fused projections a group (q|k|v, gate|up) is judged as the GEMM it becomes: the GQA key and
value projections convert with their queries, and the group runs as one fp8 GEMM whose input is
cast once instead of once per projection. Under tensorwise scaling the group's weight has one
scale (its largest magnitude across the group); rowwise scales are per output row either way.

Routed experts (`ParallelPlan.fp8_experts`) run their grouped GEMMs through torchao's fp8
rowwise grouped GEMM instead (dynamic per-row scales, e4m3, `torch._scaled_grouped_mm`, sm90+).
Their parameters stay as they are; only the experts' kernel changes.
"""
from __future__ import annotations

import importlib.util
from dataclasses import replace
from functools import partial
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from ..models.deepseek import GroupedGemm
from ..models.protocol import is_expert_module
from ..plan import FP8_MIN_FEATURES, FP8_MULTIPLE

FP8_RECIPES = ("tensorwise", "rowwise")


def float8_module_filter(min_features: int = FP8_MIN_FEATURES, skip: tuple[str, ...] = ("output",),
                         groups: Iterable[tuple[str, ...]] = (),
                         model: Optional[nn.Module] = None) -> Callable[[nn.Module, str], bool]:
    """torchao's `module_filter_fn`: True for the linear layers to convert. A layer in one of
    `groups` (qualified names of projections fused into one GEMM, in `model`) is judged by the
    group's GEMM: the shared input width and the sum of the output widths."""
    widths = {}  # fqn -> the output width of the GEMM it runs in
    for group in groups:
        layers = [model.get_submodule(name) for name in group]
        if all(isinstance(layer, nn.Linear) and layer.out_features % FP8_MULTIPLE == 0 for layer in layers):
            widths.update(dict.fromkeys(group, sum(layer.out_features for layer in layers)))

    def convert(module: nn.Module, fqn: str) -> bool:
        if not isinstance(module, nn.Linear) or fqn.split(".")[-1] in skip:
            return False
        dims = (module.in_features, widths.get(fqn, module.out_features))
        return all(d % FP8_MULTIPLE == 0 and d >= min_features for d in dims)

    return convert


def _fused_float8_gemm(x: torch.Tensor, weights: Sequence[torch.Tensor], first: nn.Module) -> torch.Tensor:
    """A group of Float8Linear layers as one fp8 GEMM: what `Float8Linear.forward` does, on the
    group's concatenated weight (torchao has no public call for a weight that no module holds)."""
    from torchao.float8.float8_linear import matmul_with_hp_or_float8_args

    if torch.is_autocast_enabled():  # as Float8Linear: the output keeps autocast's dtype
        x = x.to(torch.get_autocast_gpu_dtype())
    return matmul_with_hp_or_float8_args.apply(x, torch.cat(weights).t(), first.linear_mm_config, first.config)


# fp8 linear layers run from Ada on; fp8 grouped GEMMs (torch._scaled_grouped_mm) from Hopper on
FP8_CAPABILITY = {"linear": ((8, 9), "fp8 matmuls", "Ada, Hopper, Blackwell"),
                  "grouped": ((9, 0), "fp8 grouped GEMMs", "Hopper, Blackwell")}


def _torchao_has_grouped_fp8() -> bool:
    """torchao's `_to_fp8_rowwise_then_scaled_grouped_mm` with the `pad_token_groups_for_grouped_mm`
    switch (0.18 on): older releases differ, and would fail only at the first forward."""
    import inspect

    try:
        from torchao.prototype.moe_training import _to_fp8_rowwise_then_scaled_grouped_mm as mm
    except ImportError:
        return False
    return "pad_token_groups_for_grouped_mm" in inspect.signature(mm).parameters


def float8_unavailable(device: torch.device, kind: str = "linear") -> Optional[str]:
    """Why fp8 `kind` ("linear" or "grouped") cannot run on `device` (None when it can):
    torchao missing, or no GPU of the compute capability it needs."""
    if importlib.util.find_spec("torchao") is None:
        return "torchao is not installed (pip install -e '.[fp8]')"
    if kind == "grouped" and not _torchao_has_grouped_fp8():
        from torchao import __version__

        return (f"torchao {__version__} has no fp8 rowwise grouped GEMM that takes padded groups "
                f"(pip install 'torchao>=0.18')")
    (major, minor), what, names = FP8_CAPABILITY[kind]
    needs = f"compute capability {major}.{minor} or newer ({names})"
    if device.type != "cuda":
        return f"{what} need an NVIDIA GPU of {needs}; this run is on {device.type}"
    capability = torch.cuda.get_device_capability(device)
    if capability < (major, minor):
        name = torch.cuda.get_device_name(device)
        return f"{what} need {needs}; {name} has {capability[0]}.{capability[1]}"
    return None


def apply_float8(model: nn.Module, recipe: str, fsdp_all_gather: bool,
                 min_features: int = FP8_MIN_FEATURES, emulate: bool = False,
                 fused_groups: Iterable[tuple[str, ...]] = ()) -> list[str]:
    """Convert `model`'s chosen linear layers in place; returns their names. Apply before
    activation checkpointing, compile and FSDP2 (as torchao requires), without tensor parallelism.
    `fused_groups`: the projections that will run as one GEMM each (`projection_groups`), judged
    as groups. `emulate` runs the fp8 arithmetic in higher precision (for CPU tests)."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    from torchao.float8.float8_linear import Float8Linear

    from ..models.fused_projections import register_fused_gemm

    if recipe not in FP8_RECIPES:
        raise ValueError(f"fp8={recipe!r} is unknown: use one of {', '.join(FP8_RECIPES)}")
    config = Float8LinearConfig.from_recipe_name(recipe)
    # fp8 all-gather exists for tensorwise scales only (a rowwise scale is per gathered row)
    config = replace(config, enable_fsdp_float8_all_gather=fsdp_all_gather and recipe == "tensorwise",
                     emulate=emulate)
    register_fused_gemm(Float8Linear, _fused_float8_gemm)
    if config.enable_fsdp_float8_all_gather:
        # FSDP2 then unshards each weight into torchao's fp8 tensor, which a group cannot
        # concatenate: the layers run one by one, so each is judged alone
        fused_groups = ()
    convert = float8_module_filter(min_features, groups=fused_groups, model=model)
    chosen = [name for name, module in model.named_modules() if convert(module, name)]
    convert_to_float8_training(model, config=config, module_filter_fn=convert)
    return chosen


def _gemm_on_column_major_copy(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    from torchao.prototype.moe_training import _to_fp8_rowwise_then_scaled_grouped_mm

    # cast and copy in one pass (`.to(memory_format=...)` skips the copy when the dtype matches)
    column_major = b.new_empty(b.mT.shape, dtype=a.dtype).copy_(b.mT).mT
    # the rows are padded to multiples of 16 already (models/token_groups.py): torchao 0.18
    # refuses to pad them itself
    return _to_fp8_rowwise_then_scaled_grouped_mm(a, column_major, offs, pad_token_groups_for_grouped_mm=False)


_GROUPED_GEMM_OPS = {getattr(torch.ops.aten, name).default for name in ("_scaled_grouped_mm", "_grouped_mm")
                     if hasattr(torch.ops.aten, name)}


def _keep_only_gemms(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Selective checkpoint policy: keep the GEMMs' outputs, redo the copy and the casts."""
    return CheckpointPolicy.MUST_SAVE if op in _GROUPED_GEMM_OPS else CheckpointPolicy.MUST_RECOMPUTE


def _float8_grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """torchao's fp8 rowwise grouped GEMM on experts stored (G, K, N) row-major.

    torchao reads its right operand column-major, so it gets a column-major copy of each weight.
    torchao keeps that operand for its backward, which would hold a second copy of every
    expert weight from forward to backward (and pin FSDP2's gathered weights): a selective
    checkpoint makes the backward copy the weight again instead (the cast to bf16 of fp32
    weights included, so autocast keeps no bf16 copy either). Compiled, that copy is all the
    backward redoes. In eager the replay also redoes the forward's fp8 casts, and the checkpoint
    holds the last GEMM's padded output until the backward (rows x d_model in bf16, about 0.2 GB
    a layer on the V2-Lite cut at micro-batch 4), which the compiled graph drops. Either way each
    step pays memory-bound passes over the expert weights that weights stored (G, N, K) would
    not: benchmarks/grouped_gemm_fp8.py times the copy against that layout.
    """
    if not torch.is_grad_enabled():
        return _gemm_on_column_major_copy(a, b, offs)
    return checkpoint(_gemm_on_column_major_copy, a, b, offs, use_reentrant=False,
                      context_fn=partial(create_selective_checkpoint_contexts, _keep_only_gemms))


# the experts' fp8 kernel: groups of rows and weight dimensions in fp8's multiples
FLOAT8_GROUPED_GEMM = GroupedGemm(mm=_float8_grouped_mm, row_multiple=FP8_MULTIPLE, dim_multiple=FP8_MULTIPLE)


def apply_float8_experts(model: nn.Module, gemm: GroupedGemm = FLOAT8_GROUPED_GEMM) -> list[str]:
    """Run every routed-experts module's grouped GEMMs with `gemm` (torchao's fp8 by default);
    returns their names. Parameters are untouched, so it composes with every parallelism in any
    order, as long as it comes before compile."""
    experts = {name: module for name, module in model.named_modules() if is_expert_module(module)}
    for module in experts.values():
        module.grouped_gemm = gemm
    return list(experts)


__all__ = ["FP8_RECIPES", "float8_module_filter", "float8_unavailable", "apply_float8",
           "apply_float8_experts", "FLOAT8_GROUPED_GEMM"]
