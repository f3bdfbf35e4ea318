"""Accelerator and cluster descriptions the memory and time models read.

Figures are datasheet values (dense, no sparsity). `memory_gib` is the capacity torch reports
(`total_memory`), which is what the caching allocator can hand out before the CUDA context.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

GIB = 1024 ** 3


@dataclass(frozen=True)
class GpuSpec:
    """One accelerator: memory, peak matmul throughput and HBM bandwidth."""

    name: str
    memory_gib: float
    bf16_tflops: float  # dense bf16/fp16 tensor-core peak
    tf32_tflops: float  # dense tf32 tensor-core peak
    fp32_tflops: float  # plain fp32 (torch's default "highest" matmul precision)
    hbm_gbps: float  # GB/s

    @property
    def memory_bytes(self) -> float:
        return self.memory_gib * GIB

    def peak_flops(self, compute_bytes: int) -> float:
        """Peak FLOP/s for matmuls whose inputs are `compute_bytes` wide (2: bf16/fp16, 4: fp32)."""
        return (self.bf16_tflops if compute_bytes <= 2 else self.fp32_tflops) * 1e12


H100_SXM = GpuSpec("H100 SXM", memory_gib=79.1, bf16_tflops=989.0, tf32_tflops=494.7,
                   fp32_tflops=66.9, hbm_gbps=3350.0)
H200 = GpuSpec("H200", memory_gib=139.8, bf16_tflops=989.0, tf32_tflops=494.7,
               fp32_tflops=66.9, hbm_gbps=4800.0)
A100_80GB = GpuSpec("A100 80GB", memory_gib=79.2, bf16_tflops=312.0, tf32_tflops=156.0,
                    fp32_tflops=19.5, hbm_gbps=2039.0)
# A stand-in so CPU runs of the planner have numbers; nobody should plan a real run with it.
CPU = GpuSpec("CPU", memory_gib=64.0, bf16_tflops=1.0, tf32_tflops=1.0, fp32_tflops=1.0,
              hbm_gbps=100.0)

KNOWN_GPUS: dict[str, GpuSpec] = {"h200": H200, "h100": H100_SXM, "a100": A100_80GB, "cpu": CPU}


def gpu_spec(name: str) -> GpuSpec:
    """Look a card up by a loose name ("H100", "NVIDIA H100 80GB HBM3", "h200", "cpu")."""
    key = name.lower()
    for short, spec in KNOWN_GPUS.items():  # h200 before h100: neither name contains the other
        if short in key:
            return spec
    raise ValueError(f"GPU {name!r} is unknown to the planner: use one of "
                     f"{', '.join(KNOWN_GPUS)} or build a GpuSpec(...) with its datasheet figures")


def detect_gpu(default: Optional[GpuSpec] = None) -> GpuSpec:
    """The local card from torch.cuda; `default` (or the CPU stand-in) without one.

    The memory figure is taken from the device itself, so a MIG slice or a card variant with
    less memory is planned against what it really has.
    """
    import torch

    if not torch.cuda.is_available():
        return default or CPU
    name = torch.cuda.get_device_name(0)
    try:
        spec = gpu_spec(name)
    except ValueError:
        spec = replace(H100_SXM, name=f"{name} (assumed H100-like)")
    total = torch.cuda.get_device_properties(0).total_memory
    return replace(spec, memory_gib=total / GIB)


@dataclass(frozen=True)
class ClusterSpec:
    """Nodes, GPUs per node and the two link classes of an alpha-beta model.

    Bandwidths are per GPU and per direction in GB/s: NVLink 4 gives 450 inside an H100 node;
    one 400 Gb/s InfiniBand NIC per GPU gives 50 across nodes. Alphas are per ring step.
    """

    num_nodes: int = 1
    gpus_per_node: int = 8
    intra_node_gbps: float = 450.0
    inter_node_gbps: float = 50.0
    intra_node_alpha_s: float = 5e-6
    inter_node_alpha_s: float = 15e-6

    def __post_init__(self) -> None:
        if self.num_nodes < 1 or self.gpus_per_node < 1:
            raise ValueError(f"ClusterSpec num_nodes={self.num_nodes}, gpus_per_node="
                             f"{self.gpus_per_node} is invalid: both must be >= 1")
        if self.intra_node_gbps <= 0 or self.inter_node_gbps <= 0:
            raise ValueError("ClusterSpec bandwidths must be > 0 GB/s")

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.gpus_per_node

    def describe(self) -> str:
        return (f"{self.num_nodes} node(s) x {self.gpus_per_node} GPUs = {self.world_size} "
                f"(NVLink {self.intra_node_gbps:g} GB/s, network {self.inter_node_gbps:g} GB/s per GPU)")


__all__ = ["GIB", "GpuSpec", "ClusterSpec", "H100_SXM", "H200", "A100_80GB", "CPU", "KNOWN_GPUS",
           "gpu_spec", "detect_gpu"]
