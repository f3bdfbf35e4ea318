"""Every tunable constant of the planner, in one place, so they can be fitted to measurements.

Compute time is a roofline of three parts (see timing.py): matmuls at `matmul_efficiency` of the
card's peak, attention at `attention_efficiency` of the peak (against TorchTitan's count of
attention FLOPs, which ignores the causal half), and element-wise work (norms, RoPE, SwiGLU's
gate, residual adds, autocast's casts) as bytes moved per token, per layer and per unit of
d_model at the card's HBM bandwidth. The element-wise part is what torch.compile fuses away and
what makes a card with faster memory faster at equal FLOPs.

The loss kernel over the logits is its own term, bytes per logit element at HBM bandwidth for the
eager and the compiled kernel, read off kernel profiles (not fitted: the step times cannot
separate it from the element-wise term).

The defaults were fitted by `planning.fit.fit_calibration` in two stages (RESULTS.md, "Planner
after the compiled loss"); files under benchmarks/results/:
- the dense constants (matmul, attention, element-wise, selective) to the 1.1B Llama-shaped model
  on one H100 SXM and one H200: planner_fit_h200.json, sharding_h200.json, planner.json,
  long_context.json, strategies_a.json, callbacks.json, speed_h200.json, speed_fp8_h200.json,
  speed_compiled_loss_h200.json, speed_fp8_bf16_true_h200.json and
  speed_fp8_vs_torchtitan_h200.json;
- then, with those held, the routed experts' efficiencies to the 4-layer DeepSeek-V2-Lite cut:
  moe.json (H100), moe_speed_eager_loss_h200.json and moe_speed_h200.json (H200).
Checked on configurations left out of the fit: planner_check_h200.json and
planner_moe_check_h200.json; planner_speed_check_predictions_h200.json holds the predictions for
the next check, made before its runs (not yet run).
`context_parallel_attention` rests on 2-GPU runs only; collective efficiency and overlap are
textbook values until a cluster run measures them.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Calibration:
    """Constants of the memory and time models; pass a modified copy to any planner function."""

    # ---- compute (fitted to the dense files of the module docstring): roofline terms
    matmul_efficiency: float = 0.590
    attention_efficiency: float = 0.833
    elementwise_bytes_autocast: float = 477.0  # eager "-mixed": per token, layer and d_model
    elementwise_bytes_eager: float = 436.0  # eager "-true" / "32-true", and "-mixed" under FSDP2
    elementwise_bytes_compiled: float = 130.0  # torch.compile per block
    selective_recompute_bytes: float = 426.0  # selective checkpointing's re-run element-wise ops
    # ---- routed experts, routing included, as fractions of peak (fitted to the V2-Lite cut with the
    # dense constants held): eager grouped GEMM (torch._grouped_mm) and per-expert loop, to moe.json
    # (H100) and the eager row of moe_speed_eager_loss_h200.json; a compiled MoE block (one graph:
    # routing, permutation and the grouped GEMMs' casts fused) to the compiled rows of
    # moe_speed_eager_loss_h200.json and moe_speed_h200.json
    expert_efficiency_grouped: float = 0.216
    expert_efficiency_loop: float = 0.0558
    expert_efficiency_grouped_compiled: float = 0.340
    # ---- the loss kernel over the logits (fp32 upcast, log-softmax, NLL and their backward):
    # HBM bytes per logit element at the card's bandwidth, read off kernel profiles on one H200.
    # Eager (moe_profile_h200.json, 8192 x 102400 logits): forward = the fp32 copy and
    # SoftMaxForward (2.43 + 3.16 ms), backward = SoftMaxBackward, the bf16 copy and the gradient's
    # zero fill (3.36 + 1.15 + 0.71 ms). Compiled, one fused reduction each way: forward 1.06 ms
    # (TorchTitan's compiled loss, moe_profile_h200.json) and 1.75 ms over 2 x 16384 x 32000
    # (speed_profile_compiled_loss_h200.json), backward 1.09 ms (TorchTitan's).
    loss_forward_bytes_eager: float = 32.0
    loss_backward_bytes_eager: float = 30.0
    loss_forward_bytes_compiled: float = 7.0
    loss_backward_bytes_compiled: float = 6.0
    # ---- context parallelism (fitted to two-H100 runs at 64k and 128k tokens, ring and all-gather)
    context_parallel_attention: float = 0.62  # attention speed under cp > 1 relative to one GPU:
    # chunk-pair kernels and fp32 log-sum-exp merges outside them
    # ---- optimizer step: AdamW is memory bound
    hbm_efficiency: float = 0.7  # fraction of HBM bandwidth a fused AdamW reaches
    # ---- activation offload: save_on_cpu's copies to and from pinned host memory
    # fraction of the host link's datasheet rate a pinned copy reaches: 55.1 GB/s out and 55.3 back
    # of PCIe Gen5's 64 on one H100 (results/host_copy_h100.json, benchmarks/host_copy.py)
    host_link_efficiency: float = 0.86
    # ---- communication
    collective_efficiency: float = 0.8  # NCCL bus bandwidth / link bandwidth
    dp_overlap: float = 1.0  # fraction of backward time that can hide gradient reduction
    fsdp_overlap: float = 1.0  # fraction of compute time that can hide FSDP all-gathers
    # ---- memory
    usable_memory_fraction: float = 0.95  # headroom for the +-10% error seen on the anchors
    cuda_context_gib: float = 1.0  # CUDA context, cuBLAS workspaces, NCCL channels
    fragmentation: float = 0.10  # caching allocator's slack on activation memory (reserved - allocated)
    compiled_saved_elements: float = 2.8  # torch.compile saves more than the eager formulas' minimum:
    # extra compute-dtype elements per token, per layer and per d_model (fitted: 1.1B model, H200)
    fp8_saved_bytes_less: float = 8.4  # compiled fp8 tensorwise keeps fp8 (1-byte) copies of the
    # converted linears' inputs for the backward: bytes per token, per dense layer and per d_model
    # it saves against the same plan in bf16. Fitted: 1.1B model on one H200, 5.8 GiB saved at
    # 16,384 tokens in both bf16-true (speed_compiled_loss_h200 -> speed_fp8_bf16_true_h200) and
    # cast_params (speed_h200 -> speed_fp8_h200). MoE layers (experts are not converted) and
    # checkpointed layers get none; rowwise scales and eager fp8 are not measured: none either.
    fsdp_prefetch_units: int = 2  # FSDP unsharded units alive at once (current + prefetched)
    moe_imbalance: float = 1.2  # tokens on the busiest expert rank / the mean
    logits_bytes_per_element: int = 12  # eager loss: fp32 log-softmax output + its grad + the input
    # grad (a compiled loss keeps two compute-dtype tensors: memory.logits_bytes_per_element)

    def expert_efficiency(self, grouped_gemm: bool, compiled: bool = False) -> float:
        """Fraction of peak the routed experts reach, routing included, with this kernel (the
        per-expert loop has no compiled measurement: it keeps its eager value)."""
        if not grouped_gemm:
            return self.expert_efficiency_loop
        return self.expert_efficiency_grouped_compiled if compiled else self.expert_efficiency_grouped

    def loss_bytes(self, compiled: bool) -> tuple[float, float]:
        """(forward, backward) HBM bytes per logit element of the loss kernel."""
        if compiled:
            return self.loss_forward_bytes_compiled, self.loss_backward_bytes_compiled
        return self.loss_forward_bytes_eager, self.loss_backward_bytes_eager

    def elementwise_bytes(self, compiled: bool, autocast: bool) -> float:
        """Element-wise bytes per token, per layer and per d_model for this execution mode."""
        if compiled:
            return self.elementwise_bytes_compiled
        return self.elementwise_bytes_autocast if autocast else self.elementwise_bytes_eager


DEFAULT_CALIBRATION = Calibration()

__all__ = ["Calibration", "DEFAULT_CALIBRATION"]


# Speed of the blocks' matmuls in fp8 relative to bf16 (ParallelPlan.fp8), measured with torchao
# 0.18 on an H200 on a compiled SwiGLU MLP of the 1.1B model's shape (d 2048, ffn 5632): tensorwise
# 2.68 ms against 3.30 ms in bf16, rowwise 3.94 ms. Casts and scales are inside those timings.
FP8_MATMUL_SPEEDUP = {"none": 1.0, "tensorwise": 3.30 / 2.68, "rowwise": 3.30 / 3.94}

# Speed of the routed experts' grouped GEMMs under ParallelPlan.fp8_experts relative to bf16,
# measured with torchao 0.18 on an H100 on one compiled MoE layer of the V2-Lite cut (49,152 rows,
# 64 experts, d 2048, expert width 1408, forward and backward, the model's column-major copies of
# the weights included; benchmarks/grouped_gemm_fp8.py -> grouped_gemm_fp8_h100.json): 15.01 ms
# against 4.87 ms in bf16. A slow-down: the planner says so rather than assume fp8 pays.
FP8_EXPERTS_SPEEDUP = 4.874 / 15.008
