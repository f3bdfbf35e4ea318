"""The printed dry-run report: model size, FLOPs, and a table of plans with memory and speed.

Everything is computed from the model built on the meta device and the planner's models, so a
dry run for a 16-node recipe finishes in seconds on a laptop.
"""
from __future__ import annotations

import dataclasses
import textwrap
from typing import Any, Optional, Union

from ..models.config import ModelConfig
from ..plan import ParallelPlan
from .calibration import DEFAULT_CALIBRATION, Calibration
from ..hardware import CPU, H100_SXM, ClusterSpec, GpuSpec, cluster_for_plan, detect_gpu, gpu_spec
from .memory import precision_spec
from .select import (Evaluation, NoPlanFitsError, PlanReport, Workload, choose, evaluate_layouts,
                     make_workload, nearest_fit)

# (name, alignment); widths follow the longest cell, so long plan names stay in line
_COLUMNS = (("plan", "<"), ("AC", "<"), ("params", ">"), ("grads", ">"), ("optim", ">"), ("act", ">"),
            ("comm", ">"), ("total", ">"), ("fits", ">"), ("tok/s/GPU", ">"), ("MFU", ">"))
# What the table's abbreviations mean, shown for those it uses.
_LEGEND = (("+sp", "sequence-parallel norms under tensor parallelism (sequence_parallel=true)"),
           ("(ring)", "context-parallel kernel, e.g. cp=2(ring): cp=2 with cp_kernel=ring"),
           ("acc=rs_each", "FSDP2 reduce-scatters every micro-batch (accumulation=reduce_scatter_each)"),
           ("acc=defer_ar", "HSDP defers only the all-reduce across replicas (accumulation=defer_all_reduce)"),
           ("/", "activation checkpointing on every n-th block, e.g. block/4: ac_every_n=4"))
# Largest gap between the planner's memory estimate and a measured peak on held-out runs
# (benchmarks/RESULTS.md, "Planner"): a plan closer than this to the card's memory may not fit.
MEMORY_MODEL_ERROR = 0.063
# A requested plan this much slower than the selected one gets a line of its own.
MUCH_SLOWER = 1.25

def resolve_gpu(gpu: Union[GpuSpec, str, None]) -> tuple[GpuSpec, str]:
    """(card, note): a name is looked up; None detects the local card and, on a machine without
    one, plans for an H100 SXM and says so."""
    if isinstance(gpu, GpuSpec):
        return gpu, ""
    if isinstance(gpu, str):
        return gpu_spec(gpu), ""
    found = detect_gpu()
    if found is CPU:
        return H100_SXM, " (no GPU here: planning for H100 SXM)"
    return found, " (detected)"


_ACCUMULATION_SHORT = {"reduce_scatter_each": "acc=rs_each", "defer_all_reduce": "acc=defer_ar"}


def _plan_text(plan: ParallelPlan) -> str:
    """Compact degrees: 'dp_shard=16 tp=8+sp cp=2(ring) ep=8'."""
    suffix = {"tp": "+sp" if plan.sequence_parallel else "", "cp": f"({plan.cp_kernel})"}
    parts = [f"{key}={getattr(plan, key)}{suffix.get(key, '')}"
             for key in ("dp_replicate", "dp_shard", "tp", "cp", "ep") if getattr(plan, key) > 1]
    if plan.sharded and plan.accumulation in _ACCUMULATION_SHORT:
        parts.append(_ACCUMULATION_SHORT[plan.accumulation])
    return " ".join(parts) or "single GPU"


def _ac_short(plan: ParallelPlan) -> str:
    policy = plan.activation_checkpointing
    return f"{policy}/{plan.ac_every_n}" if policy != "none" and plan.ac_every_n > 1 else policy


def _cells(e: Evaluation) -> tuple[str, ...]:
    g = e.memory.gib()
    speed = f"{e.timing.tokens_per_s_per_gpu:,.0f}" if e.timing else "-"
    mfu = f"{e.timing.mfu:.0%}" if e.timing else "-"
    return (_plan_text(e.plan), _ac_short(e.plan), f"{g['params']:.1f}", f"{g['grads']:.1f}",
            f"{g['optimizer']:.1f}", f"{g['activations']:.1f}", f"{g['comm']:.1f}",
            f"{g['total']:.1f}", "yes" if e.fits else "NO", speed, mfu)


def _aligned(rows: list[tuple[str, Evaluation]]) -> list[str]:
    """The header and one line per plan; `mark` is up to two characters ('*' selected,
    '>' requested)."""
    cells = [tuple(name for name, _ in _COLUMNS)] + [_cells(e) for _, e in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(_COLUMNS))]
    marks = [""] + [mark for mark, _ in rows]
    return [(f"{mark:<2}" + " ".join(f"{v:{align}{w}}" for v, (_, align), w in zip(row, _COLUMNS, widths))).rstrip()
            for mark, row in zip(marks, cells)]


def _model_line(cfg: ModelConfig) -> str:
    kind = [cfg.attention.upper()]
    if cfg.is_moe:
        kind.append(f"MoE {cfg.n_routed_experts} experts top-{cfg.moe_top_k}"
                    + (f" + {cfg.n_shared_experts} shared" if cfg.n_shared_experts else ""))
    return (f"{cfg.family} ({', '.join(kind)}), {cfg.n_layers} layers, d_model {cfg.d_model}, "
            f"{cfg.n_heads} heads, vocab {cfg.vocab_size}")


def _header(work: Workload, gpu_note: str) -> list[str]:
    cfg, summary = work.model_cfg, work.counts.summary(work.model_cfg, work.seq_len)
    gpu, cluster = work.gpu, work.cluster
    peak = gpu.peak_flops(precision_spec(work.precision).compute_bytes) / 1e12
    usable = gpu.memory_gib * work.calibration.usable_memory_fraction
    source = "model built on the meta device" if summary.source == "model" else "config"
    return [
        f"Dry run: {_model_line(cfg)}",
        f"  parameters   {summary.total / 1e9:,.2f}B total, {summary.active / 1e9:,.2f}B active per "
        f"token (counted from the {source})",
        f"  FLOPs/token  {summary.flops_per_token / 1e9:,.1f} GFLOP at seq_len {work.seq_len} "
        "(6 x active matmul params + attention)",
        f"  GPUs         {cluster.num_nodes} node(s) x {cluster.gpus_per_node} = {cluster.world_size} "
        f"x {gpu.name}{gpu_note}: {gpu.memory_gib:.1f} GiB ({usable:.1f} usable), "
        f"{peak:,.0f} TFLOP/s peak",
        f"  workload     micro_batch {work.micro_batch} x {work.seq_len} tokens per data-parallel "
        f"rank, accumulate {work.grad_accum}, precision {work.precision}",
    ]


def _table(rows: list[tuple[str, Evaluation]], ranked: list[Evaluation],
           work: Workload) -> list[str]:
    fitting = sum(e.fits for e in ranked)
    text = "\n".join(_cells(e)[0] + " " + _cells(e)[1] for _, e in rows)
    legend = [f"  {abbreviation}: {meaning}" for abbreviation, meaning in _LEGEND if abbreviation in text]
    return (_aligned(rows)
            + [f"  (GiB per GPU; total adds {work.calibration.cuda_context_gib:.1f} GiB CUDA context "
               f"and {work.calibration.fragmentation:.0%} allocator slack on act + comm; "
               f"{len(ranked)} layouts evaluated, {fitting} fit; * selected, > requested; "
               "AC: activation checkpointing)"] + legend)


def _rows(ranked: list[Evaluation], selected: Optional[Evaluation],
          requested: Optional[Evaluation], top: int) -> list[tuple[str, Evaluation]]:
    """The top plans, the selected one marked '*', the requested one first and marked '>'."""
    def mark(e: Evaluation) -> str:
        return (">" if requested is not None and e.plan == requested.plan else "") + \
            ("*" if selected is not None and e.plan == selected.plan else "")

    shown = [e for e in ranked[:top] if requested is None or e.plan != requested.plan]
    if requested is not None:
        shown.insert(0, requested)
    return [(mark(e), e) for e in shown]


def _closing(work: Workload, report: Optional[PlanReport], failure: Optional[NoPlanFitsError],
             requested: Optional[Evaluation], ranked: list[Evaluation]) -> list[str]:
    lines: list[str] = []
    if requested is not None and not requested.fits:
        suggestions = nearest_fit(work.model_cfg, work.cluster, work.gpu, work.micro_batch,
                                  work.seq_len, work.precision, plan=requested.plan,
                                  grad_accum=work.grad_accum,
                                  loss_chunk_tokens=work.loss_chunk_tokens,
                                  calibration=work.calibration)
        lines.append(f"The requested plan does not fit: {requested.memory.describe()}.")
        lines += [f"  {'nearest fit' if i == 0 else 'or'}: {s}" for i, s in enumerate(suggestions)]
    if failure is not None:
        lines.append(str(failure))
    if report is not None:
        lines += textwrap.wrap("Why: " + report.reason, width=100, subsequent_indent="  ")
        lines += _advice(work, ranked, ranked[0], requested)
    return lines


def _headroom(work: Workload, e: Evaluation) -> float:
    """The share of the card's memory the plan leaves free, by the planner's estimate."""
    return 1 - e.memory.gib()["total"] / work.gpu.memory_gib


def _advice(work: Workload, ranked: list[Evaluation], selected: Evaluation,
            requested: Optional[Evaluation]) -> list[str]:
    """How to run the selected plan, whether the requested one is much slower, and whether the
    selected one's memory headroom is enough."""
    lines = ["", "Run the selected plan with:", "  " + " ".join(plan_overrides(selected.plan, requested and requested.plan)),
             f"  or in Python: {plan_code(selected.plan)}"]
    if requested is not None and requested.fits and requested.plan != selected.plan and requested.timing:
        ratio = selected.tokens_per_s_per_gpu / max(requested.tokens_per_s_per_gpu, 1e-9)
        if ratio >= MUCH_SLOWER:
            lines += textwrap.wrap(
                f"The requested plan (the recipe's, with your overrides) is predicted {ratio:.1f}x slower "
                f"than the selected one ({requested.tokens_per_s_per_gpu:,.0f} against "
                f"{selected.tokens_per_s_per_gpu:,.0f} tokens/s per GPU). A run keeps the plan it is given: "
                "add the overrides above, or strategy.plan.mode=auto to let the planner choose at start-up.",
                width=100, subsequent_indent="  ")
    free = _headroom(work, selected)
    total = selected.memory.gib()["total"]
    if free >= MEMORY_MODEL_ERROR:
        lines.append(f"Memory: {total:.1f} of {work.gpu.memory_gib:.1f} GiB ({free:.0%} free), more than the "
                     f"planner's largest memory error on held-out runs ({MEMORY_MODEL_ERROR:.1%}): safe.")
        return lines
    safer = next((e for e in ranked if e.fits and _headroom(work, e) >= MEMORY_MODEL_ERROR), None)
    lines += textwrap.wrap(
        f"Memory: {total:.1f} of {work.gpu.memory_gib:.1f} GiB ({free:.1%} free) is within the planner's "
        f"largest memory error on held-out runs ({MEMORY_MODEL_ERROR:.1%}), so it may not fit"
        + (f"; the fastest plan with more room is {plan_code(safer.plan)} ({_headroom(work, safer):.0%} free, "
           f"{safer.tokens_per_s_per_gpu:,.0f} tokens/s per GPU)" if safer else "")
        + ".", width=100, subsequent_indent="  ")
    if safer:
        lines.append("  " + " ".join(plan_overrides(safer.plan, requested and requested.plan)))
    return lines


def _differences(plan: ParallelPlan, base: ParallelPlan) -> dict[str, Any]:
    """Fields of `plan` that differ from `base`, the degrees always included (so that
    dp_replicate=-1 in `base` cannot fill them differently)."""
    degrees = ("dp_replicate", "dp_shard", "cp", "tp", "ep")
    return {f.name: getattr(plan, f.name) for f in dataclasses.fields(plan)
            if f.name in degrees or getattr(plan, f.name) != getattr(base, f.name)}


def plan_overrides(plan: ParallelPlan, requested: Optional[ParallelPlan] = None) -> list[str]:
    """The `strategy.plan.*` overrides that turn the requested plan (the defaults without one)
    into `plan`."""
    base = requested if requested is not None else ParallelPlan()
    return [f"strategy.plan.{k}={str(v).lower() if isinstance(v, bool) else v}"
            for k, v in _differences(plan, base).items()]


def plan_code(plan: ParallelPlan) -> str:
    """`ParallelPlan(...)` with the fields that differ from its defaults."""
    values = {k: v for k, v in _differences(plan, ParallelPlan()).items() if v != getattr(ParallelPlan(), k)}
    return "ParallelPlan(" + ", ".join(f"{k}={v!r}" for k, v in values.items()) + ")"


def dry_run(model_cfg: ModelConfig, cluster: ClusterSpec, gpu: Union[GpuSpec, str, None] = None,
            micro_batch: int = 1, seq_len: Optional[int] = None, precision: object = "bf16-mixed",
            plan: Optional[ParallelPlan] = None, top: int = 8, *, grad_accum: int = 1,
            loss_chunk_tokens: Optional[int] = None,
            calibration: Calibration = DEFAULT_CALIBRATION) -> str:
    """The dry-run report as text. `plan` is the user's plan: None or "auto" lets the planner
    pick; a manual plan is evaluated, shown first and, if it does not fit, followed by the
    changes that would make it fit. `gpu` may be a GpuSpec, a name, or None to detect."""
    card, gpu_note = resolve_gpu(gpu)
    manual = plan if plan is not None and not plan.is_auto else None
    work = make_workload(model_cfg, cluster, card, micro_batch, seq_len or model_cfg.max_seq_len,
                         precision, grad_accum=grad_accum, loss_chunk_tokens=loss_chunk_tokens,
                         calibration=calibration, template=manual)
    ranked = evaluate_layouts(work)
    report, failure = None, None
    try:
        report = choose(work, ranked)
    except NoPlanFitsError as err:
        failure = err
    selected = ranked[0] if report is not None else None
    requested = work.evaluate(manual) if manual is not None else None
    lines = _header(work, gpu_note) + [""]
    lines += _table(_rows(ranked, selected, requested, top), ranked, work)
    from .pipeline import pipeline_advice

    advice = pipeline_advice(work, selected)
    return "\n".join(lines + [""] + _closing(work, report, failure, requested, ranked)
                     + ([""] + advice if advice else []))


def dry_run_from_config(cfg: Any, model_cfg: ModelConfig, plan: ParallelPlan, world_size: int,
                        gpu: Union[GpuSpec, str, None] = None) -> str:
    """The dry run for a training config (trainer, data, optim groups) and its requested plan.

    The cluster's link speeds are the plan's own (intra_node_gbps, inter_node_gbps), so the
    report and the reducer's flat/hierarchical choice reason about the same network. A config
    that trains on CPU is planned against the CPU stand-in.
    """
    num_nodes = int(cfg.trainer.num_nodes)
    if world_size % num_nodes:
        raise ValueError(f"world size {world_size} is not a multiple of trainer.num_nodes="
                         f"{num_nodes}: set trainer.devices to the GPUs of one node")
    cluster = cluster_for_plan(plan, num_nodes, world_size // num_nodes)
    if gpu is None and str(cfg.trainer.accelerator) == "cpu":
        gpu = CPU
    return dry_run(model_cfg, cluster, gpu, micro_batch=int(cfg.data.micro_batch_size),
                   seq_len=int(cfg.data.seq_len), precision=cfg.trainer.precision, plan=plan,
                   grad_accum=int(cfg.trainer.accumulate_grad_batches),
                   loss_chunk_tokens=cfg.optim.loss_chunk_tokens)


__all__ = ["dry_run", "dry_run_from_config", "resolve_gpu", "plan_overrides", "plan_code"]
