"""Apply a ParallelPlan to a LightningModule, in order, and describe the result.

Order matters: tensor parallelism rewrites projections into DTensors, expert parallelism makes
the experts DTensors over ep, context parallelism swaps attention kernels, activation
checkpointing wraps forwards, compile fuses each block, and data parallelism comes last because
it must see the final parameters (parallel/data_parallel.py).
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ContextManager, Optional, Sequence

import torch
from torch import nn

from ..hardware import ClusterSpec
from ..mesh import ParallelMeshes, add_expert_mesh
from ..models.fused_projections import projection_groups, set_fused_projections
from ..models.loss import TokenCrossEntropy
from ..models.protocol import moe_layers
from ..plan import ParallelPlan, PlanError
from .activation_checkpointing import activation_offload, apply_activation_checkpointing
from .data_parallel import DataParallelGradients, apply_data_parallel
from .gradient_reducer import GradientReducer

if TYPE_CHECKING:
    from .cp_batch import ContextParallelBatcher
    from .pipeline import PipelineRunner


@dataclass
class ParallelizeResult:
    gradients: DataParallelGradients
    context_parallel: Optional[ContextParallelBatcher]
    table: str
    # the context each training step runs in (activation offload, or nothing)
    step_context: Callable[[], ContextManager] = nullcontext
    # pp > 1: this rank's stages and their schedule, which the training step runs
    pipeline: Optional[PipelineRunner] = None


def parallelize(module: nn.Module, transformer: Optional[nn.Module], plan: ParallelPlan,
                meshes: ParallelMeshes, precision: str, cluster: ClusterSpec,
                materialize: Callable[[], None] = lambda: None,
                compute_dtype: Optional[torch.dtype] = None) -> ParallelizeResult:
    """Apply every parallelism of `plan` to `module` (whose protocol model is `transformer`), each
    once, in order.

    `materialize` allocates and fills a model built on the meta device: it runs once parameters
    are in their final layout (FSDP2: after sharding, so a rank allocates only its shards) and
    before the gradient reducer lays gradients out in buckets. `compute_dtype`: master weights
    (the parameters stay the masters; forward and backward run in this dtype)."""
    _check_protocol(transformer, plan)
    context_parallel = None
    stages = None
    if plan.pp > 1:  # first: every later parallelism sees only this rank's stages
        from .pipeline_stages import split_into_stages

        stages = split_into_stages(transformer, plan, meshes.pipeline.get_local_rank("pp"))
    if plan.fp8 != "none":  # before checkpointing, compile and FSDP2, as torchao requires
        from .float8 import apply_float8

        apply_float8(transformer, plan.fp8, fsdp_all_gather=plan.sharded,
                     fused_groups=projection_groups(transformer) if plan.fuse_projections else ())
    if plan.tp > 1:
        from .tensor_parallel import apply_tensor_parallel

        apply_tensor_parallel(transformer, meshes.submesh("tp"), sequence_parallel=plan.sequence_parallel)
    if plan.ep > 1:
        from .expert_parallel import apply_expert_parallel

        add_expert_mesh(meshes)
        apply_expert_parallel(transformer, meshes.expert["ep"],
                              token_split_group=meshes.group("tp") if plan.tp > 1 else None)
    if plan.pp > 1 and getattr(getattr(transformer, "config", None), "is_moe", False):
        from .expert_parallel import share_routing_loads

        # a stage's routers have their replicas on the stage's ranks only (other stages hold
        # other layers): their bias updates sum the loads over this pipeline rank's sub-world
        share_routing_loads(transformer, meshes.stage_world)
    if plan.cp > 1:
        from .cp_batch import apply_context_parallel_layout

        context_parallel = apply_context_parallel_layout(transformer, meshes, plan)
    if transformer is not None:
        for sub in transformer.modules():
            if hasattr(sub, "use_grouped_mm"):
                sub.use_grouped_mm = plan.grouped_gemm
        if plan.fp8_experts:
            from .float8 import apply_float8_experts

            apply_float8_experts(transformer)
        set_fused_projections(transformer, plan.fuse_projections)
        apply_activation_checkpointing(transformer, plan.activation_checkpointing, plan.ac_every_n)
        apply_compile(transformer, plan.compile, [m for _, m in stages] if stages is not None else (),
                      plan.compile_mode)
    gradients = apply_data_parallel(module, transformer, plan, meshes, precision, cluster, materialize,
                                    compute_dtype, [m for _, m in stages] if stages is not None else ())
    pipeline = None
    if stages is not None:
        from .pipeline import build_pipeline

        pipeline = build_pipeline(module, transformer, stages, plan, meshes, next(module.parameters()).device,
                                  master_weights=gradients.masters is not None,
                                  activation_dtype=gradients.param_dtype)
    return ParallelizeResult(gradients=gradients, context_parallel=context_parallel,
                             table=layer_table(transformer, plan, meshes, gradients.reducer),
                             step_context=activation_offload(plan.offload_activations,
                                                             torch.device(meshes.dense.device_type)),
                             pipeline=pipeline)


def check_plan(plan: ParallelPlan, world_size: int, model_cfg: Optional[object],
               device: torch.device) -> None:
    """Before any process group starts: the degrees fit the world and the model (the same
    check_model the CLI's pre-flight runs), and fp8 can run on this device."""
    if not plan.is_auto:
        resolved = plan.resolve(world_size)
        if model_cfg is not None:
            resolved.check_model(model_cfg)
    checks = [(plan.fp8 != "none", "linear", f"fp8={plan.fp8!r}", "fp8='none'"),
              (plan.fp8_experts, "grouped", "fp8_experts=True", "fp8_experts=False")]
    for kind, setting, off in [check[1:] for check in checks if check[0]]:
        from .float8 import float8_unavailable

        reason = float8_unavailable(device, kind)
        if reason is not None:
            raise PlanError(f"ParallelPlan {setting} cannot run: {reason}; or set {off}")


def _check_protocol(transformer: Optional[nn.Module], plan: ParallelPlan) -> None:
    """Plans beyond data parallelism need the model protocol, and the model must fit the plan."""
    needs_protocol = (plan.pp > 1 or plan.tp > 1 or plan.cp > 1 or plan.ep > 1 or plan.activation_checkpointing != "none"
                      or plan.compiled or plan.fp8 != "none" or plan.fp8_experts)
    if transformer is None and needs_protocol:
        raise PlanError(
            f"{plan.describe()} with activation_checkpointing={plan.activation_checkpointing!r} and "
            f"compile={plan.compile!r} needs "
            "a model with `blocks` whose items have `attention` (the model protocol); this "
            "LightningModule has none. Use data parallelism only (tp=cp=ep=1, compile='none') or build the model "
            "from lightning_attn_parallel.models")
    cfg = getattr(transformer, "config", None)
    if cfg is not None:  # the strategy checked a manual plan already; an auto plan, or a module
        plan.check_model(cfg)  # without `model_config`, reaches this point unchecked


def apply_compile(transformer: nn.Module, mode: str, stages: Sequence[nn.Module] = (),
                  tuning: str = "default") -> None:
    """torch.compile per `mode`: "block" compiles each block on its own (FSDP2 hooks, collectives
    and checkpointing stay between graphs, so it composes with every plan); "model" compiles the
    transformer as one graph, embedding to final norm (the plan allows it on replicated plans
    only), or under pipeline parallelism each of this rank's `stages` (the modules the schedule
    calls); "none" leaves it eager.

    Either compiled mode also compiles the local loss kernel (the head's logits to the sum of
    token losses): fused, the fp32 upcast and the log-softmax are one reduction instead of a
    copy and two softmax passes over the logits, about 8% of a step at a 102k vocabulary.
    A vocabulary-parallel kernel (tensor parallelism) stays eager: it calls collectives.
    `tuning` is torch.compile's mode for the blocks or the model ("default": torch's own)."""
    options = {} if tuning == "default" else {"mode": tuning}
    if mode == "block":
        for block in transformer.blocks:
            block.compile(**options)
    elif mode == "model":
        for whole in stages or [transformer]:
            whole.compile(**options)
    if mode != "none" and type(getattr(transformer, "loss_kernel", None)) is TokenCrossEntropy:
        transformer.loss_kernel.compile()


def layer_table(transformer: Optional[nn.Module], plan: ParallelPlan, meshes: ParallelMeshes,
                reducer: Optional[GradientReducer]) -> str:
    """A compact start-up table: the mesh, and which degrees each layer type uses."""
    dp_mode = "FSDP2" if plan.dp_shard > 1 and plan.dp_replicate == 1 else (
        "HSDP" if plan.dp_shard > 1 else "replicated")
    grads = meshes.dense_grads
    hier = ""
    if reducer is not None and reducer.buckets:
        n_h = sum(b.hierarchical for b in reducer.buckets)
        hier = f", {len(reducer.buckets)} buckets ({n_h} hierarchical)"
    rows = [
        f"attn_hybrid mesh: world {plan.world_size} = " + (f"pp {plan.pp} x " if plan.pp > 1 else "") + f"dp_replicate {plan.dp_replicate} x dp_shard "
        f"{plan.dp_shard} x cp {plan.cp} x tp {plan.tp}; experts: edp {plan.edp} x ep {plan.ep}; "
        f"{meshes.ranks_per_node} ranks/node",
        f"{'layer type':<14}{'data':<46}{'tensor':<10}{'context':<22}{'experts':<10}",
    ]
    cp_desc = f"cp {plan.cp} ({plan.cp_kernel})" if plan.cp > 1 else "-"
    if plan.cp > 1 and plan.cp_min_seq_len:
        cp_desc += f" if S>={plan.cp_min_seq_len}"
    data_desc = f"{dp_mode} over {grads.size}{hier}" if dp_mode == "replicated" else f"{dp_mode} {plan.dp}"
    types = {"attention"}
    if transformer is not None:
        moe = {id(ffn) for _, ffn in moe_layers(transformer)}
        types |= {"moe" if id(block.ffn) in moe else "mlp" for block in transformer.blocks}
    for layer in sorted(types):
        tensor = f"tp {plan.tp}" if plan.tp > 1 and (layer != "moe") else "-"
        context = cp_desc if layer == "attention" else "-"
        experts = f"ep {plan.ep}" if layer == "moe" and plan.ep > 1 else "-"
        data = data_desc if layer != "moe" or plan.ep == 1 else f"edp {plan.edp}"
        rows.append(f"{layer:<14}{data:<46}{tensor:<10}{context:<22}{experts:<10}")
    if plan.pp > 1:
        from ..pipeline_plan import microbatches, stages_per_rank

        rows.append(f"pipeline: pp {plan.pp} ({plan.pp_schedule}, {stages_per_rank(plan)} stage(s) per rank, "
                    f"{microbatches(plan)} micro-batches); this rank holds blocks {transformer.blocks.indices}")
    rows.append(f"activation checkpointing: {plan.activation_checkpointing}"
                + (f" every {plan.ac_every_n}" if plan.ac_every_n > 1 else ""))
    return "\n".join(rows)
