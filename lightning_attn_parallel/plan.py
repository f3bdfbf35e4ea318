"""ParallelPlan: the parallel degrees of a run and the options of each parallelism.

Validation happens here, before any process group exists, so a plan that cannot work fails
with one message naming the value and the fix.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Optional

from .errors import UserError

CP_KERNELS = ("allgather", "ring", "ulysses")
HIERARCHICAL_MODES = ("auto", "always", "never")
CHECKPOINT_POLICIES = ("none", "attention", "block", "selective")
# Gradient accumulation under FSDP2/HSDP (parallel/fully_sharded.py says what each sends and keeps)
ACCUMULATION_POLICIES = ("auto", "defer_all", "reduce_scatter_each", "defer_all_reduce")


class PlanError(UserError):
    """A plan that cannot run on this world size or this model."""


@dataclass
class ParallelPlan:
    """Degrees and options. `dp_replicate=-1` fills the world with replicated data parallelism.

    Dense layers run on the mesh (dp_replicate, dp_shard, cp, tp); experts on (edp, ep), a second
    view of the same ranks, so `ep` is chosen independently of the attention layout.
    `ParallelPlan("auto")` defers the choice to the planner (see planning/).
    """

    mode: str = "manual"  # "manual" or "auto"
    dp_replicate: int = -1
    dp_shard: int = 1
    cp: int = 1
    tp: int = 1
    ep: int = 1
    # data parallel (replicated parameters)
    bucket_mb: float = 25.0
    hierarchical: str = "auto"
    ranks_per_node: Optional[int] = None  # None: the launcher's devices per node
    intra_node_gbps: float = 450.0  # NVLink 4 per-direction bandwidth, GB/s
    inter_node_gbps: float = 50.0  # 400 Gb/s InfiniBand, GB/s
    # tensor parallel
    sequence_parallel: bool = False
    # context parallel
    cp_kernel: str = "allgather"
    cp_min_seq_len: int = 0  # sequences shorter than this run batch-parallel on the CP ranks
    cp_load_balance: bool = True
    # expert parallel
    grouped_gemm: bool = True
    # sharded data parallel: what micro-batches that only accumulate send ("auto": the planner)
    accumulation: str = "auto"
    # memory levers
    activation_checkpointing: str = "none"
    ac_every_n: int = 1
    offload_activations: bool = False
    compile: bool = False

    def __post_init__(self) -> None:
        if self.mode not in ("manual", "auto"):
            raise PlanError(f"ParallelPlan mode={self.mode!r} is unknown: use ParallelPlan('auto') "
                            "or give degrees, e.g. ParallelPlan(tp=2, dp_shard=2)")
        for key in ("dp_shard", "cp", "tp", "ep", "ac_every_n"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise PlanError(f"ParallelPlan {key}={value!r} is invalid: it must be an integer >= 1")
        if not isinstance(self.dp_replicate, int) or (self.dp_replicate < 1 and self.dp_replicate != -1):
            raise PlanError(f"ParallelPlan dp_replicate={self.dp_replicate!r} is invalid: use an "
                            "integer >= 1, or -1 to fill the world")
        self._check_choice("cp_kernel", CP_KERNELS)
        self._check_choice("hierarchical", HIERARCHICAL_MODES)
        self._check_choice("activation_checkpointing", CHECKPOINT_POLICIES)
        self._check_choice("accumulation", ACCUMULATION_POLICIES)
        if self.bucket_mb <= 0:
            raise PlanError(f"ParallelPlan bucket_mb={self.bucket_mb!r} is invalid: it must be > 0")
        if self.ranks_per_node is not None and self.ranks_per_node < 1:
            raise PlanError(f"ParallelPlan ranks_per_node={self.ranks_per_node!r} is invalid: "
                            "it must be >= 1 or None")

    def _check_choice(self, key: str, choices: tuple[str, ...]) -> None:
        if getattr(self, key) not in choices:
            raise PlanError(f"ParallelPlan {key}={getattr(self, key)!r} is unknown: choose one of "
                            f"{', '.join(choices)}")

    # ------------------------------------------------------------------ degrees
    @property
    def is_auto(self) -> bool:
        return self.mode == "auto"

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.cp * self.tp

    @property
    def edp(self) -> int:
        """Data-parallel degree of the experts: the ranks left over once ep is taken."""
        return self.world_size // self.ep

    @property
    def sharded(self) -> bool:
        return self.dp_shard > 1

    def resolve(self, world_size: int) -> "ParallelPlan":
        """Fill dp_replicate=-1 and check that the degrees multiply to the world size."""
        if self.is_auto:
            raise PlanError("ParallelPlan('auto') must be resolved by the planner first "
                            "(lightning_attn_parallel.planning.select_plan)")
        fixed = self.dp_shard * self.cp * self.tp
        plan = self
        if self.dp_replicate == -1:
            if world_size % fixed:
                raise PlanError(
                    f"ParallelPlan dp_shard={self.dp_shard} x cp={self.cp} x tp={self.tp} = {fixed} "
                    f"does not divide the world size {world_size}: choose degrees whose product "
                    f"divides {world_size}")
            plan = replace(self, dp_replicate=world_size // fixed)
        if plan.world_size != world_size:
            raise PlanError(
                f"ParallelPlan dp_replicate={plan.dp_replicate} x dp_shard={plan.dp_shard} x "
                f"cp={plan.cp} x tp={plan.tp} = {plan.world_size} does not equal the world size "
                f"{world_size}: set dp_replicate=-1 to fill it, or change the degrees")
        if world_size % plan.ep:
            raise PlanError(f"ParallelPlan ep={plan.ep} does not divide the world size {world_size}: "
                            f"choose ep among the divisors of {world_size}")
        return plan

    def check_model(self, model_cfg: Any) -> None:
        """Check the degrees against a ModelConfig (heads, KV heads, experts, sequence length)."""
        heads = model_cfg.n_heads
        if heads % self.tp:
            raise PlanError(f"ParallelPlan tp={self.tp} does not divide the model's n_heads={heads}: "
                            f"choose tp among {_divisors(heads)}")
        if self.cp_kernel == "ulysses" and self.cp > 1:
            local_heads = heads // self.tp
            if local_heads % self.cp:
                raise PlanError(
                    f"ParallelPlan cp={self.cp} with cp_kernel='ulysses' must divide the heads per "
                    f"tensor-parallel rank ({local_heads}): use cp_kernel='allgather' or 'ring', "
                    f"or cp among {_divisors(local_heads)}")
        if model_cfg.n_routed_experts and model_cfg.n_routed_experts % self.ep:
            raise PlanError(
                f"ParallelPlan ep={self.ep} does not divide the model's n_routed_experts="
                f"{model_cfg.n_routed_experts}: choose ep among {_divisors(model_cfg.n_routed_experts)}")
        if not model_cfg.n_routed_experts and self.ep > 1:
            raise PlanError(f"ParallelPlan ep={self.ep} needs a mixture-of-experts model; this model "
                            "has no routed experts: set ep=1")

    def degrees(self) -> dict[str, int]:
        return {"dp_replicate": self.dp_replicate, "dp_shard": self.dp_shard, "cp": self.cp,
                "tp": self.tp, "ep": self.ep}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        parts = [f"{k}={v}" for k, v in self.degrees().items() if v != 1]
        return "ParallelPlan(" + (", ".join(parts) or "single process") + ")"


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


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
           "ACCUMULATION_POLICIES"]
