"""Plan selection: enumerate the layouts a cluster allows, keep those that fit, take the fastest.

Per layout (the degrees and the context-parallel kernel) only one checkpointing policy is
timed: the one with the least recomputation that fits, since recomputation only adds time.
When nothing fits, `nearest_fit` searches the changes a user can make (checkpointing,
sharding, micro-batch, more GPUs, a shorter sequence, precision) and reports each with numbers.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from math import gcd
from typing import Iterator, Optional

from ..models.config import ModelConfig
from ..plan import ParallelPlan, PlanError, divisors
from .calibration import DEFAULT_CALIBRATION, Calibration
from .counts import ModelSummary, ParamCounts, parameter_counts
from ..hardware import GIB, ClusterSpec, GpuSpec
from .memory import MemoryEstimate, estimate_memory, precision_spec
from .timing import TimingEstimate, estimate_time, recompute_share

MIN_CP_CHUNK = 2048  # context parallelism is only proposed while each rank keeps this many tokens
MAX_GPUS = 16384  # nearest_fit doubles the nodes up to this many GPUs
MIN_SEQ_LEN = 128


# ------------------------------------------------------------------------- workload
@dataclass(frozen=True)
class Workload:
    """Everything but the plan that decides memory and time: model, cluster, card and batch."""

    model_cfg: ModelConfig
    cluster: ClusterSpec
    gpu: GpuSpec
    micro_batch: int
    seq_len: int
    precision: str
    grad_accum: int = 1
    loss_chunk_tokens: Optional[int] = None
    calibration: Calibration = DEFAULT_CALIBRATION
    template: ParallelPlan = field(default_factory=ParallelPlan)  # options the candidates copy

    @property
    def counts(self) -> ParamCounts:
        return parameter_counts(self.model_cfg)

    def memory(self, plan: ParallelPlan) -> MemoryEstimate:
        return estimate_memory(self.model_cfg, plan, self.micro_batch, self.seq_len, self.precision,
                               self.gpu, grad_accum=self.grad_accum,
                               loss_chunk_tokens=self.loss_chunk_tokens,
                               calibration=self.calibration, counts=self.counts)

    def timing(self, plan: ParallelPlan) -> TimingEstimate:
        return estimate_time(self.model_cfg, plan, self.cluster, self.gpu, self.micro_batch,
                             self.seq_len, self.precision, grad_accum=self.grad_accum,
                             calibration=self.calibration, counts=self.counts)

    def evaluate(self, plan: ParallelPlan) -> "Evaluation":
        """`plan` timed, with its accumulation policy resolved when "auto"."""
        plan = resolve_accumulation(self, plan).plan
        return Evaluation(plan, self.memory(plan), self.timing(plan))

    def describe(self) -> str:
        return (f"micro_batch={self.micro_batch}, seq_len={self.seq_len}, precision={self.precision}"
                f" on {self.cluster.world_size} x {self.gpu.name} ({self.gpu.memory_gib:.1f} GiB)")


@dataclass(frozen=True)
class Evaluation:
    """One plan's memory and (when timed) speed."""

    plan: ParallelPlan
    memory: MemoryEstimate
    timing: Optional[TimingEstimate] = None

    @property
    def fits(self) -> bool:
        return self.memory.fits

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return self.timing.tokens_per_s_per_gpu if self.timing else 0.0


# ------------------------------------------------------------------------- enumeration
def _tp_degrees(cfg: ModelConfig, world_size: int, gpus_per_node: int) -> list[int]:
    """Tensor parallelism stays inside a node and splits whole query and KV heads."""
    heads = gcd(cfg.n_heads, cfg.n_kv_heads) if cfg.attention == "gqa" else cfg.n_heads
    return [t for t in divisors(gcd(gpus_per_node, world_size)) if heads % t == 0]


def _cp_degrees(rest: int, seq_len: Optional[int]) -> list[int]:
    """Context parallel degrees whose head-tail chunks (2 per rank) divide the sequence and
    leave each rank at least MIN_CP_CHUNK tokens."""
    if seq_len is None:
        return [1]
    return [c for c in divisors(rest)
            if c == 1 or (seq_len % (2 * c) == 0 and seq_len // c >= MIN_CP_CHUNK)]


def _cp_kernels(cfg: ModelConfig, tp: int, cp: int) -> list[str]:
    """Ulysses needs whole query and KV heads on every rank; it is proposed for GQA models only
    (MLA models get all-gather and ring)."""
    if cp == 1:
        return ["allgather"]
    kernels = ["allgather", "ring"]
    if cfg.attention == "gqa" and (cfg.n_heads // tp) % cp == 0 and cfg.n_kv_heads % (tp * cp) == 0:
        kernels.append("ulysses")
    return kernels


def expert_degrees(cfg: ModelConfig, world_size: int) -> list[int]:
    """Expert-parallel degrees: those dividing both the routed experts and the ranks."""
    return divisors(gcd(cfg.n_routed_experts, world_size)) if cfg.is_moe else [1]


def layouts(model_cfg: ModelConfig, world_size: int, gpus_per_node: int,
            seq_len: Optional[int] = None,
            template: Optional[ParallelPlan] = None) -> Iterator[ParallelPlan]:
    """Every valid assignment of degrees (and context-parallel kernel), without checkpointing.

    Sequence parallelism is switched on whenever tp > 1: it costs the same communication as
    tensor parallelism's all-reduces and saves activation memory.
    """
    base = replace(template or ParallelPlan(), mode="manual", activation_checkpointing="none",
                   ac_every_n=1)
    for tp in _tp_degrees(model_cfg, world_size, gpus_per_node):
        for cp in _cp_degrees(world_size // tp, seq_len):
            dp = world_size // (tp * cp)
            for kernel in _cp_kernels(model_cfg, tp, cp):
                for dp_shard in divisors(dp):
                    for ep in expert_degrees(model_cfg, world_size):
                        yield replace(base, dp_replicate=dp // dp_shard, dp_shard=dp_shard, cp=cp,
                                      tp=tp, ep=ep, cp_kernel=kernel, sequence_parallel=tp > 1)


def checkpoint_options(model_cfg: ModelConfig) -> list[tuple[str, int]]:
    """(policy, every_n) pairs the planner considers, roughly by growing recomputation."""
    options = [("none", 1), ("selective", 1), ("attention", 1)]
    options += [("block", n) for n in (4, 2) if model_cfg.n_layers >= 2 * n]
    return options + [("block", 1)]


def candidate_plans(model_cfg: ModelConfig, world_size: int, gpus_per_node: int, *,
                    seq_len: Optional[int] = None,
                    template: Optional[ParallelPlan] = None) -> list[ParallelPlan]:
    """All plans the planner would consider: layouts x checkpointing options."""
    return [replace(plan, activation_checkpointing=policy, ac_every_n=n)
            for plan in layouts(model_cfg, world_size, gpus_per_node, seq_len, template)
            for policy, n in checkpoint_options(model_cfg)]


# ------------------------------------------------------------------------- search
def _with_checkpointing(plan: ParallelPlan, option: tuple[str, int]) -> ParallelPlan:
    return replace(plan, activation_checkpointing=option[0], ac_every_n=option[1])


def accumulation_options(plan: ParallelPlan, grad_accum: int) -> list[str]:
    """The accumulation policies worth comparing for `plan` ("auto" resolved; a choice kept)."""
    if plan.accumulation != "auto":
        return [plan.accumulation]
    if grad_accum == 1 or not plan.sharded:
        return ["defer_all"]  # nothing to defer or nothing sharded: all policies are the same
    options = ["defer_all", "reduce_scatter_each"]
    return options + ["defer_all_reduce"] if plan.dp_replicate > 1 else options


def _fastest_fitting(work: Workload, plans: list[ParallelPlan]) -> tuple[Optional[Evaluation], list[Evaluation]]:
    """(the fastest of `plans` that fits, least memory on ties; the misses, untimed)."""
    fitting, misses = [], []
    for plan in plans:
        memory = work.memory(plan)
        if memory.fits:
            fitting.append(Evaluation(plan, memory, work.timing(plan)))
        else:
            misses.append(Evaluation(plan, memory))
    best = min(fitting, key=lambda e: (-e.tokens_per_s_per_gpu, e.memory.total), default=None)
    return best, misses


def resolve_accumulation(work: Workload, plan: ParallelPlan) -> Evaluation:
    """`plan` with its accumulation policy chosen (when "auto"): the fastest that fits, or the
    one that needs least memory when none does."""
    plan = plan.resolve(work.cluster.world_size)
    plans = [replace(plan, accumulation=a) for a in accumulation_options(plan, work.grad_accum)]
    best, misses = _fastest_fitting(work, plans)
    return best or min(misses, key=lambda e: e.memory.total)


def _best_for_layout(work: Workload, layout: ParallelPlan,
                     options: list[tuple[str, int]]) -> Evaluation:
    """The first of `options` (least recompute first) that fits with some accumulation policy,
    with its fastest fitting policy, timed; else the leanest, untimed."""
    resolved = layout.resolve(work.cluster.world_size)
    policies = accumulation_options(resolved, work.grad_accum)
    misses = []
    for option in options:
        plan = _with_checkpointing(resolved, option)
        best, missed = _fastest_fitting(work, [replace(plan, accumulation=a) for a in policies])
        if best is not None:
            return best
        misses += missed
    return min(misses, key=lambda e: e.memory.total)


def _options_by_recompute(work: Workload) -> list[tuple[str, int]]:
    """Checkpointing options sorted by the recomputation the time model predicts."""
    probe = ParallelPlan()

    def cost(option: tuple[str, int]) -> float:
        return recompute_share(work.model_cfg, work.counts, _with_checkpointing(probe, option),
                               work.seq_len, work.calibration)

    return sorted(checkpoint_options(work.model_cfg), key=cost)


def evaluate_layouts(work: Workload) -> list[Evaluation]:
    """One evaluation per layout; fitting ones first, fastest first, then by memory."""
    options = _options_by_recompute(work)
    evaluations = [_best_for_layout(work, layout, options) for layout in
                   layouts(work.model_cfg, work.cluster.world_size, work.cluster.gpus_per_node,
                           work.seq_len, work.template)]
    return sorted(evaluations, key=_rank)


def _rank(e: Evaluation) -> tuple:
    """Fitting before not; then faster; then less memory; then fewer parallel dimensions."""
    simplicity = sum(v > 1 for v in (e.plan.tp, e.plan.cp, e.plan.ep, e.plan.dp_shard))
    return (not e.fits, -e.tokens_per_s_per_gpu, round(e.memory.total / GIB, 1), simplicity)


def _leanest(work: Workload) -> Optional[Evaluation]:
    """The least memory any layout reaches with full-block checkpointing (no timing)."""
    best: Optional[Evaluation] = None
    for layout in layouts(work.model_cfg, work.cluster.world_size, work.cluster.gpus_per_node,
                          work.seq_len, work.template):
        plan = replace(layout.resolve(work.cluster.world_size), activation_checkpointing="block")
        memory = work.memory(plan)
        if best is None or memory.total < best.memory.total:
            best = Evaluation(plan, memory)
    return best


def _anything_fits(work: Workload) -> bool:
    best = _leanest(work)
    return best is not None and best.fits


# ------------------------------------------------------------------------- report
@dataclass
class PlanReport:
    """What the planner saw and why it chose what it chose."""

    plan: ParallelPlan
    memory: MemoryEstimate
    timing: Optional[TimingEstimate]
    reason: str
    candidates: list[Evaluation]
    model: ModelSummary
    workload: Workload

    @property
    def fits(self) -> bool:
        return self.memory.fits


class NoPlanFitsError(PlanError):
    """No plan fits the card; the message carries the numbers and the nearest change that fits."""

    def __init__(self, message: str, leanest: Optional[Evaluation],
                 suggestions: list["FitSuggestion"]) -> None:
        super().__init__(message)
        self.leanest = leanest
        self.suggestions = suggestions


def _share(part: float, whole: float) -> str:
    return f"{part / whole:.0%}" if whole > 0 else "0%"


def _ac_text(plan: ParallelPlan) -> str:
    if plan.activation_checkpointing == "none":
        return "no activation checkpointing"
    every = f" on every {plan.ac_every_n}th block" if plan.ac_every_n > 1 else ""
    return f"{plan.activation_checkpointing} activation checkpointing{every}"


def _biggest_difference(a: TimingEstimate, b: TimingEstimate) -> str:
    names = {"compute_s": "compute", "recompute_s": "recomputation", "tp_s": "tensor-parallel "
             "collectives", "cp_s": "context-parallel exchange", "ep_s": "expert all-to-alls",
             "fsdp_exposed_s": "FSDP all-gathers", "dp_exposed_s": "gradient reduction",
             "optimizer_s": "the optimizer step", "offload_s": "activation offload's host copies"}
    ours, theirs = a.breakdown(), b.breakdown()
    key = max(names, key=lambda k: theirs[k] / b.tokens_per_step - ours[k] / a.tokens_per_step)
    return names[key]


def _shape(plan: ParallelPlan) -> tuple:
    """What makes two plans different in kind, not just in how data parallelism is split."""
    return (plan.tp, plan.cp, plan.cp_kernel, plan.ep, plan.sharded, plan.activation_checkpointing,
            plan.ac_every_n)


def _slower(other: Evaluation, chosen: Evaluation) -> str:
    return f"{1 - other.tokens_per_s_per_gpu / chosen.tokens_per_s_per_gpu:.1%}"


def _sharding_text(chosen: Evaluation, ranked: list[Evaluation]) -> str:
    plan = chosen.plan
    replicated = [e for e in ranked if not e.plan.sharded]
    fitting = [e for e in replicated if e.fits]
    if not plan.sharded:
        return "Parameters stay replicated: their full training state fits beside the activations."
    if not fitting:
        leanest = min((e.memory.total for e in replicated), default=float("nan"))
        return (f"Parameters, gradients and AdamW state are sharded over dp_shard={plan.dp_shard}: "
                f"replicated data parallelism needs at least {leanest / GIB:.1f} GiB per GPU.")
    best = fitting[0]
    return (f"Sharding over dp_shard={plan.dp_shard} beats the best replicated layout "
            f"({best.plan.describe()} with {_ac_text(best.plan)}), which is predicted "
            f"{_slower(best, chosen)} slower.")


def _reason(chosen: Evaluation, ranked: list[Evaluation], work: Workload) -> str:
    """One paragraph: what was chosen, its numbers, why sharding/tp/cp/ep, and the best plan
    of a different kind."""
    plan, t, m = chosen.plan, chosen.timing, chosen.memory
    fitting = [e for e in ranked if e.fits]
    parts = [f"{plan.describe()} with {_ac_text(plan)} is the fastest of {len(fitting)} layouts "
             f"that fit ({len(ranked)} evaluated): {t.tokens_per_s_per_gpu:,.0f} tokens/s per GPU, "
             f"MFU {t.mfu:.0%}, {m.total / GIB:.1f} of {m.capacity / GIB:.1f} usable GiB.",
             _sharding_text(chosen, ranked)]
    if plan.tp > 1:
        parts.append(f"Tensor parallelism {plan.tp} stays inside a node; its exposed collectives "
                     f"take {_share(t.tp_s, t.step_s)} of the step.")
    if plan.cp > 1:
        cost = ("hides behind attention" if t.cp_s == 0 else
                f"takes {_share(t.cp_s, t.step_s)} of the step")
        parts.append(f"Context parallelism {plan.cp} ({plan.cp_kernel}) splits the {work.seq_len}-"
                     f"token sequence; its exchange {cost}.")
    if plan.ep > 1:
        parts.append(f"Experts are spread over ep={plan.ep}; the all-to-alls take "
                     f"{_share(t.ep_s, t.step_s)} of the step.")
    other = next((e for e in fitting if _shape(e.plan) != _shape(plan)), None)
    if other is not None:
        parts.append(f"The best plan of another kind, {other.plan.describe()} with "
                     f"{_ac_text(other.plan)}, is predicted {_slower(other, chosen)} slower, "
                     f"mostly in {_biggest_difference(t, other.timing)}.")
    return " ".join(parts)


# ------------------------------------------------------------------------- nearest fit
@dataclass(frozen=True)
class FitSuggestion:
    """A change that makes the workload fit, with the estimate after the change."""

    change: str
    plan: ParallelPlan
    memory: MemoryEstimate

    def __str__(self) -> str:
        return (f"{self.change} -> {self.memory.total / GIB:.1f} of {self.memory.capacity / GIB:.1f}"
                f" usable GiB with {self.plan.describe()}, {_ac_text(self.plan)}")


def _plan_changes(work: Workload, plan: ParallelPlan) -> list[FitSuggestion]:
    """Changes to a plan, nearest first: checkpointing alone; sequence parallelism (when tp > 1);
    more sharding with the same tp/cp/ep, each with the least checkpointing that fits; and where
    none of those fits, block checkpointing with activation offload."""
    options = _options_by_recompute(work)
    found = _checkpointing_fit(work, plan, options)
    if plan.tp > 1 and not plan.sequence_parallel:
        found += _first_layout_fit(work, [("sequence_parallel=True",
                                           replace(plan, sequence_parallel=True))], options)
    dp = plan.dp_replicate * plan.dp_shard
    found += _first_layout_fit(work, [(f"dp_shard={d}", replace(plan, dp_shard=d,
                                                                dp_replicate=dp // d))
                                      for d in divisors(dp) if d > plan.dp_shard], options)
    if not found and not plan.offload_activations:
        # only with every block checkpointed: the blocks' inputs are what host memory then holds
        # (4 KB a token per 2048-wide block in bf16), where any other policy's saved tensors
        # would take hundreds of GiB of host memory per GPU at the lengths that need offload
        found += _checkpointing_fit(work, replace(plan, offload_activations=True), [("block", 1)])
    return found


def _checkpointing_fit(work: Workload, plan: ParallelPlan,
                       options: list[tuple[str, int]]) -> list[FitSuggestion]:
    """The first checkpointing option (in the order given) with which `plan` fits, as a change;
    under activation offload the change says how much host memory the saved tensors take."""
    for option in options:
        candidate = _with_checkpointing(plan, option)
        memory = work.memory(candidate)
        if not memory.fits:
            continue
        change = f"activation_checkpointing={option[0]!r}" + (f", ac_every_n={option[1]}" if option[1] > 1 else "")
        if plan.offload_activations:
            change += (f", offload_activations=True (about {memory.host_activations / GIB:.0f} GiB "
                       f"of saved tensors in pinned host memory per GPU)")
        return [FitSuggestion(change, candidate, memory)]
    return []


def _first_layout_fit(work: Workload, trials: list[tuple[str, ParallelPlan]],
                      options: list[tuple[str, int]]) -> list[FitSuggestion]:
    for change, layout in trials:
        evaluation = _best_for_layout(work, layout, options)
        if evaluation.fits:
            return [FitSuggestion(change, evaluation.plan, evaluation.memory)]
    return []


def _halvings(value: int, floor: int) -> Iterator[int]:
    while value // 2 >= floor:
        value //= 2
        yield value


def _workload_changes(work: Workload) -> list[FitSuggestion]:
    """Changes to the run itself, each the smallest of its kind that lets some plan fit."""
    found = _first_fit([(f"micro_batch={mb} (accumulate_grad_batches="
                         f"{work.grad_accum * work.micro_batch // mb} keeps the batch)",
                         replace(work, micro_batch=mb,
                                 grad_accum=work.grad_accum * work.micro_batch // mb))
                        for mb in _halvings(work.micro_batch, 1)])
    nodes = [work.cluster.num_nodes * 2 ** k for k in range(1, 32)
             if work.cluster.num_nodes * 2 ** k * work.cluster.gpus_per_node <= MAX_GPUS]
    found += _first_fit([(f"num_nodes={n} ({n * work.cluster.gpus_per_node} GPUs)",
                          replace(work, cluster=replace(work.cluster, num_nodes=n))) for n in nodes])
    found += _first_fit([(f"seq_len={s}", replace(work, seq_len=s))
                         for s in _halvings(work.seq_len, MIN_SEQ_LEN)])
    if precision_spec(work.precision).autocast:
        found += _first_fit([("precision='bf16-true' (no fp32 master weights or fp32 AdamW state)",
                              replace(work, precision="bf16-true"))])
    return found


def _first_fit(trials: list[tuple[str, Workload]]) -> list[FitSuggestion]:
    for change, trial in trials:
        if _anything_fits(trial):
            best = evaluate_layouts(trial)[0]
            return [FitSuggestion(change, best.plan, best.memory)]
    return []


def nearest_fit(model_cfg: ModelConfig, cluster: ClusterSpec, gpu: GpuSpec, micro_batch: int,
                seq_len: int, precision: object = "bf16-mixed", *,
                plan: Optional[ParallelPlan] = None, grad_accum: int = 1,
                loss_chunk_tokens: Optional[int] = None,
                calibration: Calibration = DEFAULT_CALIBRATION) -> list[FitSuggestion]:
    """Changes that make the run fit, nearest first: for a given `plan`, checkpointing, sequence
    parallelism and sharding; then any plan on this cluster; then a smaller micro-batch (keeping the batch by
    accumulation), more nodes, a shorter sequence and, last, bf16-true. [] when it fits."""
    work = make_workload(model_cfg, cluster, gpu, micro_batch, seq_len, precision,
                         grad_accum=grad_accum, loss_chunk_tokens=loss_chunk_tokens,
                         calibration=calibration, template=plan)
    found: list[FitSuggestion] = []
    if plan is not None and not plan.is_auto:
        resolved = plan.resolve(cluster.world_size)
        if work.memory(resolved).fits:
            return []
        found += _plan_changes(work, resolved)
    if _anything_fits(work):
        if found:
            return found
        best = evaluate_layouts(work)[0]
        return [FitSuggestion("let the planner choose (plan='auto')", best.plan, best.memory)]
    return found + _workload_changes(work)


# ------------------------------------------------------------------------- selection
def _no_fit_message(work: Workload, leanest: Optional[Evaluation],
                    suggestions: list[FitSuggestion]) -> str:
    head = f"No parallel plan fits {work.describe()}"
    if leanest is not None:
        head += (f": the leanest, {leanest.plan.describe()} with {_ac_text(leanest.plan)}, needs "
                 f"{leanest.memory.describe()}")
    if not suggestions:
        return head + ". No single change found makes it fit: reduce the model or the batch."
    lines = [head + ".", f"Nearest fit: {suggestions[0]}."]
    lines += [f"  or: {s}" for s in suggestions[1:]]
    return "\n".join(lines)


def make_workload(model_cfg: ModelConfig, cluster: ClusterSpec, gpu: GpuSpec, micro_batch: int,
                  seq_len: int, precision: object = "bf16-mixed", *, grad_accum: int = 1,
                  loss_chunk_tokens: Optional[int] = None,
                  calibration: Calibration = DEFAULT_CALIBRATION,
                  template: Optional[ParallelPlan] = None) -> Workload:
    """A validated Workload: bad sizes fail here, naming the value, before any search."""
    if micro_batch < 1 or seq_len < 1 or grad_accum < 1:
        raise ValueError(f"micro_batch={micro_batch}, seq_len={seq_len} and grad_accum="
                         f"{grad_accum} must all be >= 1")
    if seq_len > model_cfg.max_seq_len:
        raise ValueError(f"seq_len={seq_len} is longer than the model's max_seq_len="
                         f"{model_cfg.max_seq_len}: shorten it or raise model.max_seq_len")
    return Workload(model_cfg, cluster, gpu, micro_batch, seq_len, precision_spec(precision).name,
                    grad_accum, loss_chunk_tokens, calibration, template or ParallelPlan())


def choose(work: Workload, ranked: Optional[list[Evaluation]] = None) -> PlanReport:
    """The report for the fastest fitting plan of `ranked` (evaluated here when not given);
    NoPlanFitsError with the numbers and the nearest fit when none fits."""
    ranked = evaluate_layouts(work) if ranked is None else ranked
    if not ranked or not ranked[0].fits:
        leanest = min(ranked, key=lambda e: e.memory.total, default=None)
        suggestions = nearest_fit(work.model_cfg, work.cluster, work.gpu, work.micro_batch,
                                  work.seq_len, work.precision, grad_accum=work.grad_accum,
                                  loss_chunk_tokens=work.loss_chunk_tokens,
                                  calibration=work.calibration)
        raise NoPlanFitsError(_no_fit_message(work, leanest, suggestions), leanest, suggestions)
    chosen = ranked[0]
    return PlanReport(chosen.plan, chosen.memory, chosen.timing, _reason(chosen, ranked, work),
                      ranked, work.counts.summary(work.model_cfg, work.seq_len), work)


def select_plan(model_cfg: ModelConfig, cluster: ClusterSpec, gpu: GpuSpec, micro_batch: int,
                seq_len: int, precision: object = "bf16-mixed", *, grad_accum: int = 1,
                loss_chunk_tokens: Optional[int] = None,
                calibration: Calibration = DEFAULT_CALIBRATION,
                template: Optional[ParallelPlan] = None) -> tuple[ParallelPlan, PlanReport]:
    """The fastest plan that fits, and the report behind the choice.

    `template` supplies the options the planner does not choose (compile, bucket size, ...).
    Raises NoPlanFitsError (a PlanError, so a ValueError) naming the numbers and the nearest fit.
    """
    report = choose(make_workload(model_cfg, cluster, gpu, micro_batch, seq_len, precision,
                                  grad_accum=grad_accum, loss_chunk_tokens=loss_chunk_tokens,
                                  calibration=calibration, template=template))
    return report.plan, report


__all__ = ["Workload", "Evaluation", "PlanReport", "FitSuggestion", "NoPlanFitsError",
           "candidate_plans", "layouts", "checkpoint_options", "evaluate_layouts", "make_workload",
           "choose", "select_plan", "nearest_fit", "accumulation_options",
           "resolve_accumulation"]
