"""The printed dry-run report: model size, FLOPs, and a table of plans with memory and speed.

Everything is computed from the model built on the meta device and the planner's models, so a
dry run for a 16-node recipe finishes in seconds on a laptop.
"""
from __future__ import annotations

import textwrap
from typing import Any, Optional, Union

from ..models.config import ModelConfig
from ..plan import ParallelPlan
from .calibration import DEFAULT_CALIBRATION, Calibration
from ..hardware import CPU, H100_SXM, ClusterSpec, GpuSpec, cluster_for_plan, detect_gpu, gpu_spec
from .memory import precision_spec
from .select import (Evaluation, NoPlanFitsError, PlanReport, Workload, choose, evaluate_layouts,
                     make_workload, nearest_fit)

_COLUMNS = (("plan", 36, "<"), ("AC", 11, "<"), ("params", 7, ">"), ("grads", 7, ">"),
            ("optim", 7, ">"), ("act", 7, ">"), ("comm", 6, ">"), ("total", 7, ">"),
            ("fits", 5, ">"), ("tok/s/GPU", 10, ">"), ("MFU", 5, ">"))


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


def _row(mark: str, e: Evaluation) -> str:
    """One table line; `mark` is up to two characters ('*' selected, '>' requested)."""
    g = e.memory.gib()
    speed = f"{e.timing.tokens_per_s_per_gpu:,.0f}" if e.timing else "-"
    mfu = f"{e.timing.mfu:.0%}" if e.timing else "-"
    values = (_plan_text(e.plan), _ac_short(e.plan), f"{g['params']:.1f}", f"{g['grads']:.1f}",
              f"{g['optimizer']:.1f}", f"{g['activations']:.1f}", f"{g['comm']:.1f}",
              f"{g['total']:.1f}", "yes" if e.fits else "NO", speed, mfu)
    cells = [f"{v:{align}{width}}" for v, (_, width, align) in zip(values, _COLUMNS)]
    return f"{mark:<2}" + " ".join(cells)


def _header_row() -> str:
    return "  " + " ".join(f"{name:{align}{width}}" for name, width, align in _COLUMNS)


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
    return ([_header_row()] + [_row(mark, e) for mark, e in rows]
            + [f"  (GiB per GPU; total adds {work.calibration.cuda_context_gib:.1f} GiB CUDA context "
               f"and {work.calibration.fragmentation:.0%} allocator slack on act + comm; "
               f"{len(ranked)} layouts evaluated, {fitting} fit; * selected, > requested)"])


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
             requested: Optional[Evaluation]) -> list[str]:
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
    return lines


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
    return "\n".join(lines + [""] + _closing(work, report, failure, requested) + ([""] + advice if advice else []))


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


__all__ = ["dry_run", "dry_run_from_config", "resolve_gpu"]
