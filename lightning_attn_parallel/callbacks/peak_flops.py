"""Datasheet peak matmul throughput per GPU, the denominator of MFU.

Dense figures (no 2:4 sparsity), TFLOP/s. Which column applies depends on the precision the
matmuls actually run in: bf16/fp16 for mixed or true half precision; for fp32 runs, TF32 when
PyTorch is allowed to use it (float32 matmul precision "high" or "medium"), plain fp32 otherwise.
"""
from __future__ import annotations

from typing import Optional

import torch

# (fragment of torch.cuda.get_device_name, bf16/fp16, tf32, fp32); first match wins, so the
# PCIe and NVL variants come before the generic H100 (the SXM part).
_PEAKS: tuple[tuple[str, float, float, float], ...] = (
    ("H100 PCIe", 756.0, 378.0, 51.2),
    ("H100 NVL", 835.0, 417.5, 59.8),
    ("H100", 989.4, 494.7, 66.9),
    ("H200", 989.4, 494.7, 66.9),
    ("A100", 312.0, 156.0, 19.5),
)


def peak_tflops_for(device_name: str, precision: str,
                    float32_matmul_precision: Optional[str] = None) -> Optional[float]:
    """Peak TFLOP/s of `device_name` at Lightning `precision` ("bf16-mixed", "32-true", ...);
    None when the card or the precision is not in the table (MFU is then not logged)."""
    row = next((r for r in _PEAKS if r[0].lower() in device_name.lower()), None)
    if row is None:
        return None
    _, half, tf32, fp32 = row
    precision = str(precision)
    if precision.startswith(("bf16", "16")):
        return half
    if precision.startswith("32"):
        matmul = float32_matmul_precision or torch.get_float32_matmul_precision()
        return fp32 if matmul == "highest" else tf32
    return None


def device_peak_tflops(device: torch.device, precision: str) -> Optional[float]:
    """Peak of the GPU this rank runs on; None on a CPU, whose peak is not known here."""
    if device.type != "cuda":
        return None
    return peak_tflops_for(torch.cuda.get_device_name(device), precision)
