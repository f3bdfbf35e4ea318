"""Step time of one plan from a roofline of compute plus an alpha-beta model of communication.

Rank layout (the mesh's): tp innermost, then cp, then dp_shard, then dp_replicate, ranks of a
node consecutive; the expert view puts ep innermost. A group of `size` ranks at `stride` apart
therefore has min(size, gpus_per_node / stride) members per node, and a group spanning nodes
uses the network link. Collectives that span nodes with several members per node are costed
as the hierarchical form (reduce-scatter in the node, the cross-node step on a 1/m shard, then
all-gather in the node) when that beats a flat ring, as the reducer's "auto" mode does.

Overlap: data-parallel gradient reduction hides behind the last micro-batch's backward, FSDP
all-gathers behind compute, ring context parallelism behind the attention it feeds; tensor
parallel collectives, all-gather context parallelism and expert all-to-alls are exposed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..models.config import ModelConfig
from ..models.flops import attention_dims, attention_flops_per_token
from ..models.loss import chunks_recomputed
from ..plan import ParallelPlan
from .calibration import DEFAULT_CALIBRATION, FP8_EXPERTS_SPEEDUP, FP8_MATMUL_SPEEDUP, Calibration
from .counts import ParamCounts, parameter_counts
from .. import collective_cost
from ..collective_cost import ALL_GATHER, ALL_REDUCE, REDUCE_SCATTER, collective_time
from ..hardware import ClusterSpec, GpuSpec
from .memory import (MIB, PrecisionSpec, accumulation_policy, checkpointed_layers,
                     compiled_loss_kernel, compute_precision, host_activation_bytes, logits_per_token,
                     expert_shard_degree, fused_master_step, kv_width, largest_unit,
                     local_params, master_copies, moe_layer_flags, precision_spec)

GB = collective_cost.GB


# ------------------------------------------------------------------------- collectives
@dataclass(frozen=True)
class Group:
    """`size` ranks spaced `stride` apart in the global rank order."""

    size: int
    stride: int = 1

    def layout(self, gpus_per_node: int) -> tuple[int, int]:
        """(members per node, nodes spanned)."""
        if self.size <= 1:
            return 1, 1
        per_node = 1 if self.stride >= gpus_per_node else min(self.size, gpus_per_node // self.stride)
        return per_node, -(-self.size // per_node)


def _ring(factor: float, nbytes: float, group: Group, cluster: ClusterSpec, cal: Calibration) -> float:
    per_node, nodes = group.layout(cluster.gpus_per_node)
    return collective_time(nbytes, group.size, per_node, nodes, cluster, factor, cal.collective_efficiency)


def all_reduce_time(nbytes: float, group: Group, cluster: ClusterSpec,
                    calibration: Calibration = DEFAULT_CALIBRATION) -> float:
    """Seconds to all-reduce `nbytes` over `group` (ring: 2(n-1)/n of the bytes per rank)."""
    return _ring(ALL_REDUCE, nbytes, group, cluster, calibration)


def reduce_scatter_time(nbytes: float, group: Group, cluster: ClusterSpec,
                        calibration: Calibration = DEFAULT_CALIBRATION) -> float:
    """Seconds to reduce-scatter an unsharded `nbytes` tensor ((n-1)/n of it per rank)."""
    return _ring(REDUCE_SCATTER, nbytes, group, cluster, calibration)


def all_gather_time(nbytes: float, group: Group, cluster: ClusterSpec,
                    calibration: Calibration = DEFAULT_CALIBRATION) -> float:
    """Seconds to all-gather into an `nbytes` tensor ((n-1)/n of it arrives per rank)."""
    return _ring(ALL_GATHER, nbytes, group, cluster, calibration)


def all_to_all_time(nbytes: float, group: Group, cluster: ClusterSpec,
                    calibration: Calibration = DEFAULT_CALIBRATION) -> float:
    """Seconds for an all-to-all where each rank holds `nbytes` spread evenly over the group."""
    per_node, nodes = group.layout(cluster.gpus_per_node)
    return collective_cost.all_to_all_time(nbytes, group.size, per_node, nodes, cluster,
                                           calibration.collective_efficiency)


# ------------------------------------------------------------------------- groups of a plan
def _groups(plan: ParallelPlan) -> dict[str, Group]:
    tp, cp, ds, dr, ep = plan.tp, plan.cp, plan.dp_shard, plan.dp_replicate, plan.ep
    es = expert_shard_degree(plan)
    return {
        "tp": Group(tp, 1),
        "cp": Group(cp, tp),
        "dp_cp": Group(dr * ds * cp, tp),  # replicated dense gradients: dp x cp
        "shard": Group(ds, tp * cp),
        # dp_replicate x cp ranks; with cp > 1 they are unevenly spaced, costed as if tp apart
        "replicate": Group(dr * cp, tp * cp * ds if cp == 1 else tp),
        "ep": Group(ep, 1),
        "edp": Group(plan.world_size // ep, ep),
        "expert_shard": Group(es, ep),
        "expert_replicate": Group(plan.world_size // (ep * es), ep * es),
    }


# ------------------------------------------------------------------------- result
@dataclass(frozen=True)
class TimingEstimate:
    """Seconds per optimizer step on one rank, by cause, and the throughput they imply."""

    compute_s: float  # model FLOPs, all micro-batches
    recompute_s: float  # activation checkpointing's extra forward work
    tp_s: float  # exposed
    cp_s: float  # exposed
    ep_s: float  # exposed
    fsdp_gather_s: float  # total all-gather time
    fsdp_exposed_s: float
    dp_reduce_s: float  # total gradient reduction time
    dp_exposed_s: float
    optimizer_s: float
    tokens_per_step: float  # global
    world_size: int
    flops_per_token: float
    peak_flops: float
    offload_s: float = 0.0  # activation offload's copies to host memory and back, not hidden

    @property
    def step_s(self) -> float:
        return (self.compute_s + self.recompute_s + self.tp_s + self.cp_s + self.ep_s
                + self.fsdp_exposed_s + self.dp_exposed_s + self.optimizer_s + self.offload_s)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_s

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return self.tokens_per_s / self.world_size

    @property
    def mfu(self) -> float:
        """Model FLOPs utilisation by the package's convention (recompute not counted)."""
        return self.flops_per_token * self.tokens_per_s_per_gpu / self.peak_flops

    def breakdown(self) -> dict[str, float]:
        keys = ("compute_s", "recompute_s", "tp_s", "cp_s", "ep_s", "fsdp_exposed_s",
                "dp_exposed_s", "optimizer_s", "offload_s")
        return {k: getattr(self, k) for k in keys}


# ------------------------------------------------------------------------- compute roofline
COMPUTE_TERMS = ("matmul", "attention", "elementwise", "selective", "experts")


def compute_terms(cfg: ModelConfig, counts: ParamCounts, plan: ParallelPlan, gpu: GpuSpec,
                  seq_len: int, precision: object) -> tuple[dict[str, float], dict[str, float]]:
    """Seconds per token on one rank, per unit of each calibrated constant, for one pass
    (forward + backward) and for what activation checkpointing recomputes.

    Multiply "matmul" by 1/matmul_efficiency, "attention" by 1/attention_efficiency,
    "elementwise" by the mode's element-wise bytes, "selective" by selective_recompute_bytes and
    "experts" (the routed experts' matmuls with the routing around them) by 1/expert efficiency
    of the plan's kernel, and add them up: that is `estimate_time`'s compute, and, being linear
    in those constants, it is also what `planning.fit` regresses measurements on.
    """
    p = precision_spec(precision)
    peak = gpu.peak_flops(p.compute_bytes)
    bandwidth = gpu.hbm_gbps * GB
    sdpa = attention_flops_per_token(cfg, seq_len)
    # routed experts a token passes through: tokens, not weights, are split over tp before them
    experts = 6.0 * counts.experts * (cfg.moe_top_k / cfg.n_routed_experts if cfg.is_moe else 0.0)
    matmul = 6.0 * counts.active_matmul - experts
    if plan.fp8_experts:  # measured slower than bf16 at the one shape it has run (calibration.py)
        experts /= FP8_EXPERTS_SPEEDUP
    blocks_matmul = matmul - 6.0 * counts.head_matmul
    if plan.fp8 != "none":  # the blocks' linears run in fp8 (the head stays in bf16)
        blocks_matmul /= FP8_MATMUL_SPEEDUP[plan.fp8]
        matmul = blocks_matmul + 6.0 * counts.head_matmul
    attention_matmul = 6.0 * counts.attention
    # element-wise work scales with the layer width a rank holds; tp splits most of it
    elementwise = cfg.n_layers * cfg.d_model / plan.tp / bandwidth
    base = {"matmul": matmul / plan.tp / peak, "attention": sdpa / plan.tp / peak,
            "elementwise": elementwise, "selective": 0.0, "experts": experts / plan.tp / peak}
    share = checkpointed_layers(cfg, plan) / cfg.n_layers
    policy = plan.activation_checkpointing
    redo = dict.fromkeys(COMPUTE_TERMS, 0.0)
    if policy == "block":  # one more forward of the checkpointed blocks: a third of their work
        redo.update(matmul=share * blocks_matmul / 3 / plan.tp / peak,
                    attention=share * sdpa / 3 / plan.tp / peak,
                    elementwise=share * elementwise / 3, experts=share * base["experts"] / 3)
    elif policy == "attention":
        attention_share = counts.attention / max(counts.active_matmul - counts.head_matmul, 1.0)
        redo.update(matmul=share * attention_matmul / 3 / plan.tp / peak,
                    attention=share * sdpa / 3 / plan.tp / peak,
                    elementwise=share * attention_share * elementwise / 3)
    elif policy == "selective":
        redo["selective"] = share * elementwise
    return base, redo


def combine_terms(terms: dict[str, float], cal: Calibration, compiled: bool, autocast: bool,
                  plan: Optional[ParallelPlan] = None) -> float:
    """Seconds from `compute_terms` coefficients and the calibrated constants (with `plan`, the
    measured slow-down of attention under context parallelism)."""
    attention = terms["attention"] / cal.attention_efficiency
    if plan is not None and plan.cp > 1:
        attention /= cal.context_parallel_attention
    grouped = plan is None or plan.grouped_gemm
    # Under expert parallelism the dispatcher reads the token counts back to the host to size its
    # all-to-all, so a compiled MoE block is several graphs again: its experts run at the eager rate.
    experts_compiled = compiled and (plan is None or plan.ep == 1)
    return (terms["matmul"] / cal.matmul_efficiency + attention
            + terms["elementwise"] * cal.elementwise_bytes(compiled, autocast)
            + terms["selective"] * cal.selective_recompute_bytes
            + terms["experts"] / cal.expert_efficiency(grouped, experts_compiled))


def loss_time(cfg: ModelConfig, counts: ParamCounts, plan: ParallelPlan, gpu: GpuSpec,
              rank_tokens: float, precision: object, loss_chunk_tokens: Optional[int],
              cal: Calibration, compiled_loss: Optional[bool] = None) -> tuple[float, float, float]:
    """Seconds per micro-batch on one rank of the loss: (the loss kernel's forward and backward
    over the logits, the kernel's forward again under a chunked loss, the LM head's forward
    matmul again under a chunked loss at the card's peak: divide it by matmul_efficiency). The
    kernel is bound by HBM bandwidth: the calibrated bytes per logit element of the eager or the
    compiled kernel (compiled_loss_kernel)."""
    elements = rank_tokens * logits_per_token(cfg, plan)
    per_byte = elements / (gpu.hbm_gbps * GB)
    forward, backward = cal.loss_bytes(compiled_loss_kernel(cfg, plan, compiled_loss))
    if not chunks_recomputed(rank_tokens, loss_chunk_tokens):
        return (forward + backward) * per_byte, 0.0, 0.0
    peak = gpu.peak_flops(precision_spec(precision).compute_bytes)
    head = rank_tokens * 2.0 * counts.head_matmul / plan.tp / peak
    return (forward + backward) * per_byte, forward * per_byte, head


def recompute_share(cfg: ModelConfig, counts: ParamCounts, plan: ParallelPlan, seq_len: int,
                    calibration: Calibration = DEFAULT_CALIBRATION, gpu: Optional[GpuSpec] = None,
                    precision: object = "bf16-mixed") -> float:
    """Recomputation time as a fraction of one pass's compute time."""
    from ..hardware import H100_SXM

    base, redo = compute_terms(cfg, counts, plan, gpu or H100_SXM, seq_len, precision)
    autocast = compute_precision(precision_spec(precision), plan).autocast
    return (combine_terms(redo, calibration, plan.compiled, autocast)
            / combine_terms(base, calibration, plan.compiled, autocast))


def _tp_time(cfg: ModelConfig, plan: ParallelPlan, tokens: float, p: PrecisionSpec,
             cluster: ClusterSpec, cal: Calibration) -> float:
    """Four all-reduce equivalents per layer (two forward, two backward; sequence parallelism
    swaps each for an all-gather plus a reduce-scatter of the same volume), plus the forward
    ones again for each recomputed block (one for an attention-only checkpoint)."""
    if plan.tp == 1:
        return 0.0
    redo = {"block": 2, "attention": 1}.get(plan.activation_checkpointing, 0)
    count = 4 * cfg.n_layers + redo * checkpointed_layers(cfg, plan)
    one = all_reduce_time(tokens * cfg.d_model * p.compute_bytes, Group(plan.tp), cluster, cal)
    return count * one


def _cp_time(cfg: ModelConfig, plan: ParallelPlan, micro_batch: int, seq_len: int,
             p: PrecisionSpec, attention_s: float, cluster: ClusterSpec, cal: Calibration) -> float:
    """Exposed context-parallel time per micro-batch.

    allgather: K/V all-gathered forward, their grads reduce-scattered backward, exposed;
    ring: the same volume forward, twice backward (K/V and their grads), hidden behind attention;
    ulysses: four all-to-alls forward and four backward, exposed.
    `attention_s` is the attention compute per micro-batch on this rank.
    """
    if plan.cp == 1:
        return 0.0
    group = Group(plan.cp, plan.tp)
    kv = micro_batch * seq_len * kv_width(cfg, plan.tp) * p.compute_bytes
    layers = cfg.n_layers
    if plan.cp_kernel == "ulysses":
        return 2 * layers * _ulysses_exchange(cfg, plan, micro_batch * seq_len / plan.cp, p,
                                              cluster, cal)
    gather = all_gather_time(kv, group, cluster, cal)
    if plan.cp_kernel == "ring":
        return max(0.0, 3 * layers * gather - attention_s)
    recomputes_attention = plan.activation_checkpointing in ("block", "attention")
    redo = checkpointed_layers(cfg, plan) if recomputes_attention else 0
    return (layers + redo) * gather + layers * reduce_scatter_time(kv, group, cluster, cal)


def _ulysses_exchange(cfg: ModelConfig, plan: ParallelPlan, tokens: float, p: PrecisionSpec,
                      cluster: ClusterSpec, cal: Calibration) -> float:
    """One direction's four all-to-alls: q, k, v to head-sharded layout and the output back."""
    qk, v = attention_dims(cfg)
    kv_heads = cfg.n_kv_heads if cfg.attention == "gqa" else cfg.n_heads
    widths = (cfg.n_heads * qk, kv_heads * qk, kv_heads * v, cfg.n_heads * v)
    group = Group(plan.cp, plan.tp)
    return sum(all_to_all_time(tokens * w / plan.tp * p.compute_bytes, group, cluster, cal)
               for w in widths)


def _ep_time(cfg: ModelConfig, plan: ParallelPlan, tokens: float, p: PrecisionSpec,
             cluster: ClusterSpec, cal: Calibration) -> float:
    """Dispatch and combine all-to-alls forward and backward per MoE layer (plus the forward
    pair again for recomputed blocks)."""
    if plan.ep == 1 or not cfg.is_moe:
        return 0.0
    moe_layers = sum(moe_layer_flags(cfg))
    redo = 2 * checkpointed_layers(cfg, plan) * moe_layers / cfg.n_layers \
        if plan.activation_checkpointing == "block" else 0
    nbytes = tokens / plan.tp * cfg.moe_top_k * cfg.d_model * p.compute_bytes * cal.moe_imbalance
    return (4 * moe_layers + redo) * all_to_all_time(nbytes, Group(plan.ep), cluster, cal)


def _fsdp_gather_time(counts: ParamCounts, plan: ParallelPlan, p: PrecisionSpec,
                      cluster: ClusterSpec, cal: Calibration) -> tuple[float, float]:
    """(all-gathers of one micro-batch: forward and backward re-gather, one unit's gather)."""
    if not plan.sharded:
        return 0.0, 0.0
    g = _groups(plan)
    local = local_params(counts, plan)
    dense = all_gather_time(local.dense * p.compute_bytes, g["shard"], cluster, cal)
    experts = all_gather_time(local.experts * p.compute_bytes, g["expert_shard"], cluster, cal)
    unit = all_gather_time(largest_unit(counts, plan) * p.compute_bytes, g["shard"], cluster, cal)
    return 2 * (dense + experts), unit


def _grad_reduce_time(counts: ParamCounts, plan: ParallelPlan, p: PrecisionSpec,
                      cluster: ClusterSpec, cal: Calibration) -> tuple[float, float, float]:
    """Gradient reduction of one micro-batch's gradients: (the reduce-scatters, or the replicated
    all-reduce; HSDP's all-reduce across replicas; the part that cannot overlap: the last
    bucket/unit)."""
    g = _groups(plan)
    local = local_params(counts, plan)
    dense, experts = local.dense * p.grad_bytes, local.experts * p.grad_bytes
    if not plan.sharded:
        total = (all_reduce_time(dense, g["dp_cp"], cluster, cal)
                 + all_reduce_time(experts, g["edp"], cluster, cal))
        tail = all_reduce_time(min(dense, plan.bucket_mb * MIB), g["dp_cp"], cluster, cal)
        return total, 0.0, tail
    scatter = (reduce_scatter_time(dense, g["shard"], cluster, cal)
               + reduce_scatter_time(experts, g["expert_shard"], cluster, cal))
    replicas = (all_reduce_time(dense / plan.dp_shard, g["replicate"], cluster, cal)
                + all_reduce_time(experts / local.expert_shard, g["expert_replicate"], cluster, cal))
    tail = reduce_scatter_time(largest_unit(counts, plan) * p.grad_bytes, g["shard"], cluster, cal)
    return scatter, replicas, tail


def _step_reduce_time(counts: ParamCounts, plan: ParallelPlan, p: PrecisionSpec, cluster: ClusterSpec,
                      cal: Calibration, grad_accum: int, backward: float) -> tuple[float, float]:
    """(gradient reduction of one optimizer step, the part of it left exposed), by accumulation
    policy: each reduction hides behind the backward of the micro-batch that sends it."""
    scatter, replicas, tail = _grad_reduce_time(counts, plan, p, cluster, cal)
    window = cal.dp_overlap * backward
    last = _exposed(scatter + replicas, window, tail)
    policy = accumulation_policy(plan, grad_accum)
    if policy == "reduce_scatter_each":
        return grad_accum * (scatter + replicas), grad_accum * last
    if policy == "defer_all_reduce":
        early = (grad_accum - 1) * scatter
        return early + scatter + replicas, (grad_accum - 1) * _exposed(scatter, window, tail) + last
    return scatter + replicas, last


def _optimizer_time(counts: ParamCounts, plan: ParallelPlan, p: PrecisionSpec, gpu: GpuSpec,
                    cal: Calibration) -> float:
    """AdamW is bandwidth bound: read param, grad and both states, write param and states.
    Replicated master weights add the compute copies: unfused, the gradient's cast into the fp32
    master gradient and the copies' refresh (12 bytes more); fused (parallel/master_adamw.py), one
    pass reads the bf16 gradient and writes the copy (28 bytes in all for fp32 masters)."""
    local = local_params(counts, plan)
    updated = local.sharded if plan.sharded else local.unsharded
    moved = 2 * p.param_bytes + p.grad_bytes + 4 * p.state_bytes
    if fused_master_step(plan, p):  # the bf16 gradient read instead of the fp32 one; the copy written
        moved += 2 * p.compute_bytes - p.grad_bytes
    elif master_copies(plan, p):  # the cast (bf16 read, fp32 write) and the refresh (fp32 read, bf16 write)
        moved += (p.compute_bytes + p.grad_bytes) + (p.param_bytes + p.compute_bytes)
    return updated * moved / (gpu.hbm_gbps * GB * cal.hbm_efficiency)


def _offload_time(host_bytes: float, gpu: GpuSpec, cal: Calibration) -> float:
    """Activation offload's copies, out in the forward and back in the backward. torch's
    save_on_cpu copies on the compute stream (the copy out blocks the host), so nothing hides
    them: each byte crosses the host link twice."""
    return 2 * host_bytes / (gpu.host_link_gbps * GB * cal.host_link_efficiency)


def _exposed(total: float, window: float, floor: float) -> float:
    """Communication left visible after hiding it behind `window`, never below `floor`."""
    return min(total, max(total - window, floor))


# ------------------------------------------------------------------------- entry point
def estimate_time(model_cfg: ModelConfig, plan: ParallelPlan, cluster: ClusterSpec, gpu: GpuSpec,
                  micro_batch: int, seq_len: int, precision: object, *, grad_accum: int = 1,
                  loss_chunk_tokens: Optional[int] = None,
                  calibration: Calibration = DEFAULT_CALIBRATION,
                  counts: Optional[ParamCounts] = None,
                  compiled_loss: Optional[bool] = None) -> TimingEstimate:
    """Predicted optimizer-step time of `plan` on `cluster` (the plan is resolved to its world).

    A step is `grad_accum` micro-batches of `micro_batch` sequences per data-parallel rank;
    `loss_chunk_tokens` (the chunked loss) adds the LM head's recomputation; `compiled_loss`
    overrides whether the loss kernel is compiled (memory.compiled_loss_kernel).
    """
    cal = calibration
    plan = plan.resolve(cluster.world_size)
    p = precision_spec(precision)
    counts = counts or parameter_counts(model_cfg)
    peak = gpu.peak_flops(p.compute_bytes)
    mb_tokens = micro_batch * seq_len
    rank_tokens = mb_tokens / plan.cp
    base, redo = compute_terms(model_cfg, counts, plan, gpu, seq_len, p.name)
    autocast = compute_precision(p, plan).autocast  # FSDP2 computes "-mixed" like "-true"
    loss, loss_redo, head_redo = loss_time(model_cfg, counts, plan, gpu, rank_tokens, p.name,
                                           loss_chunk_tokens, cal, compiled_loss)
    compute = rank_tokens * combine_terms(base, cal, plan.compiled, autocast, plan) + loss
    recompute = rank_tokens * combine_terms(redo, cal, plan.compiled, autocast, plan)
    # the chunked loss re-runs the head's matmul and the kernel's forward
    recompute += loss_redo + head_redo / cal.matmul_efficiency
    attention_only = {**dict.fromkeys(COMPUTE_TERMS, 0.0), "attention": base["attention"]}
    attention_s = rank_tokens * combine_terms(attention_only, cal, plan.compiled, autocast, plan)
    flops_per_token = counts.flops_per_token(model_cfg, seq_len)
    tp = _tp_time(model_cfg, plan, rank_tokens, p, cluster, cal)
    cp = _cp_time(model_cfg, plan, micro_batch, seq_len, p, attention_s, cluster, cal)
    ep = _ep_time(model_cfg, plan, rank_tokens, p, cluster, cal)
    gather, gather_unit = _fsdp_gather_time(counts, plan, p, cluster, cal)
    fsdp_exposed = _exposed(gather, cal.fsdp_overlap * (compute + recompute), gather_unit)
    backward = 2.0 / 3.0 * compute + recompute
    reduce, dp_exposed = _step_reduce_time(counts, plan, p, cluster, cal, grad_accum, backward)
    return TimingEstimate(
        compute_s=grad_accum * compute, recompute_s=grad_accum * recompute, tp_s=grad_accum * tp,
        cp_s=grad_accum * cp, ep_s=grad_accum * ep, fsdp_gather_s=grad_accum * gather,
        fsdp_exposed_s=grad_accum * fsdp_exposed, dp_reduce_s=reduce, dp_exposed_s=dp_exposed,
        optimizer_s=_optimizer_time(counts, plan, p, gpu, cal),
        tokens_per_step=mb_tokens * grad_accum * plan.dp, world_size=plan.world_size,
        flops_per_token=flops_per_token, peak_flops=peak,
        offload_s=grad_accum * _offload_time(
            host_activation_bytes(model_cfg, plan, micro_batch, seq_len, precision,
                                  loss_chunk_tokens=loss_chunk_tokens, calibration=cal,
                                  counts=counts, compiled_loss=compiled_loss), gpu, cal))


__all__ = ["Group", "TimingEstimate", "estimate_time", "recompute_share", "compute_terms",
           "combine_terms", "loss_time", "COMPUTE_TERMS", "all_reduce_time",
           "reduce_scatter_time", "all_gather_time", "all_to_all_time"]
