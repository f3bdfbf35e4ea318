"""Apply a ParallelPlan to a LightningModule, in order, and describe the result.

Order matters: tensor parallelism rewrites projections into DTensors, expert parallelism keeps
this rank's experts, context parallelism swaps attention kernels, activation checkpointing wraps
forwards, compile fuses each block, and data parallelism comes last because it must see the final
parameters (FSDP2 shards them; the GradientReducer lays their gradients into buckets).
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterator, Optional

import torch
from torch import nn

from ..mesh import ParallelMeshes, add_expert_mesh
from ..models.loss import TokenCrossEntropy
from ..models.protocol import expert_modules, is_expert_parameter, moe_layers
from ..plan import ParallelPlan, PlanError
from .activation_checkpointing import activation_offload, apply_activation_checkpointing
from ..hardware import ClusterSpec
from .fully_sharded import casts_parameters
from .gradient_reducer import GradientReducer, broadcast_parameters


@dataclass
class DataParallelGradients:
    """The data-parallel side of every backward pass, whichever form the plan took: the
    replicated reducer's buckets, or FSDP2 with its accumulation policy and gradient fix-ups."""

    model: nn.Module
    reducer: Optional[GradientReducer]
    fully_sharded: bool
    accumulation: str
    # FSDP2 gradients to finish once reduced (see shard_experts and _token_split_fixup)
    fixups: tuple = ()
    synced: bool = True  # False while micro-batches only accumulate

    def before_backward(self) -> None:
        if self.reducer is not None:
            self.reducer.prepare_for_backward()

    def after_backward(self) -> None:
        if self.reducer is not None:
            self.reducer.finish()
        if self.synced:  # reduced (final) on this micro-batch: finish them once
            for fixup in self.fixups:
                fixup.apply()

    @contextmanager
    def accumulating(self) -> Iterator[None]:
        """Micro-batches that only accumulate send nothing (the replicated reducer), or what the
        plan's accumulation policy says (FSDP2/HSDP; see fully_sharded.set_gradient_sync)."""
        self._sync(False)
        try:
            yield
        finally:
            self._sync(True)

    def _sync(self, enabled: bool) -> None:
        self.synced = enabled
        if self.reducer is not None:
            self.reducer.sync_enabled = enabled
        if self.fully_sharded:
            from .fully_sharded import set_gradient_sync

            set_gradient_sync(self.model, enabled, self.accumulation)


@dataclass
class ParallelizeResult:
    gradients: DataParallelGradients
    context_parallel: Optional[object]
    table: str
    # the context each training step runs in (activation offload, or nothing)
    step_context: Callable[[], ContextManager] = nullcontext


def parallelize(module: nn.Module, transformer: Optional[nn.Module], plan: ParallelPlan,
                meshes: ParallelMeshes, precision: str, cluster: ClusterSpec,
                materialize: Callable[[], None] = lambda: None) -> ParallelizeResult:
    """Apply every parallelism of `plan` to `module` (whose protocol model is `transformer`).

    `materialize` allocates and fills a model built on the meta device: it runs once parameters
    are in their final layout (FSDP2: after sharding, so a rank allocates only its shards) and
    before the gradient reducer lays gradients out in buckets."""
    needs_protocol = (plan.tp > 1 or plan.cp > 1 or plan.ep > 1 or plan.activation_checkpointing != "none"
                      or plan.compiled or plan.fp8 != "none")
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
    context_parallel = None
    if plan.fp8 != "none":  # before checkpointing, compile and FSDP2, as torchao requires
        from .float8 import apply_float8

        apply_float8(transformer, plan.fp8, fsdp_all_gather=plan.sharded)
    if plan.tp > 1:
        from .tensor_parallel import apply_tensor_parallel

        apply_tensor_parallel(transformer, meshes.submesh("tp"), sequence_parallel=plan.sequence_parallel)
    if plan.ep > 1:
        from .expert_parallel import apply_expert_parallel

        add_expert_mesh(meshes)
        apply_expert_parallel(transformer, meshes.expert["ep"])
        if plan.tp > 1:
            from .moe_token_split import split_moe_tokens

            split_moe_tokens(transformer, meshes.group("tp"))
    if plan.cp > 1:
        from .context_parallel import apply_context_parallel
        from .cp_batch import ContextParallelBatcher

        apply_context_parallel(transformer, meshes.group("cp"), kernel=plan.cp_kernel,
                               load_balance=plan.cp_load_balance)
        context_parallel = ContextParallelBatcher(transformer, meshes, plan)
    if transformer is not None:
        for sub in transformer.modules():
            if hasattr(sub, "use_grouped_mm"):
                sub.use_grouped_mm = plan.grouped_gemm
        apply_activation_checkpointing(transformer, plan.activation_checkpointing, plan.ac_every_n)
        apply_compile(transformer, plan.compile)
    reducer = None
    fixups: list = []
    fully_sharded = casts_parameters(plan, precision)
    if fully_sharded:
        from .fully_sharded import apply_fully_sharded, mixed_precision_for

        policy = mixed_precision_for(precision)
        if not plan.sharded and not any(p.is_meta for p in module.parameters()):
            # replicas must start equal: nothing else would make them so (a meta model is
            # filled from the same folder on every rank)
            broadcast_parameters([p for n, p in module.named_parameters()
                                  if not (plan.ep > 1 and is_expert_parameter(module, n))], meshes.dense_grads)
        if plan.ep > 1:
            fixups += shard_experts(transformer, meshes, policy)
        mesh = sharding_mesh(meshes)
        # Over a shard dimension of one rank (cast_params on replicated parameters) resharding
        # after the forward frees only the bf16 copy, and the backward would cast the fp32
        # masters again: keep the copy (2 bytes a parameter) and cast once a step.
        apply_fully_sharded(transformer if transformer is not None else module, mesh,
                            policy.param_dtype, policy.reduce_dtype,
                            reshard_after_forward=mesh.size(mesh.ndim - 1) > 1)
        if plan.ep > 1 and plan.tp > 1:
            fixups.append(_token_split_fixup(transformer, meshes))
        materialize()
    else:
        materialize()
        reducer = _build_reducer(module, transformer, plan, meshes, cluster)
    gradients = DataParallelGradients(module, reducer, fully_sharded, plan.accumulation,
                                      tuple(fixups))
    return ParallelizeResult(gradients=gradients, context_parallel=context_parallel,
                             table=layer_table(transformer, plan, meshes, reducer),
                             step_context=activation_offload(plan.offload_activations,
                                                             torch.device(meshes.dense.device_type)))


def apply_compile(transformer: nn.Module, mode: str) -> None:
    """torch.compile per `mode`: "block" compiles each block on its own (FSDP2 hooks, collectives
    and checkpointing stay between graphs, so it composes with every plan); "model" compiles the
    transformer as one graph, embedding to final norm (the plan allows it on replicated plans
    only); "none" leaves it eager.

    Either compiled mode also compiles the local loss kernel (the head's logits to the sum of
    token losses): fused, the fp32 upcast and the log-softmax are one reduction instead of a
    copy and two softmax passes over the logits, about 8% of a step at a 102k vocabulary.
    A vocabulary-parallel kernel (tensor parallelism) stays eager: it calls collectives."""
    if mode == "block":
        for block in transformer.blocks:
            block.compile()
    elif mode == "model":
        transformer.compile()
    if mode != "none" and type(getattr(transformer, "loss_kernel", None)) is TokenCrossEntropy:
        transformer.loss_kernel.compile()


def sharding_mesh(meshes: ParallelMeshes):
    """The FSDP2 mesh: dp_shard (x cp, since context-parallel ranks hold different tokens and
    their gradients must be reduced too), with dp_replicate in front for HSDP."""
    plan = meshes.plan
    shard_dim = "dp_shard"
    if plan.cp > 1:
        meshes.dense["dp_shard", "cp"]._flatten("dp_shard_cp")  # DeviceMesh has no public flatten
        shard_dim = "dp_shard_cp"
    if plan.dp_replicate > 1:
        return meshes.dense["dp_replicate", shard_dim]
    return meshes.dense[shard_dim]


def shard_experts(transformer: nn.Module, meshes: ParallelMeshes, policy) -> list:
    """FSDP2 for each MoE layer's local experts over the expert-data-parallel ranks (edp), before
    the blocks are sharded over the dense mesh (which then leaves the experts alone). Expert
    gradients must be summed over edp and divided by the dense data-parallel size, the same rule
    as the replicated reducer's expert group. Checkpoints then describe each expert tensor on the
    (ep, edp) layout: FSDP2's edp split lies inside each ep block.

    FSDP2 averages over edp by default; the rest of the rule is a GradientFixup scaling the
    experts by edp / (dense data-parallel size) once they are final. One mechanism for every edp:
    FSDP2's own custom divide factor needs ReduceOp.PREMUL_SUM, which gloo lacks, and over a
    one-rank group (edp = 1) torch applies it inconsistently across versions (twice, in float64,
    on 2.13).
    """
    from torch.distributed.fsdp import fully_shard

    from .expert_state import ep_edp_mesh, record_edp_sharding
    from .fully_sharded import GradientFixup

    plan = meshes.plan
    dense_dp = plan.dp_replicate * plan.dp_shard * plan.cp
    layout = ep_edp_mesh(meshes.expert)  # built once, on every rank, from the existing groups
    scaled: list[nn.Parameter] = []
    for experts in expert_modules(transformer):
        # as the dense units: over one edp rank nothing is freed by resharding, only re-cast
        fully_shard(experts, mesh=meshes.expert["edp"], mp_policy=policy,
                    reshard_after_forward=meshes.expert["edp"].size() > 1)
        scaled += list(experts.parameters())
        record_edp_sharding(experts, layout)
    return [GradientFixup(scaled, scale=plan.edp / dense_dp)] if scaled else []


def _token_split_fixup(transformer: nn.Module, meshes: ParallelMeshes):
    """Under tp x ep each TP rank feeds the router and shared experts its own slice of the
    tokens; FSDP2 reduces their gradients over the data-parallel ranks only, so the slices'
    contributions are summed over tp afterwards (the FSDP2 form of the replicated reducer's
    moe-token-split group)."""
    from .fully_sharded import GradientFixup
    from .moe_token_split import token_split_parameters

    return GradientFixup(token_split_parameters(transformer), sum_over=meshes.group("tp"))


def _build_reducer(module: nn.Module, transformer: Optional[nn.Module], plan: ParallelPlan,
                   meshes: ParallelMeshes, cluster: ClusterSpec) -> GradientReducer:
    """Replicated parameters by reduction group: dense over dp x cp, experts over edp, and (under
    tp x ep) the router and shared experts over every rank, as each TP rank saw other tokens."""
    split_ids: set[int] = set()
    if plan.ep > 1 and plan.tp > 1:
        from .moe_token_split import token_split_parameters

        split_ids = {id(p) for p in token_split_parameters(transformer)}
    dense, experts, split = [], [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if plan.ep > 1 and is_expert_parameter(module, name):
            experts.append(p)
        else:
            (split if id(p) in split_ids else dense).append(p)
    groups = [(dense, meshes.dense_grads)]
    if experts:
        groups.append((experts, meshes.expert_grads))
    if split:
        groups.append((split, meshes.token_split_grads))
    for params, group in groups:
        broadcast_parameters(params, group)
    return GradientReducer(groups, bucket_mb=plan.bucket_mb, hierarchical=plan.hierarchical,
                           cluster=cluster)


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
        f"attn_hybrid mesh: world {plan.world_size} = dp_replicate {plan.dp_replicate} x dp_shard "
        f"{plan.dp_shard} x cp {plan.cp} x tp {plan.tp}; experts: edp {plan.world_size // plan.ep} x ep {plan.ep}; "
        f"{meshes.ranks_per_node} ranks/node",
        f"{'layer type':<14}{'data':<46}{'tensor':<10}{'context':<22}{'experts':<10}",
    ]
    cp_desc = f"cp {plan.cp} ({plan.cp_kernel})" if plan.cp > 1 else "-"
    if plan.cp > 1 and plan.cp_min_seq_len:
        cp_desc += f" if S>={plan.cp_min_seq_len}"
    data_desc = f"{dp_mode} over {grads.size}{hier}" if dp_mode == "replicated" else f"{dp_mode} {plan.dp}"
    types = {"attention"}
    if transformer is not None:
        moe = {i for i, _ in moe_layers(transformer)}
        types |= {"moe" if i in moe else "mlp" for i in range(len(transformer.blocks))}
    for layer in sorted(types):
        tensor = f"tp {plan.tp}" if plan.tp > 1 and (layer != "moe") else "-"
        context = cp_desc if layer == "attention" else "-"
        experts = f"ep {plan.ep}" if layer == "moe" and plan.ep > 1 else "-"
        data = data_desc if layer != "moe" or plan.ep == 1 else f"edp {plan.world_size // plan.ep}"
        rows.append(f"{layer:<14}{data:<46}{tensor:<10}{context:<22}{experts:<10}")
    rows.append(f"activation checkpointing: {plan.activation_checkpointing}"
                + (f" every {plan.ac_every_n}" if plan.ac_every_n > 1 else ""))
    return "\n".join(rows)
