"""Memory per GPU of one plan, as parameters, gradients, optimizer state, activations,
communication buffers and a fixed CUDA overhead.

Precision accounting (bytes per parameter held by one rank, before sharding):

- "bf16-mixed" / "16-mixed" (Lightning autocast): fp32 parameters (4), fp32 gradients (4), AdamW
  exp_avg and exp_avg_sq in fp32 (8): 16 in all. With replicated parameters, autocast's bf16
  copy of a weight lives from its forward use until its backward unless its block is
  checkpointed (2 more, counted with the activations). Under FSDP2 the MixedPrecisionPolicy
  all-gathers bf16 units instead: they are counted as communication buffers.
- "bf16-mixed" with master weights (the default under attn_hybrid, replicated parameters): fp32
  masters (4) and their bf16 compute copies (2), fp32 gradients (4), AdamW states (8): 18; the
  activations are bf16, as under "bf16-true", and there are no autocast weight copies. Where the
  optimizer step is fused (one process of plain tensors: `fused_master_step`), the gradients
  stay bf16 on the copies (2) and are dropped with the step: they grow while the backward frees
  the activations, so they count at the peak only beyond the activations; the fp32 sum of
  earlier micro-batches (4), when they accumulate in the masters, counts in full.
- "bf16-true" / "16-true": bf16 parameters (2), gradients (2) and AdamW states (2 x 2): there
  is no fp32 master copy. 8 in all.
- "32-true": 4 + 4 + 8 = 16.

Gradients are counted once: the replicated reducer's flat buckets are the gradients. FSDP keeps
sharded gradients; what it adds while accumulating depends on the plan's `accumulation`:
"defer_all" keeps the unsharded gradients too, "defer_all_reduce" (HSDP) the reduce-scattered
partial sums (a sharded size), "reduce_scatter_each" nothing.

Activations follow what autograd saves in this package's modules (not a generic formula): eager
autocast saves one bf16 cast of a norm output per consuming matmul, GQA keys and values are saved
after expansion to all query heads, SDPA saves q, k, v, out and the fp32 log-sum-exp (flash
kernels: no sequence-squared term), SwiGLU saves both projections, the SiLU output and the
product. torch.compile fuses casts and pointwise ops, so it saves fewer tensors.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from math import ceil
from typing import NamedTuple, Optional

from ..models.config import ModelConfig
from ..models.flops import attention_dims
from ..plan import FP8_MIN_FEATURES, ParallelPlan, PlanError
from .calibration import DEFAULT_CALIBRATION, Calibration
from .counts import ParamCounts, parameter_counts
from ..hardware import GIB, GpuSpec

MIB = 1024 ** 2


# ------------------------------------------------------------------------- precision
@dataclass(frozen=True)
class PrecisionSpec:
    """Byte widths of everything a precision setting decides."""

    name: str
    param_bytes: int  # stored (master) parameters
    grad_bytes: int
    state_bytes: int  # each AdamW state
    compute_bytes: int  # matmul inputs/outputs
    residual_bytes: int  # residual stream and norm outputs
    autocast: bool  # casts on the fly: weight copies and per-consumer input casts


PRECISIONS = {
    "bf16-mixed": PrecisionSpec("bf16-mixed", 4, 4, 4, 2, 4, True),
    "16-mixed": PrecisionSpec("16-mixed", 4, 4, 4, 2, 4, True),
    "bf16-true": PrecisionSpec("bf16-true", 2, 2, 2, 2, 2, False),
    "16-true": PrecisionSpec("16-true", 2, 2, 2, 2, 2, False),
    "32-true": PrecisionSpec("32-true", 4, 4, 4, 4, 4, False),
}
_ALIASES = {"bf16": "bf16-mixed", "16": "16-mixed", "32": "32-true", "32-true": "32-true"}


def precision_spec(precision: object) -> PrecisionSpec:
    """Accept Lightning's precision spellings ("bf16-mixed", "bf16", 16, "32", ...)."""
    key = _ALIASES.get(str(precision), str(precision))
    if key not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not supported by the planner: use one of "
                         f"{', '.join(PRECISIONS)}")
    return PRECISIONS[key]


def compute_precision(p: PrecisionSpec, plan: ParallelPlan) -> PrecisionSpec:
    """The precision the forward and backward actually run in.

    Under FSDP2 (sharded, or replicated with mixed_precision="cast_params") a "-mixed" precision
    computes like "-true": the MixedPrecisionPolicy hands every
    unit low-precision parameters and casts its inputs, so the residual stream and the
    activations are in the compute dtype and autocast has almost nothing left to cast. Master
    weights (bf16-mixed's default) compute on bf16 copies the same way.
    """
    if p.autocast and (casts_parameters(plan) or master_copies(plan, p)):
        return PRECISIONS["bf16-true" if p.name.startswith("bf16") else "16-true"]
    return p


def fused_master_step(plan: ParallelPlan, p: PrecisionSpec) -> bool:
    """Whether master weights take the fused AdamW step (parallel/master_adamw.py `fuses`, for
    the AdamW the planner assumes): the masters are plain tensors (no tensor or expert
    parallelism) and no gradient reducer holds them (no data- or context-parallel replicas)."""
    return (master_copies(plan, p) and plan.fused_master_step and plan.tp == 1 and plan.ep == 1
            and plan.dp_replicate * plan.cp == 1)


def master_copies(plan: ParallelPlan, p: PrecisionSpec) -> bool:
    """Replicated master weights: a bf16 compute copy beside each fp32 parameter
    (parallel/master_weights.py); under FSDP2 the policy's all-gathered units play that part."""
    return (p.autocast and p.name.startswith("bf16") and plan.mixed_precision == "master_weights"
            and not casts_parameters(plan))


def casts_parameters(plan: ParallelPlan) -> bool:
    """FSDP2 manages the parameters ("-mixed" computes on cast copies): sharded, or replicated
    with mixed_precision="cast_params" (parallel.fully_sharded.casts_parameters)."""
    return plan.sharded or plan.mixed_precision == "cast_params"


# ------------------------------------------------------------------------- result
@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU at the peak (the start of the backward pass) of one plan."""

    params: float
    grads: float
    optimizer: float
    activations: float  # autocast's low-precision weight copies included while they are alive
    comm: float
    overhead: float  # CUDA context and the caching allocator's slack: not in allocated
    capacity: float  # what a plan may use: the card's memory less the calibrated headroom
    host_activations: float = 0.0  # saved tensors in pinned host memory (offload_activations)

    @property
    def static(self) -> float:
        """Parameters, gradients and optimizer state: what stays allocated between steps."""
        return self.params + self.grads + self.optimizer

    @property
    def allocated(self) -> float:
        """Peak bytes handed out by the allocator (torch.cuda.max_memory_allocated)."""
        return self.static + self.activations + self.comm

    @property
    def total(self) -> float:
        """What the card must hold: allocated peak plus context and allocator slack."""
        return self.allocated + self.overhead

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity

    @property
    def headroom(self) -> float:
        return self.capacity - self.total

    def gib(self) -> dict[str, float]:
        keys = ("params", "grads", "optimizer", "activations", "comm", "overhead", "allocated", "total",
                "capacity")
        return {k: getattr(self, k) / GIB for k in keys}

    def describe(self) -> str:
        g = self.gib()
        host = (f"; {self.host_activations / GIB:.1f} GiB of saved activations in pinned host memory"
                if self.host_activations else "")
        return (f"{g['total']:.1f} GiB (params {g['params']:.1f}, grads {g['grads']:.1f}, optimizer "
                f"{g['optimizer']:.1f}, activations {g['activations']:.1f}, comm {g['comm']:.1f}, "
                f"CUDA overhead {g['overhead']:.1f}) of {g['capacity']:.1f} GiB usable{host}")


# ------------------------------------------------------------------------- sharding
@dataclass(frozen=True)
class LocalParams:
    """Parameters on one rank: after tp/ep splits (`dense`, `experts`) and the data-parallel
    shard degrees that divide them further under FSDP."""

    dense: float
    experts: float
    dense_shard: int
    expert_shard: int

    @property
    def unsharded(self) -> float:
        return self.dense + self.experts

    @property
    def sharded(self) -> float:
        return self.dense / self.dense_shard + self.experts / self.expert_shard


def expert_shard_degree(plan: ParallelPlan) -> int:
    """FSDP degree of the routed experts: every expert-data-parallel rank (world / ep).

    Experts live on a second view of the ranks, (edp, ep); when the dense parameters are sharded,
    each EP rank's block of experts is sharded by FSDP2 over the whole edp dimension.
    """
    return plan.world_size // plan.ep if plan.sharded else 1


def local_params(counts: ParamCounts, plan: ParallelPlan) -> LocalParams:
    vocab = counts.vocab_parallel
    dense = (counts.tp_sharded + vocab) / plan.tp + counts.replicated - vocab
    experts = counts.experts / plan.ep
    return LocalParams(dense, experts, plan.dp_shard, expert_shard_degree(plan))


def largest_unit(counts: ParamCounts, plan: ParallelPlan) -> float:
    """Parameters of the largest FSDP unit on one rank (a block, the embedding or the head)."""
    block = max((b.local(plan.tp, plan.ep) for b in counts.block_kinds), default=0.0)
    vocab_split = plan.tp if counts.vocab_parallel else 1
    return max(block, counts.embedding / vocab_split, counts.head / vocab_split)


def accumulation_policy(plan: ParallelPlan, grad_accum: int) -> str:
    """The accumulation policy a plan runs with, as the cost model sees it: "defer_all" when it
    makes no difference (no accumulation, no sharding) or is unresolved ("auto": today's default
    until the planner picks), and "reduce_scatter_each" for "defer_all_reduce" without replicas."""
    if grad_accum == 1 or not plan.sharded or plan.accumulation == "auto":
        return "defer_all"
    if plan.accumulation == "defer_all_reduce" and plan.dp_replicate == 1:
        return "reduce_scatter_each"
    return plan.accumulation


def _state_bytes(local: LocalParams, plan: ParallelPlan, p: PrecisionSpec,
                 grad_accum: int, buffers: int) -> tuple[float, float, float]:
    """(parameters, gradients, optimizer) bytes."""
    if plan.sharded:
        params = local.sharded * p.param_bytes
        grads = local.sharded * p.grad_bytes
        policy = accumulation_policy(plan, grad_accum) if grad_accum > 1 else "no accumulation"
        if policy == "defer_all":  # no reduce-scatter while accumulating: unsharded grads persist
            grads += local.unsharded * p.grad_bytes
        elif policy == "defer_all_reduce":  # FSDP2's partial sums, added to the last reduction
            grads += local.sharded * p.grad_bytes
    else:
        params = local.unsharded * p.param_bytes
        grads = local.unsharded * p.grad_bytes
        if master_copies(plan, p):  # the compute copies beside the fp32 masters
            params += local.unsharded * p.compute_bytes
    optimizer = 2 * p.state_bytes * (local.sharded if plan.sharded else local.unsharded)
    return params + buffers * p.param_bytes, grads, optimizer


# ------------------------------------------------------------------------- activations
@dataclass(frozen=True)
class _Sublayer:
    """Bytes per token saved by one pre-norm sublayer (attention or FFN) on one rank."""

    norm_input: float  # the residual stream saved by the pre-norm
    body: float  # everything saved inside the sublayer, matmul-input casts included
    selective: float  # what selective checkpointing keeps: matmul and attention outputs

    @property
    def full(self) -> float:
        return self.norm_input + self.body


@dataclass(frozen=True)
class _Shape:
    """The widths the activation formulas need, already divided by tensor parallelism."""

    cfg: ModelConfig
    p: PrecisionSpec
    tp: int
    cp: int
    sequence_parallel: bool
    compiled: bool
    cp_allgather: bool

    @property
    def a(self) -> int:
        return self.p.compute_bytes

    @property
    def r(self) -> int:
        return self.p.residual_bytes

    @property
    def d_norm(self) -> float:
        """Residual-stream width per rank: sequence parallelism splits it over tp."""
        return self.cfg.d_model / (self.tp if self.sequence_parallel else 1)

    def matmul_inputs(self, consumers: int) -> float:
        """Saved copies of a norm output feeding `consumers` matmuls (eager autocast casts once
        per matmul; gathered to full width under sequence parallelism)."""
        copies = consumers if (self.p.autocast and not self.compiled) else 1
        return copies * self.a * self.cfg.d_model

    def swiglu_inner(self, hidden: float) -> float:
        """w1 and w3 outputs, SiLU output and the product (compiled: only the projections)."""
        return (2 if self.compiled else 4) * self.a * hidden


def _gqa(s: _Shape) -> _Sublayer:
    cfg, a = s.cfg, s.a
    heads = cfg.n_heads / s.tp
    q = heads * cfg.head_dim
    kv = cfg.n_kv_heads / s.tp * cfg.head_dim
    # q after RoPE, k and v expanded to all query heads, SDPA output, the reshaped copy for wo
    head_tensors = (4 if s.compiled else 5) * a * q + 4 * heads
    if s.cp_allgather:  # the gathered keys and values of the whole sequence are saved
        head_tensors += (s.cp - 1) * 2 * a * q
    body = s.matmul_inputs(3) + head_tensors
    selective = a * (q + 2 * kv) + a * q + 4 * heads + a * s.d_norm
    return _Sublayer(s.r * s.d_norm, body, selective)


def _mla(s: _Shape) -> _Sublayer:
    cfg, a = s.cfg, s.a
    heads = cfg.n_heads / s.tp
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    v = cfg.v_head_dim
    c = 2 if s.p.autocast else a
    q_latent = (a + c) * cfg.q_lora_rank if cfg.q_lora_rank else 0.0
    kv_latent = a * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + c * cfg.kv_lora_rank
    kv_up = a * heads * (cfg.qk_nope_head_dim + v)
    # q and k after concatenating the RoPE part, SDPA output, the reshaped copy for wo (eager);
    # v is a view into kv_up's output
    head_tensors = a * heads * (2 * qk + (1 if s.compiled else 2) * v) + 4 * heads
    if s.cp_allgather:
        head_tensors += (s.cp - 1) * a * heads * (qk + v)
    body = s.matmul_inputs(2) + q_latent + kv_latent + kv_up + head_tensors
    q_out = a * heads * qk + (a * cfg.q_lora_rank if cfg.q_lora_rank else 0.0)
    selective = (q_out + a * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + kv_up + a * heads * v
                 + 4 * heads + a * s.d_norm)
    return _Sublayer(s.r * s.d_norm, body, selective)


def _dense_ffn(s: _Shape) -> _Sublayer:
    hidden = s.cfg.ffn_dim / s.tp
    body = s.matmul_inputs(2) + s.swiglu_inner(hidden)
    selective = 2 * s.a * hidden + s.a * s.d_norm
    return _Sublayer(s.r * s.d_norm, body, selective)


def _moe_ffn(s: _Shape, imbalance: float) -> _Sublayer:
    """Tokens are split over tp before the MoE, so every term inside is divided by tp."""
    cfg, a, d = s.cfg, s.a, s.cfg.d_model
    router = s.matmul_inputs(1) + 8 * cfg.n_routed_experts  # fp32 logits and scores
    routed = cfg.moe_top_k * imbalance * (s.matmul_inputs(2) + s.swiglu_inner(cfg.moe_ffn_dim) + a * d)
    shared_width = cfg.n_shared_experts * cfg.moe_ffn_dim
    shared = (s.matmul_inputs(2) + s.swiglu_inner(shared_width)) if shared_width else 0.0
    selective = (4 * cfg.n_routed_experts
                 + cfg.moe_top_k * imbalance * (2 * a * cfg.moe_ffn_dim + a * d)
                 + (2 * a * shared_width + a * d if shared_width else 0.0))
    return _Sublayer(s.r * s.d_norm, (router + routed + shared) / s.tp, selective / s.tp)


def _layer_bytes(attn: _Sublayer, ffn: _Sublayer, policy: str) -> float:
    """Bytes per token a layer keeps until its backward under a checkpointing policy."""
    if policy == "none":
        return attn.full + ffn.full
    if policy == "attention":  # the norm keeps its input, the checkpoint keeps the norm output
        return 2 * attn.norm_input + ffn.full
    if policy == "block":
        return attn.norm_input
    if policy == "selective":
        return attn.norm_input + attn.selective + ffn.selective
    raise PlanError(f"activation_checkpointing={policy!r} is unknown to the planner")


def _layer_kinds(cfg: ModelConfig, plan: ParallelPlan) -> list[tuple[bool, bool, int]]:
    """(is MoE, is checkpointed, how many) over the blocks; every ac_every_n-th block, starting
    with the first, is checkpointed."""
    every_n = plan.ac_every_n if plan.activation_checkpointing != "none" else 0
    return _count_kinds(moe_layer_flags(cfg), every_n)


def moe_layer_flags(cfg: ModelConfig) -> tuple[bool, ...]:
    """Which blocks are MoE, by the config's own rule (cached: the planner asks thousands of times)."""
    key = (cfg.n_layers, cfg.n_routed_experts, cfg.first_k_dense_replace, cfg.moe_layer_freq)
    if key not in _MOE_FLAGS:
        _MOE_FLAGS[key] = tuple(cfg.is_moe_layer(i) for i in range(cfg.n_layers))
    return _MOE_FLAGS[key]


_MOE_FLAGS: dict[tuple, tuple[bool, ...]] = {}


@lru_cache(maxsize=256)
def _count_kinds(flags: tuple[bool, ...], every_n: int) -> list[tuple[bool, bool, int]]:
    kinds: Counter = Counter((moe, bool(every_n) and i % every_n == 0) for i, moe in enumerate(flags))
    return [(moe, ckpt, n) for (moe, ckpt), n in sorted(kinds.items())]


def checkpointed_layers(cfg: ModelConfig, plan: ParallelPlan) -> int:
    """How many blocks the policy wraps (every ac_every_n-th block, starting with the first)."""
    if plan.activation_checkpointing == "none":
        return 0
    return ceil(cfg.n_layers / plan.ac_every_n)


def vocab_parallel_head(cfg: ModelConfig, plan: ParallelPlan) -> bool:
    """Whether the LM head is split over the vocabulary (parallel.tensor_parallel): an untied head
    under tp; a tied one stays whole, one tensor with the embedding."""
    return plan.tp > 1 and not cfg.tie_embeddings


def logits_per_token(cfg: ModelConfig, plan: ParallelPlan) -> float:
    """Logit elements per token on one rank: the vocabulary, split over tp by a vocabulary-parallel
    head."""
    return cfg.vocab_size / (plan.tp if vocab_parallel_head(cfg, plan) else 1)


def compiled_loss_kernel(cfg: ModelConfig, plan: ParallelPlan,
                         compiled_loss: Optional[bool] = None) -> bool:
    """A compiled plan compiles the local loss kernel too (parallel.apply.apply_compile); the
    vocabulary-parallel kernel stays eager (it calls collectives). `compiled_loss` overrides that
    (False: a run made before compiled plans compiled the loss)."""
    if compiled_loss is not None:
        return compiled_loss
    return plan.compiled and not vocab_parallel_head(cfg, plan)


def logits_bytes_per_element(cfg: ModelConfig, plan: ParallelPlan, p: PrecisionSpec,
                             cal: Calibration, compiled_loss: Optional[bool] = None) -> float:
    """Bytes per logit element alive while the loss runs. Eager: the fp32 log-softmax output, its
    gradient and the fp32 input's gradient (`cal.logits_bytes_per_element`). Compiled: the fused
    kernel keeps the logits in the compute dtype (plus a per-row log-sum-exp) and writes their
    gradient in that dtype: two compute-dtype tensors."""
    if compiled_loss_kernel(cfg, plan, compiled_loss):
        return 2.0 * p.compute_bytes
    return cal.logits_bytes_per_element


def _head_bytes(s: _Shape, tokens: float, loss_chunk_tokens: Optional[int], logits: float,
                per_element: float) -> tuple[float, float]:
    """(final norm and LM-head input, kept through the backward; the logits chain of the loss,
    `logits` per token, alive only while the loss runs forward and backward)."""
    final = tokens * (s.r * s.d_norm + s.matmul_inputs(1))
    rows = tokens if not loss_chunk_tokens else min(tokens, loss_chunk_tokens)
    return final, rows * logits * per_element


def fused_group_weights(cfg: ModelConfig, is_moe: bool) -> tuple[int, int]:
    """(attention, MLP) weights of one block that `fuse_projections` concatenates: q|k|v (MLA: the
    queries' first projection with wkv_a), and the dense or shared experts' gate|up."""
    d = cfg.d_model
    if cfg.attention == "gqa":
        attention = d * (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
    else:
        q = cfg.q_lora_rank or cfg.n_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
        attention = d * (q + cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    hidden = cfg.n_shared_experts * cfg.moe_ffn_dim if is_moe else cfg.ffn_dim
    return attention, 2 * d * hidden


def _projections_fuse(plan: ParallelPlan) -> bool:
    """Whether `fuse_projections` fuses anything: not under tensor parallelism (DTensor layers), nor
    under fp8 with FSDP2's fp8 all-gather (tensorwise and sharded: the weights cannot be joined)."""
    return plan.fuse_projections and plan.tp == 1 and not (plan.fp8 == "tensorwise" and plan.sharded)


def _weights_kept(plan: ParallelPlan, checkpointed: bool, attention: float, ffn: float) -> float:
    """Of a layer's attention and MLP weights, those its matmuls keep for the backward: none where
    the block recomputes, the MLP's where only the attention does."""
    policy = plan.activation_checkpointing
    if not checkpointed or policy == "none":
        return attention + ffn
    return ffn if policy == "attention" else 0.0


def _fused_group_copies(cfg: ModelConfig, plan: ParallelPlan, p: PrecisionSpec) -> float:
    """The concatenated weights that fused projections keep for the backward (the fused GEMM saves
    its weight input; separate layers save the parameters themselves, which cost nothing extra).
    Under autocast that copy stands in for the layers' own casts, counted in `_weight_copies`;
    compiled bf16 groups recompute it. Compiled fp8 tensorwise keeps the fp8 cast (one byte an
    element), the rest the compute dtype (counted in the compiled graphs by
    benchmarks/fused_projection_graphs.py)."""
    if not _projections_fuse(plan) or p.autocast or (plan.compiled and plan.fp8 == "none"):
        return 0.0
    element = 1 if plan.fp8 == "tensorwise" and plan.compiled else p.compute_bytes
    return element * sum(n * _weights_kept(plan, checkpointed, *fused_group_weights(cfg, is_moe))
                         for is_moe, checkpointed, n in _layer_kinds(cfg, plan))


def _weight_copies(counts: Optional[ParamCounts], plan: ParallelPlan, p: PrecisionSpec,
                   cfg: ModelConfig) -> float:
    """Low-precision copies of replicated weights that autograd keeps for the backward: autocast's
    casts, or fused projections' concatenations (`_fused_group_copies`).

    A matmul saves the cast weight it used; a checkpointed block (or sublayer) keeps nothing and
    re-casts during its recompute. Under FSDP2 the all-gathered low-precision units replace
    autocast's copies (counted as communication buffers) and under "-true" precisions there are none.
    """
    if not p.autocast or plan.sharded or counts is None:
        return _fused_group_copies(cfg, plan, p)
    # the LM head (vocabulary-parallel under tp; a chunked loss recomputes it, a small saving ignored)
    copies = counts.head / plan.tp
    for is_moe, checkpointed, n in _layer_kinds(cfg, plan):
        block = next(b for b in counts.blocks if (b.experts > 0) == is_moe)
        attention = block.attention / plan.tp + block.attention_small
        ffn = block.ffn_dense / plan.tp + block.ffn_shared + block.experts / plan.ep
        copies += n * _weights_kept(plan, checkpointed, attention, ffn)
    return copies * p.compute_bytes


class _Activations(NamedTuple):
    """Activation bytes per rank, by what keeps them (see activation_bytes)."""

    layers: float  # what every layer keeps for its backward
    largest_layer: float  # the most one layer keeps
    final: float  # the final norm's and the LM head's inputs
    transient: float  # the loss's logits chain or one checkpointed layer's recomputation
    weight_copies: float  # autocast's low-precision weight copies, fused projections' concatenations

    def on_gpu(self, offload: bool) -> float:
        return (self.largest_layer if offload else self.layers) + self.final + self.transient + self.weight_copies

    def on_host(self, offload: bool) -> float:
        return self.layers + self.final + self.weight_copies if offload else 0.0


def _fused_fp8_saved_less(cfg: ModelConfig, plan: ParallelPlan, p: PrecisionSpec, s: _Shape) -> float:
    """Bytes per token per layer that compiled fp8 keeps less with fused projections: GQA's key and
    value projections, too narrow for fp8 alone, convert with their queries (parallel/float8.py),
    so the attention's input is no longer also kept in the compute dtype for them (counted in the
    compiled graphs by benchmarks/fused_projection_graphs.py: 4,096 bytes a token on the 1B Llama)."""
    if (not _projections_fuse(plan) or cfg.attention != "gqa"
            or cfg.n_kv_heads * cfg.head_dim >= FP8_MIN_FEATURES):
        return 0.0
    return p.compute_bytes * s.d_norm


def _activations(cfg: ModelConfig, plan: ParallelPlan, micro_batch: int, seq_len: int,
                 precision: object, loss_chunk_tokens: Optional[int], calibration: Calibration,
                 counts: Optional[ParamCounts], compiled_loss: Optional[bool]) -> _Activations:
    p = compute_precision(precision_spec(precision), plan)
    s = _Shape(cfg, p, plan.tp, plan.cp, plan.sequence_parallel and plan.tp > 1, plan.compiled,
               plan.cp_kernel == "allgather" and plan.cp > 1)
    tokens = micro_batch * seq_len / plan.cp
    attn = _mla(s) if cfg.attention == "mla" else _gqa(s)
    dense = _dense_ffn(s)
    moe = _moe_ffn(s, calibration.moe_imbalance) if cfg.is_moe else dense
    # torch.compile's partitioner keeps some fused intermediates the formulas do not name
    compiled_extra = calibration.compiled_saved_elements * s.a * s.d_norm if plan.compiled else 0.0
    fp8_less = (calibration.fp8_saved_bytes_less * s.d_norm
                if plan.compiled and plan.fp8 == "tensorwise" else 0.0)
    fused_fp8_less = _fused_fp8_saved_less(cfg, plan, p, s) if fp8_less else 0.0
    saved, recompute_peak, largest = 0.0, 0.0, 0.0
    for is_moe, checkpointed, n in _layer_kinds(cfg, plan):
        ffn = moe if is_moe else dense
        full = (_layer_bytes(attn, ffn, "none") + compiled_extra - (0.0 if is_moe else fp8_less)
                - fused_fp8_less)
        kept = _layer_bytes(attn, ffn, plan.activation_checkpointing) if checkpointed else full
        saved += n * kept
        largest = max(largest, kept)
        recompute_peak = max(recompute_peak, full - kept)
    final, logits = _head_bytes(s, tokens, loss_chunk_tokens, logits_per_token(cfg, plan),
                                logits_bytes_per_element(cfg, plan, p, calibration, compiled_loss))
    return _Activations(tokens * saved, tokens * largest, final, max(logits, tokens * recompute_peak),
                        _weight_copies(counts, plan, p, cfg))


def activation_bytes(cfg: ModelConfig, plan: ParallelPlan, micro_batch: int, seq_len: int,
                     precision: object, *, loss_chunk_tokens: Optional[int] = None,
                     calibration: Calibration = DEFAULT_CALIBRATION,
                     counts: Optional[ParamCounts] = None,
                     compiled_loss: Optional[bool] = None) -> float:
    """Activation bytes per rank at the peak of a step: what every layer keeps for the backward,
    plus the larger of the loss's logits chain and one checkpointed layer's recomputation (the
    two are never alive together: the loss's backward finishes before any layer recomputes),
    plus autocast's weight copies (given `counts`). With `offload_activations` the layers' saved
    tensors wait in host memory (host_activation_bytes) and one layer's come back for its
    backward, so the GPU holds the largest layer's instead of all of them (the head's inputs
    and the weight copies, offloaded too, are still counted here: a small over-count)."""
    return _activations(cfg, plan, micro_batch, seq_len, precision, loss_chunk_tokens, calibration,
                        counts, compiled_loss).on_gpu(plan.offload_activations)


def host_activation_bytes(cfg: ModelConfig, plan: ParallelPlan, micro_batch: int, seq_len: int,
                          precision: object, *, loss_chunk_tokens: Optional[int] = None,
                          calibration: Calibration = DEFAULT_CALIBRATION,
                          counts: Optional[ParamCounts] = None,
                          compiled_loss: Optional[bool] = None) -> float:
    """Pinned host memory per rank at the end of the forward under `offload_activations`
    (torch.autograd.graph.save_on_cpu holds everything saved for the backward: every layer's
    share, the head's inputs and any autocast weight copies); 0 without it."""
    if not plan.offload_activations:
        return 0.0
    return _activations(cfg, plan, micro_batch, seq_len, precision, loss_chunk_tokens, calibration,
                        counts, compiled_loss).on_host(True)


# ------------------------------------------------------------------------- communication
def comm_bytes(cfg: ModelConfig, counts: ParamCounts, plan: ParallelPlan, micro_batch: int,
               seq_len: int, p: PrecisionSpec, cal: Calibration) -> float:
    """Buffers the collectives need on top of the tensors they move."""
    tokens = micro_batch * seq_len / plan.cp
    total = 0.0
    if casts_parameters(plan):  # FSDP2 units in flight: gathered (cast) params, grads to reduce
        unit = largest_unit(counts, plan)
        total += unit * (cal.fsdp_prefetch_units * p.compute_bytes + p.grad_bytes)
        # Over a shard group of one rank each unit's cast copy is kept from the forward to the
        # backward (parallel.apply: no reshard where it would free nothing): the dense units' when
        # dp_shard x cp is 1, the expert-parallel experts' (sharded over edp) when edp is 1.
        dense_kept = plan.dp_shard * plan.cp == 1
        experts_kept = dense_kept if plan.ep == 1 else plan.edp == 1
        kept = sum((b.tp_sharded / plan.tp + b.replicated) * dense_kept + b.experts / plan.ep * experts_kept
                   for b in counts.blocks)
        total += max(0.0, kept - cal.fsdp_prefetch_units * unit) * p.compute_bytes
    elif plan.dp_replicate != 1 or plan.cp > 1:
        total += 2 * plan.bucket_mb * MIB  # in-flight bucket and hierarchical scratch
    if plan.tp > 1:
        total += 2 * tokens * cfg.d_model * p.compute_bytes
    if plan.ep > 1:
        total += 2 * tokens / plan.tp * cfg.moe_top_k * cfg.d_model * p.compute_bytes * cal.moe_imbalance
    if plan.cp > 1 and plan.cp_kernel == "ring":
        total += 2 * tokens * kv_width(cfg, plan.tp) * p.compute_bytes
    if plan.cp > 1 and plan.cp_kernel == "ulysses":  # q, k, v sent and received
        qk, v = attention_dims(cfg)
        kv_heads = cfg.n_kv_heads if cfg.attention == "gqa" else cfg.n_heads
        width = (cfg.n_heads * qk + kv_heads * (qk + v)) / plan.tp
        total += 2 * tokens * width * p.compute_bytes
    return total


def kv_width(cfg: ModelConfig, tp: int) -> float:
    """Key plus value width per token per rank, as exchanged by context parallelism."""
    if cfg.attention == "mla":
        qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        return cfg.n_heads / tp * (qk + cfg.v_head_dim)
    return 2 * cfg.n_kv_heads / tp * cfg.head_dim


# ------------------------------------------------------------------------- entry point
def estimate_memory(model_cfg: ModelConfig, plan: ParallelPlan, micro_batch: int, seq_len: int,
                    precision: object, gpu: GpuSpec, *, grad_accum: int = 1,
                    loss_chunk_tokens: Optional[int] = None,
                    calibration: Calibration = DEFAULT_CALIBRATION,
                    counts: Optional[ParamCounts] = None,
                    compiled_loss: Optional[bool] = None) -> MemoryEstimate:
    """Peak bytes per GPU for `plan` at `micro_batch` sequences of `seq_len` tokens per DP rank.

    `grad_accum` matters only under FSDP, with the plan's `accumulation` (see `_state_bytes`);
    `loss_chunk_tokens` is the chunked loss's chunk (None: full logits); `compiled_loss`
    overrides whether the loss kernel is compiled (compiled_loss_kernel).
    """
    if seq_len % plan.cp:
        raise PlanError(f"seq_len={seq_len} is not divisible by cp={plan.cp}")
    p = precision_spec(precision)
    counts = counts or parameter_counts(model_cfg)
    local = local_params(counts, plan)
    params, grads, optimizer = _state_bytes(local, plan, p, grad_accum, counts.buffers)
    saved = _activations(model_cfg, plan, micro_batch, seq_len, p.name, loss_chunk_tokens, calibration,
                         counts, compiled_loss)
    activations, host = saved.on_gpu(plan.offload_activations), saved.on_host(plan.offload_activations)
    if fused_master_step(plan, p):
        # the fused step drops its gradients with the step, so none lives through the forward
        # but an fp32 sum of earlier micro-batches (when they accumulate in the masters); the
        # last micro-batch's bf16 ones fill in as the backward frees the activations and add to
        # the peak only beyond them
        held = grads if grad_accum > 1 and plan.accumulate_grads_in == "master" else 0.0
        grads = held + max(0.0, local.unsharded * p.compute_bytes - activations)
    comm = comm_bytes(model_cfg, counts, plan, micro_batch, seq_len, p, calibration)
    slack = calibration.fragmentation * (activations + comm)
    return MemoryEstimate(params=params, grads=grads, optimizer=optimizer, activations=activations,
                          comm=comm, overhead=calibration.cuda_context_gib * GIB + slack,
                          capacity=gpu.memory_bytes * calibration.usable_memory_fraction,
                          host_activations=host)


__all__ = ["MemoryEstimate", "PrecisionSpec", "accumulation_policy", "casts_parameters", "compute_precision", "fused_group_weights", "fused_master_step", "master_copies", "LocalParams", "PRECISIONS", "precision_spec",
           "estimate_memory", "activation_bytes", "host_activation_bytes", "local_params", "largest_unit",
           "expert_shard_degree", "checkpointed_layers", "kv_width", "moe_layer_flags",
           "compiled_loss_kernel", "logits_bytes_per_element", "logits_per_token",
           "vocab_parallel_head"]
