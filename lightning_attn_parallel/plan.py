"""ParallelPlan: the parallel degrees of a run and the options of each parallelism.

Validation happens here, before any process group exists, so a plan that cannot work fails
with one message naming the value and the fix.
"""
from __future__ import annotations

import functools
import types
import typing
from dataclasses import dataclass, field, fields, replace
from typing import Any, List, Optional, Union

from .errors import UserError

CP_KERNELS = ("allgather", "ring", "ulysses")
HIERARCHICAL_MODES = ("auto", "always", "never")
CHECKPOINT_POLICIES = ("none", "attention", "block", "selective")
# "-mixed" precisions on replicated parameters (parallel/fully_sharded.py: casts_parameters)
MIXED_PRECISION_MODES = ("autocast", "master_weights", "cast_params")
# Gradient accumulation under FSDP2/HSDP (parallel/fully_sharded.py says what each sends and keeps)
# torch.compile: nothing, each block (composes with every plan), or the whole model (replicated only)
COMPILE_MODES = ("none", "block", "model")
# torch.compile's mode for either compiled granularity ("default": torch's default)
COMPILE_TUNING = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")
FP8_MODES = ("none", "tensorwise", "rowwise")  # parallel/float8.py
# the narrowest linear layer fp8 converts (torchao's own guidance: fp8 pays off from about this
# width at these shapes); the planner reads it to know which layers run in fp8
FP8_MIN_FEATURES = 1024
# fp8 GEMMs need every dimension (and each expert's row count) in multiples of 16: 16 bytes at one
# byte an element
FP8_MULTIPLE = 16
ACCUMULATION_POLICIES = ("auto", "defer_all", "reduce_scatter_each", "defer_all_reduce")
# Pipeline schedules (parallel/pipeline_schedule.py); the zero-bubble ones split each backward into
# its input and weight halves and fill the bubble with weight halves
PP_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "interleaved_zb", "zbv")


class PlanError(UserError):
    """A plan that cannot run on this world size or this model."""


def _limits(*, minimum: Any = None, above: Any = None, also: tuple = (), choices: tuple = ()) -> dict:
    """Range metadata for a plan field; `__post_init__` checks every field's type and range."""
    return {"minimum": minimum, "above": above, "also": also, "choices": choices}


@dataclass
class ParallelPlan:
    """Degrees and options. `dp_replicate=-1` fills the world with replicated data parallelism.

    Dense layers run on the mesh (dp_replicate, dp_shard, cp, tp); experts on (edp, ep), a second
    view of the same ranks, so `ep` is chosen independently of the attention layout.
    `ParallelPlan("auto")` defers the choice to the planner (see planning/).

    Every field is checked against its annotated type (a bool is not an int, "true" is not a
    bool) and the `_limits` in its metadata, so a field added later is validated by declaring it.
    """

    mode: str = field(default="manual", metadata=_limits(choices=("manual", "auto")))
    dp_replicate: int = field(default=-1, metadata=_limits(minimum=1, also=(-1,)))
    dp_shard: int = field(default=1, metadata=_limits(minimum=1))
    cp: int = field(default=1, metadata=_limits(minimum=1))
    tp: int = field(default=1, metadata=_limits(minimum=1))
    ep: int = field(default=1, metadata=_limits(minimum=1))
    # data parallel (replicated parameters)
    bucket_mb: float = field(default=25.0, metadata=_limits(above=0))
    hierarchical: str = field(default="auto", metadata=_limits(choices=HIERARCHICAL_MODES))
    ranks_per_node: Optional[int] = field(default=None, metadata=_limits(minimum=1))  # None: the launcher's
    intra_node_gbps: float = field(default=450.0, metadata=_limits(above=0))  # NVLink 4 per direction, GB/s
    inter_node_gbps: float = field(default=50.0, metadata=_limits(above=0))  # 400 Gb/s InfiniBand, GB/s
    # tensor parallel
    sequence_parallel: bool = False
    # context parallel
    cp_kernel: str = field(default="allgather", metadata=_limits(choices=CP_KERNELS))
    # sequences shorter than this run batch-parallel on the CP ranks
    cp_min_seq_len: int = field(default=0, metadata=_limits(minimum=0))
    cp_load_balance: bool = True
    # expert parallel
    grouped_gemm: bool = True
    # "bf16-mixed": Lightning's autocast (fp32 weights and residual stream, a cast per matmul),
    # "master_weights" (bf16 compute on copies cast once a step from fp32 masters the optimizer
    # updates; FSDP2 does the same for sharded parameters) or "cast_params" (FSDP2 casting
    # replicated parameters per forward, the older form of master weights)
    mixed_precision: str = field(default="master_weights", metadata=_limits(choices=MIXED_PRECISION_MODES))
    # master weights: micro-batch gradients added into the fp32 master gradient each time
    # ("master"), or accumulated in the bf16 compute copies and added once ("compute")
    accumulate_grads_in: str = field(default="master", metadata=_limits(choices=("master", "compute")))
    # master weights: AdamW/Adam steps, refresh included, as one pass reading the bf16 gradients
    # where no bucket reduces them (parallel/master_adamw.py); False keeps torch's own step
    fused_master_step: bool = True
    # sharded data parallel: what micro-batches that only accumulate send ("auto": the planner)
    accumulation: str = field(default="auto", metadata=_limits(choices=ACCUMULATION_POLICIES))
    # memory levers
    activation_checkpointing: str = field(default="none", metadata=_limits(choices=CHECKPOINT_POLICIES))
    ac_every_n: int = field(default=1, metadata=_limits(minimum=1))
    offload_activations: bool = False
    # fp8 matmuls in the blocks' large linear layers (torchao float8): "tensorwise" or "rowwise" scales
    fp8: str = field(default="none", metadata=_limits(choices=FP8_MODES))
    # the routed experts' grouped GEMMs in fp8 with rowwise scales (torchao, sm90+); the rows
    # each expert gets are padded to a multiple of 16 (models/token_groups.py)
    fp8_experts: bool = False
    # a bool is kept for older configs: True is "block", False "none"
    compile: Union[bool, str] = field(default="none", metadata=_limits(choices=COMPILE_MODES))
    # torch.compile's mode: "reduce-overhead" replays each compiled graph as a CUDA graph (no
    # launch gaps); "max-autotune-no-cudagraphs" benchmarks Triton GEMM templates against cuBLAS
    # and fuses element-wise neighbours into the chosen templates (minutes of compiling);
    # "max-autotune" does both
    compile_mode: str = field(default="default", metadata=_limits(choices=COMPILE_TUNING))
    # one GEMM for projections sharing an input (q|k|v, gate|up, MLA's down projections); the
    # parameters and their names are unchanged (models/fused_projections.py)
    fuse_projections: bool = False
    # pipeline parallel: stages over the outermost mesh dimension (parallel/pipeline.py)
    pp: int = field(default=1, metadata=_limits(minimum=1))
    pp_schedule: str = field(default="1f1b", metadata=_limits(choices=PP_SCHEDULES))
    # micro-batches each batch is split into (None: one per stage, the fewest the schedules take)
    pp_microbatches: Optional[int] = field(default=None, metadata=_limits(minimum=1))
    # stages each rank holds (None: 2 for the interleaved and zero-bubble schedules, else 1)
    pp_stages_per_rank: Optional[int] = field(default=None, metadata=_limits(minimum=1))
    # blocks of each stage, in order (None: balanced by cost, embedding first, head and loss last)
    pp_layers_per_stage: Optional[List[int]] = None

    def __post_init__(self) -> None:
        if self.mode not in ("manual", "auto"):
            raise PlanError(f"ParallelPlan mode={self.mode!r} is unknown: use ParallelPlan('auto') "
                            "or give degrees, e.g. ParallelPlan(tp=2, dp_shard=2)")
        if isinstance(self.compile, bool):
            self.compile = "block" if self.compile else "none"
        hints = _field_types(type(self))
        for f in fields(self):
            _check_field(f.name, getattr(self, f.name), hints[f.name], f.metadata)
        if self.fp8 != "none" and self.tp > 1:
            raise PlanError(f"ParallelPlan fp8={self.fp8!r} does not compose with tensor parallelism "
                            f"(tp={self.tp}) yet: set tp=1 or fp8='none'")
        if self.fp8_experts and not self.grouped_gemm:
            raise PlanError("ParallelPlan fp8_experts=True runs the experts' grouped GEMMs in fp8; "
                            "grouped_gemm=False loops over the experts instead: set grouped_gemm=True "
                            "or fp8_experts=False")
        if self.compile == "model" and (max(self.tp, self.cp, self.ep, self.dp_shard) > 1
                                        or self.mixed_precision == "cast_params"):
            raise PlanError("ParallelPlan compile='model' composes with replicated data parallelism "
                            "only (tp, cp, ep and dp_shard 1, mixed_precision 'autocast' or "
                            "'master_weights'), where no collective or FSDP hook runs inside the "
                            "forward: use compile='block'")
        if self.pp > 1 or self.pp_layers_per_stage is not None:
            from .pipeline_plan import check_pipeline_plan

            check_pipeline_plan(self)

    # ------------------------------------------------------------------ degrees
    @property
    def is_auto(self) -> bool:
        return self.mode == "auto"

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def world_size(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard * self.cp * self.tp

    @property
    def stage_ranks(self) -> int:
        """Ranks of one pipeline stage (the whole world without pipeline parallelism)."""
        return self.world_size // self.pp

    @property
    def edp(self) -> int:
        """Data-parallel degree of the experts: the ranks of a stage left over once ep is taken."""
        return self.stage_ranks // self.ep

    @property
    def gradient_ranks(self) -> int:
        """Ranks whose dense gradients are averaged: every rank holding other tokens (dp x cp)."""
        return self.dp_replicate * self.dp_shard * self.cp

    @property
    def expert_gradient_scale(self) -> float:
        """What expert gradients, summed over the edp ranks holding the same experts, are
        multiplied by: 1 / (dp x cp), as dense gradients are averaged. An expert already sums
        the tokens its whole ep group routed to it, so edp sums cover every token once and the
        scale is the dense data-parallel size, not edp (Megatron-Core's rule)."""
        return 1.0 / self.gradient_ranks

    @property
    def compiled(self) -> bool:
        return self.compile != "none"

    @property
    def sharded(self) -> bool:
        return self.dp_shard > 1

    def resolve(self, world_size: int) -> "ParallelPlan":
        """Fill dp_replicate=-1 and check that the degrees multiply to the world size."""
        if self.is_auto:
            raise PlanError("ParallelPlan('auto') must be resolved by the planner first "
                            "(lightning_attn_parallel.planning.select_plan)")
        fixed = self.pp * self.dp_shard * self.cp * self.tp
        plan = self
        if self.dp_replicate == -1:
            if world_size % fixed:
                pp = f"pp={self.pp} x " if self.pp > 1 else ""
                raise PlanError(
                    f"ParallelPlan {pp}dp_shard={self.dp_shard} x cp={self.cp} x tp={self.tp} = {fixed} "
                    f"does not divide the world size {world_size}: choose degrees whose product "
                    f"divides {world_size}")
            plan = replace(self, dp_replicate=world_size // fixed)
        if plan.world_size != world_size:
            raise PlanError(
                f"ParallelPlan pp={plan.pp} x dp_replicate={plan.dp_replicate} x dp_shard={plan.dp_shard} x "
                f"cp={plan.cp} x tp={plan.tp} = {plan.world_size} does not equal the world size "
                f"{world_size}: set dp_replicate=-1 to fill it, or change the degrees")
        if world_size % plan.ep:
            raise PlanError(f"ParallelPlan ep={plan.ep} does not divide the world size {world_size}: "
                            f"choose ep among the divisors of {world_size}")
        if plan.stage_ranks % plan.ep:  # pp > 1: experts are split within each stage's ranks
            raise PlanError(f"ParallelPlan ep={plan.ep} does not divide the {plan.stage_ranks} ranks of a "
                            f"pipeline stage (world {world_size} / pp={plan.pp}): choose ep among "
                            f"{divisors(plan.stage_ranks)}")
        return plan

    def check_model(self, model_cfg: Any, seq_len: Optional[int] = None,
                    micro_batch_size: Optional[int] = None) -> None:
        """The one check of the degrees against a model (ModelConfig) and, when given, the batch
        shape: heads and KV heads for tp, heads for Ulysses, experts for ep, and sequence
        lengths for context and sequence parallelism. The CLI's pre-flight and the strategy's
        set-up both call it; parallel/ keeps only cheap internal asserts."""
        heads = model_cfg.n_heads
        if heads % self.tp:
            raise PlanError(f"ParallelPlan tp={self.tp} does not divide the model's n_heads={heads}: "
                            f"choose tp among {divisors(heads)}")
        kv = getattr(model_cfg, "n_kv_heads", None) or heads
        if getattr(model_cfg, "attention", "gqa") == "gqa" and kv % self.tp and self.tp % kv:
            fits = [d for d in divisors(heads) if kv % d == 0 or d % kv == 0]
            raise PlanError(f"ParallelPlan tp={self.tp} with the model's n_kv_heads={kv}: tp must divide "
                            f"the KV heads (sharded) or be a multiple of them (replicated); choose tp "
                            f"among {fits}")
        if self.cp_kernel == "ulysses" and self.cp > 1:
            local_heads = heads // self.tp
            if local_heads % self.cp:
                raise PlanError(
                    f"ParallelPlan cp={self.cp} with cp_kernel='ulysses' must divide the heads per "
                    f"tensor-parallel rank ({local_heads}): use cp_kernel='allgather' or 'ring', "
                    f"or cp among {divisors(local_heads)}")
        if model_cfg.n_routed_experts and model_cfg.n_routed_experts % self.ep:
            raise PlanError(
                f"ParallelPlan ep={self.ep} does not divide the model's n_routed_experts="
                f"{model_cfg.n_routed_experts}: choose ep among {divisors(model_cfg.n_routed_experts)}")
        if not model_cfg.n_routed_experts and self.ep > 1:
            raise PlanError(f"ParallelPlan ep={self.ep} needs a mixture-of-experts model; this model "
                            "has no routed experts: set ep=1")
        if self.fp8_experts:
            self._check_fp8_experts(model_cfg)
        if self.pp > 1:
            from .pipeline_plan import check_pipeline_model

            check_pipeline_model(self, model_cfg)
        if seq_len is not None:
            self.check_sequence(seq_len, micro_batch_size)

    def _check_fp8_experts(self, model_cfg: Any) -> None:
        if not model_cfg.n_routed_experts:
            raise PlanError("ParallelPlan fp8_experts=True needs a mixture-of-experts model; this model "
                            "has no routed experts: set fp8_experts=False (fp8='tensorwise' converts "
                            "dense layers)")
        dims = {"d_model": model_cfg.d_model, "moe_ffn_dim": model_cfg.moe_ffn_dim}
        odd = {name: value for name, value in dims.items() if value % FP8_MULTIPLE}
        if odd:
            shown = ", ".join(f"{name}={value}" for name, value in odd.items())
            raise PlanError(f"ParallelPlan fp8_experts=True needs the experts' dimensions in multiples "
                            f"of {FP8_MULTIPLE} (fp8 GEMMs); the model has {shown}: set fp8_experts=False")

    def check_sequence(self, seq_len: int, micro_batch_size: Optional[int] = None) -> None:
        """A batch of `micro_batch_size` sequences of `seq_len` tokens splits evenly under the plan."""
        if self.cp > 1 and seq_len >= self.cp_min_seq_len:
            multiple = 2 * self.cp if self.cp_load_balance else self.cp
            if seq_len % multiple:
                how = f"2 x cp={self.cp} (cp_load_balance=true)" if self.cp_load_balance else f"cp={self.cp}"
                raise PlanError(f"data.seq_len={seq_len} is not a multiple of {how}: use a multiple of "
                                f"{multiple} (e.g. {seq_len - seq_len % multiple or multiple})")
        elif self.cp > 1 and micro_batch_size is not None and micro_batch_size % self.cp:
            raise PlanError(f"data.micro_batch_size={micro_batch_size} runs batch-parallel over cp={self.cp} "
                            f"(data.seq_len={seq_len} < cp_min_seq_len={self.cp_min_seq_len}): use a "
                            f"multiple of {self.cp}")
        if self.tp > 1 and self.sequence_parallel:
            local = seq_len // self.cp if self.cp > 1 and seq_len >= self.cp_min_seq_len else seq_len
            if local % self.tp:
                raise PlanError(f"sequence_parallel=true needs each rank's sequence length ({local}) to "
                                f"be a multiple of tp={self.tp}: change data.seq_len or set "
                                "sequence_parallel=false")

    def degrees(self) -> dict[str, int]:
        return {"pp": self.pp, "dp_replicate": self.dp_replicate, "dp_shard": self.dp_shard, "cp": self.cp,
                "tp": self.tp, "ep": self.ep}

    def describe(self) -> str:
        parts = [f"{k}={v}" for k, v in self.degrees().items() if v != 1]
        return "ParallelPlan(" + (", ".join(parts) or "single process") + ")"


def divisors(n: int) -> list[int]:
    """The divisors of n, ascending: the degrees that split n evenly (named in error messages)."""
    return [d for d in range(1, n + 1) if n % d == 0]


@functools.lru_cache(maxsize=None)
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(kind: Any) -> str:
    return getattr(kind, "__name__", str(kind))


def _check_field(name: str, value: Any, annotation: Any, limits: Any) -> None:
    """Check one plan field against its annotation (Optional allowed) and its `_limits`."""
    kinds = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) \
        else (annotation,)
    optional = type(None) in kinds
    if value is None and optional:
        return
    # bool is an int subclass, and a float field takes an int: spell the accepted types out.
    accepted = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}
    known = [k for k in kinds if k in accepted]
    if known and not any(isinstance(value, accepted[k]) and not (k is not bool and isinstance(value, bool))
                         for k in known):
        wanted = " or ".join(_type_name(k) for k in known) + (" or None" if optional else "")
        raise PlanError(f"ParallelPlan {name}={value!r} is invalid: it must be {wanted}, "
                        f"not {type(value).__name__}")
    if not limits:
        return
    if limits.get("choices") and value not in limits["choices"]:
        raise PlanError(f"ParallelPlan {name}={value!r} is unknown: choose one of "
                        f"{', '.join(limits['choices'])}")
    if value in limits.get("also", ()):
        return
    extra = f" (or {', '.join(map(str, limits['also']))})" if limits.get("also") else ""
    if limits.get("minimum") is not None and value < limits["minimum"]:
        raise PlanError(f"ParallelPlan {name}={value!r} is invalid: it must be >= "
                        f"{limits['minimum']}{extra}")
    if limits.get("above") is not None and value <= limits["above"]:
        raise PlanError(f"ParallelPlan {name}={value!r} is invalid: it must be > {limits['above']}{extra}")


def as_plan(value: Any) -> ParallelPlan:
    """Accept a ParallelPlan, "auto", a dict (from Hydra) or None (= auto)."""
    if value is None or value == "auto":
        return ParallelPlan("auto")
    if isinstance(value, ParallelPlan):
        return value
    if isinstance(value, dict):
        return ParallelPlan(**value)
    raise PlanError(f"plan={value!r} is not a ParallelPlan: pass ParallelPlan(...), a dict of its "
                    "fields, or 'auto'")


__all__ = ["ParallelPlan", "PlanError", "as_plan", "CP_KERNELS", "CHECKPOINT_POLICIES",
           "ACCUMULATION_POLICIES", "MIXED_PRECISION_MODES", "COMPILE_MODES", "FP8_MIN_FEATURES", "FP8_MODES", "FP8_MULTIPLE", "PP_SCHEDULES"]
