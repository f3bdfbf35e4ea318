"""Pipeline parallelism in the planner: each pp degree priced as one stage's plan plus the
pipeline's own costs, next to the best plan without pipelining.

A stage holds n_layers / pp blocks (the embedding and head counted on every stage: the first and
last stages hold them, and the planner sizes the worst stage) on world / pp GPUs, laid out as
the planner lays out a whole model (`select.layouts`) but with what pipelining composes with
today (parallel/pipeline.py): replicated stages with tensor, context and expert parallelism, or
FSDP2/HSDP stages of a dense model. FSDP2 stages keep their parameters gathered over a step's
micro-batches: the gathered copy is held all step, the all-gathers run once per step, and
gradients are reduced once ("defer_all"). An MoE stage is sized as the last one, which holds
the fewest dense (first_k_dense_replace) blocks; its compute counts the routed experts' active
share and its all-to-all, as the plan without pipelining does. The global batch is
unchanged: data parallelism shrinks by pp, so each step runs pp x grad_accum micro-batches
through the 1F1B schedule. On top of the stage's step:
- the bubble, (pp - 1) / micro-batches of the compute (pipeline_plan.bubble_fraction);
- the activations of the micro-batches the first stage holds at once (`pp` under 1F1B);
- the p2p sends: each micro-batch's activations forward and gradients backward (a rank's
  1/(cp x tp) of them: sequence parallelism is on with tp), over the inter-node link when a stage
  fills whole nodes, counted as exposed (an upper bound).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from math import ceil
from typing import Optional

from ..pipeline_plan import bubble_fraction, in_flight_microbatches
from ..plan import ParallelPlan, PlanError
from .memory import compute_precision, local_params, precision_spec
from .select import Evaluation, Workload, layouts

PP_DEGREES = (2, 4, 8, 16)


@dataclass(frozen=True)
class PipelineOption:
    pp: int
    microbatches: int
    stage: Evaluation  # the stage's replicated plan, timed for all its micro-batches
    bubble: float
    p2p_s: float
    extra_activations: float  # bytes of the micro-batches in flight beyond the stage's one

    @property
    def fits(self) -> bool:
        return self.stage.memory.total + self.extra_activations <= self.stage.memory.capacity

    @property
    def step_s(self) -> float:
        return self.stage.timing.step_s + self.stage.timing.compute_s * self.bubble + self.p2p_s

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return self.stage.timing.tokens_per_step / self.step_s / (self.stage.timing.world_size * self.pp)

    def describe(self) -> str:
        gib = (self.stage.memory.total + self.extra_activations) / 2**30
        plan = self.stage.plan
        data = f"FSDP2 over {plan.dp_shard}" if plan.sharded else "replicated"
        inside = "".join(f", {name} {degree}" for name, degree in (("tp", plan.tp), ("cp", plan.cp), ("ep", plan.ep))
                         if degree > 1)
        return (f"pp={self.pp} (1F1B, {self.microbatches} micro-batches, bubble {self.bubble:.0%}, "
                f"p2p {self.p2p_s * 1e3:.0f} ms, stages {data}{inside}, activation checkpointing "
                f"{plan.activation_checkpointing}): "
                f"{gib:.1f} GiB per GPU, " + (f"{self.tokens_per_s_per_gpu:,.0f} tokens/s per GPU"
                                               if self.fits else "does not fit"))


def _stage_workload(work: Workload, pp: int) -> Workload:
    cluster = work.cluster
    nodes = cluster.num_nodes // pp if cluster.num_nodes % pp == 0 else 1
    per_node = cluster.world_size // pp // nodes
    cfg = work.model_cfg
    layers = ceil(cfg.n_layers / pp)
    # the last stage's dense blocks: the fewest of any stage, so the most experts
    dense = max(0, cfg.first_k_dense_replace - (cfg.n_layers - layers))
    return replace(work, model_cfg=replace(cfg, n_layers=layers, first_k_dense_replace=dense),
                   cluster=replace(cluster, num_nodes=nodes, gpus_per_node=per_node),
                   grad_accum=pp * work.grad_accum, template=ParallelPlan())


def pipeline_option(work: Workload, pp: int) -> Optional[PipelineOption]:
    """The fastest fitting (else the leanest) stage plan for `pp`, priced as a pipeline."""
    cfg, cluster = work.model_cfg, work.cluster
    if cluster.world_size % pp or cfg.n_layers < pp:
        return None
    stage_work = _stage_workload(work, pp)
    micro = stage_work.grad_accum
    in_flight = in_flight_microbatches(ParallelPlan(pp=pp, pp_microbatches=micro))
    send = work.micro_batch * work.seq_len * cfg.d_model * 2  # bf16 activations of a micro-batch
    spans_nodes = cluster.num_nodes > 1 and cluster.num_nodes % pp == 0  # stages on different nodes
    gbps = cluster.inter_node_gbps if spans_nodes else cluster.intra_node_gbps
    alpha = cluster.inter_node_alpha_s if spans_nodes else cluster.intra_node_alpha_s
    stage_cluster = stage_work.cluster
    options = []
    for layout in layouts(stage_work.model_cfg, stage_cluster.world_size, stage_cluster.gpus_per_node, work.seq_len):
        if layout.dp_shard > 1 and (max(layout.tp, layout.cp, layout.ep) > 1 or cfg.is_moe):
            continue  # sharded stages run dense models without tp, cp or ep (pipeline_plan)
        p2p = 2 * micro * (send / (layout.cp * layout.tp) / (gbps * 1e9) + alpha)
        for ac in ("none", "block"):
            stage_plan = replace(layout, activation_checkpointing=ac, accumulation="defer_all")
            stage = stage_work.evaluate(stage_plan.resolve(stage_cluster.world_size))
            if stage.plan.sharded:
                stage = _gathered_over_the_step(stage_work, stage)
            options.append(PipelineOption(pp, micro, stage, bubble_fraction(pp, micro), p2p,
                                          (in_flight - 1) * stage.memory.activations))
    fitting = [o for o in options if o.fits]
    if fitting:
        return max(fitting, key=lambda o: o.tokens_per_s_per_gpu)
    return min(options, key=lambda o: o.stage.memory.total + o.extra_activations)


def _gathered_over_the_step(stage_work: Workload, stage: Evaluation) -> Evaluation:
    """An FSDP2 stage as the pipeline runs it: every unit stays gathered from the step's first
    forward to its reduction (the stage's parameters in the compute dtype, on top of the units in
    flight the memory model counts), and each is all-gathered once per step, not per micro-batch."""
    p = compute_precision(precision_spec(stage_work.precision), stage.plan)
    held = local_params(stage_work.counts, stage.plan).unsharded * p.compute_bytes
    micro = stage_work.grad_accum
    timing = replace(stage.timing, fsdp_gather_s=stage.timing.fsdp_gather_s / micro,
                     fsdp_exposed_s=stage.timing.fsdp_exposed_s / micro)
    return replace(stage, memory=replace(stage.memory, params=stage.memory.params + held), timing=timing)


def pipeline_advice(work: Workload, best: Optional[Evaluation]) -> list[str]:
    """Lines for the dry run: each pp degree against the chosen plan, and the verdict."""
    try:
        options = [o for o in (pipeline_option(work, pp) for pp in PP_DEGREES) if o is not None]
    except PlanError:
        return []
    if not options:
        return []
    lines = ["Pipeline parallelism (each degree's best stage: replicated with tp, cp and ep, or FSDP2, "
             "as pp composes today):"]
    lines += [f"  {o.describe()}" for o in options]
    fitting = [o for o in options if o.fits]
    best_pp = max(fitting, key=lambda o: o.tokens_per_s_per_gpu) if fitting else None
    base = best.tokens_per_s_per_gpu if best is not None and best.fits else 0.0
    if best_pp is None:
        lean = min(options, key=lambda o: o.stage.memory.total + o.extra_activations)
        memory = lean.stage.memory
        lines.append(f"  verdict: no pp degree fits; the plan above stays (at pp={lean.pp}, the leanest, a GPU "
                     f"keeps {memory.static / 2**30:.1f} GiB of its stage's parameters, gradients and "
                     f"optimizer state and {(memory.activations + lean.extra_activations) / 2**30:.1f} GiB "
                     f"of activations in flight, against {memory.capacity / 2**30:.1f} GiB usable).")
    elif best_pp.tokens_per_s_per_gpu > base:
        lines.append(f"  verdict: pp={best_pp.pp} is faster than the plan above "
                     f"({best_pp.tokens_per_s_per_gpu:,.0f} vs {base:,.0f} tokens/s per GPU).")
    else:
        lines.append(f"  verdict: the plan above stays ({base:,.0f} tokens/s per GPU against pp={best_pp.pp}'s "
                     f"{best_pp.tokens_per_s_per_gpu:,.0f}): the bubble and the stages' state cost more "
                     "than pipelining saves.")
    return lines


__all__ = ["PipelineOption", "pipeline_option", "pipeline_advice", "PP_DEGREES"]
