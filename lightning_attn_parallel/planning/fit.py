"""Fit the planner's compute constants to measured throughput on one card.

The compute time of `estimate_time` is linear in 1/matmul_efficiency, 1/attention_efficiency
and the element-wise bytes (timing.compute_terms), so a handful of single-GPU runs at different
sequence lengths, checkpointing policies, precisions and compile settings determine them by
least squares. Each run is weighted by its own step time, so the fit minimises relative error.
Written here because it is a small non-negative least-squares problem over the planner's own
terms; numpy's lstsq does the algebra.

    python -m lightning_attn_parallel.planning.fit benchmarks/results/planner_fit_h200.json
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from ..models.config import ModelConfig
from ..plan import ParallelPlan
from .calibration import DEFAULT_CALIBRATION, Calibration
from .counts import parameter_counts
from ..hardware import ClusterSpec, GpuSpec, gpu_spec
from .memory import compute_precision, precision_spec
from .timing import compute_terms, estimate_time, loss_time

# the unknowns, in the order of the regression's columns, and the Calibration field each one is
# (inverted: the column is seconds per unit of 1/field)
UNKNOWNS = ("matmul", "attention", "autocast", "eager", "compiled", "selective", "grouped", "loop",
            "grouped_compiled")
FIELDS = {"matmul": ("matmul_efficiency", True), "attention": ("attention_efficiency", True),
          "autocast": ("elementwise_bytes_autocast", False),
          "eager": ("elementwise_bytes_eager", False),
          "compiled": ("elementwise_bytes_compiled", False),
          "selective": ("selective_recompute_bytes", False),
          "grouped": ("expert_efficiency_grouped", True), "loop": ("expert_efficiency_loop", True),
          "grouped_compiled": ("expert_efficiency_grouped_compiled", True)}


def _unit(name: str, cal: Calibration) -> float:
    """The value of unknown `name` in `cal`, in the regression's units."""
    field, invert = FIELDS[name]
    return 1.0 / getattr(cal, field) if invert else getattr(cal, field)


@dataclass(frozen=True)
class Measurement:
    """One single-GPU training run: its configuration and measured tokens/s."""

    model: ModelConfig
    plan: ParallelPlan
    gpu: GpuSpec
    micro_batch: int
    seq_len: int
    precision: str
    tokens_per_s: float
    loss_chunk_tokens: Optional[int] = None
    compiled_loss: Optional[bool] = None  # None: as the plan runs today (see EAGER_LOSS_RESULTS)


def _row(m: Measurement, cal: Calibration) -> tuple[np.ndarray, float]:
    """(seconds per step per unit of each unknown, seconds the unknowns do not explain: the
    optimizer and the loss kernel, whose constants come from kernel profiles)."""
    counts = parameter_counts(m.model)
    plan = m.plan.resolve(1)
    p = precision_spec(m.precision)
    base, redo = compute_terms(m.model, counts, plan, m.gpu, m.seq_len, p.name)
    tokens = m.micro_batch * m.seq_len
    elementwise = base["elementwise"] + redo["elementwise"]
    autocast = compute_precision(p, plan).autocast
    mode = "compiled" if plan.compiled else ("autocast" if autocast else "eager")
    loss, loss_redo, head_redo = loss_time(m.model, counts, plan, m.gpu, tokens, p.name,
                                           m.loss_chunk_tokens, cal, m.compiled_loss)
    matmul = base["matmul"] + redo["matmul"] + head_redo / tokens
    kernel = "loop" if not plan.grouped_gemm else ("grouped_compiled" if plan.compiled else "grouped")
    coefficients = {"matmul": matmul, "attention": base["attention"] + redo["attention"],
                    mode: elementwise, "selective": redo["selective"],
                    kernel: base["experts"] + redo["experts"]}
    row = np.array([tokens * coefficients.get(name, 0.0) for name in UNKNOWNS])
    fixed = estimate_time(m.model, plan, ClusterSpec(1, 1), m.gpu, m.micro_batch, m.seq_len,
                          m.precision, calibration=cal, counts=counts).optimizer_s
    return row, fixed + loss + loss_redo


def _nonnegative_lstsq(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Least squares with every unknown >= 0: drop the most negative one and solve again."""
    active = [j for j in range(a.shape[1]) if np.any(a[:, j])]
    while True:
        x = np.zeros(a.shape[1])
        x[active] = np.linalg.lstsq(a[:, active], b, rcond=None)[0]
        if not active or x[active].min() >= 0:
            return x
        active.remove(active[int(np.argmin(x[active]))])


def fit_calibration(measurements: Iterable[Measurement], base: Calibration = DEFAULT_CALIBRATION,
                    unknowns: Iterable[str] = UNKNOWNS) -> Calibration:
    """`base` with the compute constants named in `unknowns` fitted to `measurements`; the others,
    and a constant that no measurement exercises (say, no compiled run), keep their value from
    `base` (so MoE runs can fit the expert efficiencies with the dense constants held)."""
    free = [name for name in UNKNOWNS if name in set(unknowns)]
    held = np.array([0.0 if name in free else _unit(name, base) for name in UNKNOWNS])
    rows, targets = [], []
    for m in measurements:
        row, fixed = _row(m, base)
        step = m.micro_batch * m.seq_len / m.tokens_per_s
        rows.append(row / step)
        targets.append((step - fixed - row @ held) / step)
    a, b = np.array(rows), np.array(targets)
    a[:, [j for j, name in enumerate(UNKNOWNS) if name not in free]] = 0.0
    x = _nonnegative_lstsq(a, b)
    changes = {}
    for j, name in enumerate(UNKNOWNS):
        field, invert = FIELDS[name]
        if not np.any(a[:, j]) or (invert and x[j] <= 0):
            continue
        changes[field] = 1.0 / x[j] if invert else float(x[j])
    return replace(base, **changes)


# Results recorded before compiled plans compiled the loss kernel too (parallel.apply
# .apply_compile): their compiled rows ran the loss eagerly.
EAGER_LOSS_RESULTS = frozenset({
    "planner.json", "long_context.json", "strategies_a.json", "strategies_b.json", "callbacks.json",
    "moe.json", "multi_gpu.json", "multi_gpu_b.json", "planner_fit_h200.json", "planner_check_h200.json",
    "planner_moe_check_h200.json", "sharding_h200.json", "speed_h200.json", "speed_fp8_h200.json",
    "speed_profile_h200.json", "moe_speed_eager_loss_h200.json", "moe_profile_h200.json"})


def fit_rows(path: str | Path) -> list[tuple[dict, dict]]:
    """The (config, result) rows of a benchmarks/bench.py JSON file a fit can use: single-GPU
    attn_hybrid or Lightning single-device runs that trained. Profiled rows (the profiler slows
    them) and liger's fused loss (a kernel the planner does not model) are left out."""
    return [(cfg, result) for cfg, result in json.loads(Path(path).read_text())
            if "tokens_per_s" in result and cfg.get("devices", 1) == 1
            and cfg.get("strategy") in ("attn_hybrid", "auto")
            and not cfg.get("profile") and not cfg.get("fused_loss")]


def recorded_plan(cfg: dict, result: dict) -> ParallelPlan:
    """The ParallelPlan a recorded bench row ran: its levers and plan fields. A row that records
    no mixed_precision (neither in its plan nor in its result) ran Lightning's autocast, the
    default of "bf16-mixed" before master weights."""
    levers = dict(activation_checkpointing=cfg["checkpointing"], compile=cfg["compile"],
                  grouped_gemm=cfg.get("grouped_gemm", True))
    ran = result.get("mixed_precision", "autocast")
    return ParallelPlan(**{**levers, "mixed_precision": ran, **cfg.get("plan", {})})


def measurements_from_bench(path: str | Path) -> list[Measurement]:
    """`fit_rows(path)` as Measurements, with each row's own plan fields (fp8, whole-model
    compile, mixed_precision)."""
    out = []
    eager_loss_file = Path(path).name in EAGER_LOSS_RESULTS
    for cfg, result in fit_rows(path):
        plan = recorded_plan(cfg, result)
        out.append(Measurement(ModelConfig(**cfg["model"]), plan, gpu_spec(result["device"]),
                               cfg["micro_batch"], cfg["seq_len"], cfg["precision"],
                               result["tokens_per_s"], cfg.get("loss_chunk_tokens"),
                               # Lightning's own strategy rows compile only the blocks (bench.py)
                               False if eager_loss_file or cfg["strategy"] != "attn_hybrid" else None))
    return out


def main(argv: Optional[list[str]] = None) -> None:
    paths = argv if argv is not None else sys.argv[1:]
    measurements = [m for path in paths for m in measurements_from_bench(path)]
    cal = fit_calibration(measurements)
    for name, _ in FIELDS.values():
        print(f"{name} = {getattr(cal, name):.4g}")
    for m in measurements:
        t = estimate_time(m.model, m.plan, ClusterSpec(1, 1), m.gpu, m.micro_batch, m.seq_len,
                          m.precision, loss_chunk_tokens=m.loss_chunk_tokens, calibration=cal,
                          compiled_loss=m.compiled_loss)
        print(f"{m.gpu.name:9s} mb{m.micro_batch} s{m.seq_len} {m.plan.activation_checkpointing:9s} "
              f"{m.precision:10s} compile={m.plan.compile!s:5s} measured {m.tokens_per_s:8,.0f} "
              f"predicted {t.tokens_per_s:8,.0f} ({100 * (t.tokens_per_s / m.tokens_per_s - 1):+.1f}%)")


if __name__ == "__main__":
    main()


__all__ = ["EAGER_LOSS_RESULTS", "Measurement", "fit_calibration", "fit_rows", "measurements_from_bench",
           "recorded_plan"]
