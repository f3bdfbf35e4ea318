"""Every tunable constant of the planner, in one place, so they can be fitted to measurements.

The defaults were fitted to the single-H100 anchors in DESIGN.md (a 1.1B Llama-shaped model,
seq 2048, micro-batch 8): eager bf16-mixed 43.7k tokens/s, eager bf16-true 49.9k, compiled
bf16-mixed 66.8k; peak memory 59.7 / 48.3 / 44.9 GiB. Multi-GPU constants (collective
efficiency, overlap) are textbook values until a cluster run measures them.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Calibration:
    """Constants of the memory and time models; pass a modified copy to any planner function."""

    # ---- compute: fraction of the datasheet peak that training matmuls reach
    eager_efficiency: float = 0.38  # bf16-true eager anchor: 49.9k tokens/s -> 0.376
    compiled_efficiency: float = 0.53  # torch.compile per block anchor: 66.8k tokens/s -> 0.52
    autocast_eager_factor: float = 0.88  # eager autocast casts cost 12% (43.7k vs 49.9k)
    selective_recompute_fraction: float = 0.05  # selective AC: recomputed cheap ops, x forward time
    # ---- optimizer step: AdamW is memory bound
    hbm_efficiency: float = 0.7  # fraction of HBM bandwidth a fused AdamW reaches
    # ---- communication
    collective_efficiency: float = 0.8  # NCCL bus bandwidth / link bandwidth
    dp_overlap: float = 1.0  # fraction of backward time that can hide gradient reduction
    fsdp_overlap: float = 1.0  # fraction of compute time that can hide FSDP all-gathers
    # ---- memory
    usable_memory_fraction: float = 0.95  # headroom for the +-10% error seen on the anchors
    cuda_context_gib: float = 1.0  # CUDA context, cuBLAS workspaces, NCCL channels
    fragmentation: float = 0.10  # allocator slack on activation memory (caching allocator)
    fsdp_prefetch_units: int = 2  # FSDP unsharded units alive at once (current + prefetched)
    moe_imbalance: float = 1.2  # tokens on the busiest expert rank / the mean
    logits_bytes_per_element: int = 12  # fp32 log-softmax output + its grad + the input grad

    def compute_efficiency(self, compiled: bool, autocast: bool) -> float:
        """Fraction of peak for matmul-bound work under this execution mode."""
        if compiled:
            return self.compiled_efficiency
        return self.eager_efficiency * (self.autocast_eager_factor if autocast else 1.0)


DEFAULT_CALIBRATION = Calibration()

__all__ = ["Calibration", "DEFAULT_CALIBRATION"]
