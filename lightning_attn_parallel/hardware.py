"""The one description of the hardware: each card's memory, peak matmul throughput per dtype and
HBM bandwidth, and the cluster's two link classes.

The planner, the throughput callback (the MFU denominator) and the benchmarks all read it.
Figures are datasheet values, dense (no 2:4 sparsity). `memory_gib` is the capacity torch reports
(`total_memory`), which is what the caching allocator can hand out before the CUDA context.

On a live GPU that this table does not list, the peak comes from Lightning's
`get_available_flops`, which covers the long tail of cards (RTX, L4, A10G, V100...). Cards are
listed here when the planner needs their memory and bandwidth too, or when Lightning's figure is
not the dense one (its H200 rows are sparsity figures, twice the dense peak).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch

GIB = 1024 ** 3


@dataclass(frozen=True)
class GpuSpec:
    """One accelerator: memory, peak matmul throughput per dtype and HBM bandwidth."""

    name: str
    memory_gib: float
    bf16_tflops: float  # dense bf16/fp16 tensor-core peak
    tf32_tflops: float  # dense tf32 tensor-core peak
    fp32_tflops: float  # plain fp32 (torch's default "highest" matmul precision)
    hbm_gbps: float  # GB/s
    fp8_tflops: Optional[float] = None  # dense fp8 tensor-core peak, where the card has one
    host_link_gbps: float = 64.0  # GB/s each way to host memory (PCIe Gen5 x16; Gen4 x16: 32)
    match: tuple[str, ...] = ()  # lower-case fragments of torch.cuda.get_device_name

    @property
    def memory_bytes(self) -> float:
        return self.memory_gib * GIB

    def peak_flops(self, compute_bytes: int) -> float:
        """Peak FLOP/s for matmuls whose inputs are `compute_bytes` wide (2: bf16/fp16, 4: fp32)."""
        return (self.bf16_tflops if compute_bytes <= 2 else self.fp32_tflops) * 1e12

    def peak_tflops(self, precision: str, float32_matmul_precision: Optional[str] = None) -> Optional[float]:
        """Peak TFLOP/s at a Lightning `precision` ("bf16-mixed", "32-true", ...) or "fp8": bf16/fp16 for
        mixed or true half precision; for fp32, TF32 when torch may use it (float32 matmul
        precision "high" or "medium"), plain fp32 otherwise; None for other precisions."""
        precision = str(precision)
        if precision == "fp8":  # ParallelPlan(fp8=...): the fp8 tensor-core peak
            return self.fp8_tflops
        if precision.startswith(("bf16", "16")):
            return self.bf16_tflops
        if precision.startswith("32"):
            matmul = float32_matmul_precision or torch.get_float32_matmul_precision()
            return self.fp32_tflops if matmul == "highest" else self.tf32_tflops
        return None


# First match wins, so the PCIe and NVL variants come before the generic H100 (the SXM part).
H100_PCIE = GpuSpec("H100 PCIe", memory_gib=79.2, bf16_tflops=756.0, tf32_tflops=378.0, fp32_tflops=51.2,
                    hbm_gbps=2000.0, fp8_tflops=1513.0, match=("h100 pcie", "h100 hbm2e"))
H100_NVL = GpuSpec("H100 NVL", memory_gib=93.1, bf16_tflops=835.0, tf32_tflops=417.5, fp32_tflops=59.8,
                   hbm_gbps=3900.0, fp8_tflops=1670.0, match=("h100 nvl",))
H100_SXM = GpuSpec("H100 SXM", memory_gib=79.1, bf16_tflops=989.4, tf32_tflops=494.7, fp32_tflops=66.9,
                   hbm_gbps=3350.0, fp8_tflops=1978.9, match=("h100",))
H200 = GpuSpec("H200", memory_gib=139.8, bf16_tflops=989.4, tf32_tflops=494.7, fp32_tflops=66.9,
               hbm_gbps=4800.0, fp8_tflops=1978.9, match=("h200",))
A100_80GB = GpuSpec("A100 80GB", memory_gib=79.2, bf16_tflops=312.0, tf32_tflops=156.0, fp32_tflops=19.5,
                    hbm_gbps=2039.0, host_link_gbps=32.0, match=("a100",))
# A stand-in so CPU runs of the planner have numbers; nobody should plan a real run with it.
CPU = GpuSpec("CPU", memory_gib=64.0, bf16_tflops=1.0, tf32_tflops=1.0, fp32_tflops=1.0,
              hbm_gbps=100.0, match=("cpu",))

GPU_TABLE: tuple[GpuSpec, ...] = (H100_PCIE, H100_NVL, H100_SXM, H200, A100_80GB, CPU)
KNOWN_GPUS: dict[str, GpuSpec] = {"h200": H200, "h100": H100_SXM, "a100": A100_80GB, "cpu": CPU}


def find_gpu(name: str) -> Optional[GpuSpec]:
    """The table's row for a card named loosely ("NVIDIA H100 80GB HBM3", "h200"), or None."""
    key = name.lower()
    return next((spec for spec in GPU_TABLE if any(m in key for m in spec.match)), None)


def gpu_spec(name: str) -> GpuSpec:
    """Look a card up by a loose name ("H100", "NVIDIA H100 80GB HBM3", "h200", "cpu")."""
    spec = find_gpu(name)
    if spec is None:
        raise ValueError(f"GPU {name!r} is unknown to the planner: use one of "
                         f"{', '.join(KNOWN_GPUS)} or build a GpuSpec(...) with its datasheet figures")
    return spec


def detect_gpu(default: Optional[GpuSpec] = None) -> GpuSpec:
    """The local card from torch.cuda; `default` (or the CPU stand-in) without one.

    The memory figure is taken from the device itself, so a MIG slice or a card variant with
    less memory is planned against what it really has.
    """
    if not torch.cuda.is_available():
        return default or CPU
    name = torch.cuda.get_device_name(0)
    spec = find_gpu(name) or replace(H100_SXM, name=f"{name} (assumed H100-like)")
    total = torch.cuda.get_device_properties(0).total_memory
    return replace(spec, memory_gib=total / GIB)


def _matmul_dtype(precision: str) -> Optional[torch.dtype]:
    precision = str(precision)
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    if precision.startswith("32"):
        return torch.float32
    return None


def peak_tflops(device_name: str, precision: str,
                float32_matmul_precision: Optional[str] = None) -> Optional[float]:
    """Peak TFLOP/s of the card named `device_name` at `precision`, from this table; None when
    the card or the precision is not in it."""
    spec = find_gpu(device_name)
    return spec.peak_tflops(precision, float32_matmul_precision) if spec is not None else None


def device_peak_tflops(device: torch.device, precision: str) -> Optional[float]:
    """Peak TFLOP/s of the GPU this rank runs on: this table, else Lightning's; None on a CPU,
    whose peak is not known, or when neither knows the card (MFU is then not logged)."""
    if device.type != "cuda":
        return None
    peak = peak_tflops(torch.cuda.get_device_name(device), precision)
    if peak is not None:
        return peak
    from lightning.fabric.utilities.throughput import get_available_flops

    dtype = _matmul_dtype(precision)
    flops = get_available_flops(device, dtype) if dtype is not None else None
    return flops / 1e12 if flops else None


@dataclass(frozen=True)
class ClusterSpec:
    """Nodes, GPUs per node and the two link classes of the alpha-beta model
    (`collective_cost`).

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


def cluster_for_plan(plan, num_nodes: int, gpus_per_node: int) -> ClusterSpec:
    """The cluster a ParallelPlan describes: its link speeds (`intra_node_gbps`,
    `inter_node_gbps`) on `num_nodes` x `gpus_per_node`."""
    return ClusterSpec(num_nodes=num_nodes, gpus_per_node=gpus_per_node,
                       intra_node_gbps=plan.intra_node_gbps, inter_node_gbps=plan.inter_node_gbps)


__all__ = ["GIB", "GpuSpec", "ClusterSpec", "H100_SXM", "H100_PCIE", "H100_NVL", "H200", "A100_80GB",
           "CPU", "GPU_TABLE", "KNOWN_GPUS", "find_gpu", "gpu_spec", "detect_gpu", "peak_tflops",
           "device_peak_tflops", "cluster_for_plan"]
