"""Every tunable constant of the planner, in one place, so they can be fitted to measurements.

Compute time is a roofline of three parts (see timing.py): matmuls at `matmul_efficiency` of the
card's peak, attention at `attention_efficiency` of the peak (against TorchTitan's count of
attention FLOPs, which ignores the causal half), and element-wise work (norms, RoPE, SwiGLU's
gate, residual adds, autocast's casts) as bytes moved per token, per layer and per unit of
d_model at the card's HBM bandwidth. The element-wise part is what torch.compile fuses away and
what makes a card with faster memory faster at equal FLOPs.

The defaults were fitted by `planning.fit.fit_calibration` to the 1.1B Llama-shaped model on one
H100 SXM and one H200 (benchmarks/results/planner_fit_h200.json, sharding_h200.json and the
single-GPU H100 runs of benchmarks/RESULTS.md), then checked on configurations left out of the
fit (planner_check_h200.json; RESULTS.md, Planner).
`context_parallel_attention` rests on 2-GPU runs only; collective efficiency and overlap are
textbook values until a cluster run measures them.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Calibration:
    """Constants of the memory and time models; pass a modified copy to any planner function."""

    # ---- compute (fitted): roofline terms, see the module docstring
    matmul_efficiency: float = 0.59
    attention_efficiency: float = 0.83
    elementwise_bytes_autocast: float = 523.0  # eager "-mixed": per token, layer and d_model
    elementwise_bytes_eager: float = 473.0  # eager "-true" / "32-true", and "-mixed" under FSDP2
    elementwise_bytes_compiled: float = 175.0  # torch.compile per block
    selective_recompute_bytes: float = 438.0  # selective checkpointing's re-run element-wise ops
    # ---- routed experts, routing included (fitted to a 4-layer DeepSeek-V2-Lite cut on one H100)
    expert_efficiency_grouped: float = 0.154  # fraction of peak, grouped GEMM (torch._grouped_mm)
    expert_efficiency_loop: float = 0.051  # fraction of peak, one matmul per expert
    # ---- context parallelism (fitted to two-H100 runs at 64k and 128k tokens, ring and all-gather)
    context_parallel_attention: float = 0.62  # attention speed under cp > 1 relative to one GPU:
    # chunk-pair kernels and fp32 log-sum-exp merges outside them
    # ---- optimizer step: AdamW is memory bound
    hbm_efficiency: float = 0.7  # fraction of HBM bandwidth a fused AdamW reaches
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
    fsdp_prefetch_units: int = 2  # FSDP unsharded units alive at once (current + prefetched)
    moe_imbalance: float = 1.2  # tokens on the busiest expert rank / the mean
    logits_bytes_per_element: int = 12  # fp32 log-softmax output + its grad + the input grad

    def expert_efficiency(self, grouped_gemm: bool) -> float:
        """Fraction of peak the routed experts reach, routing included, with this kernel."""
        return self.expert_efficiency_grouped if grouped_gemm else self.expert_efficiency_loop

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
