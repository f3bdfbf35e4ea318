"""Metric names: the one list that the callbacks log and the dashboard plots, and how a number is
logged from the step without stalling the GPU (`host_scalar`).

Keeping them here means a renamed metric cannot silently leave an empty dashboard panel: the
dashboard builds its panels from these constants and the tests compare them with a real run.
"""
from __future__ import annotations

import torch

STEP = "trainer/global_step"  # the x axis Lightning's WandbLogger attaches to every log call

# The module's own: the step's mean token loss, the validation loss, the learning rate.
TRAIN_LOSS = "train/loss"
VAL_LOSS = "val/loss"
LEARNING_RATE = "train/lr"
GRAD_NORM = "train/grad_norm"  # the total norm before clipping (when the Trainer clips)

# Throughput: global figures count each token once (see throughput.py for tensor parallelism).
TOKENS_PER_S = "throughput/tokens_per_s"
TOKENS_PER_S_PER_GPU = "throughput/tokens_per_s_per_gpu"
TFLOPS_PER_GPU = "throughput/tflops_per_gpu"
MFU = "throughput/mfu"
STEP_TIME_S = "throughput/step_time_s"
PROGRESS_BAR_TOKENS_PER_S = "tok/s"  # short, for the progress bar only

# Memory, GiB. Headline values are the maximum over ranks: the rank nearest to running out.
MEMORY_ALLOCATED = "memory/allocated_gib"
MEMORY_RESERVED = "memory/reserved_gib"
MEMORY_PEAK_ALLOCATED = "memory/peak_allocated_gib"
MEMORY_PEAK_RESERVED = "memory/peak_reserved_gib"

# Load balance: each quantity is logged per rank plus its imbalance and efficiency.
BALANCE_STEP_TIME = "balance/step_time_s"
BALANCE_TOKENS = "balance/tokens"
BALANCE_ATTENTION_TFLOP = "balance/attention_tflop"
BALANCE_QUANTITIES = (BALANCE_STEP_TIME, BALANCE_TOKENS, BALANCE_ATTENTION_TFLOP)
BALANCE_MOE = "balance/moe"  # prefix of the per-layer expert-load figures of MoE models

# Gradient communication of the strategy's reducer, per optimizer step.
COMM_TIME_MS = "comm/time_ms"
COMM_EXPOSED_MS = "comm/exposed_ms"
COMM_HIDDEN_FRACTION = "comm/hidden_fraction"
COMM_GBYTES = "comm/gbytes"

# W&B run summaries: the worst case for memory, the typical value for speed.
SUMMARY_MAX = (MEMORY_PEAK_ALLOCATED, MEMORY_PEAK_RESERVED)
SUMMARY_MEAN = (TOKENS_PER_S, TOKENS_PER_S_PER_GPU, TFLOPS_PER_GPU, MFU, STEP_TIME_S)


def per_rank(prefix: str, rank: int) -> str:
    """Key of one rank's value of a quantity, e.g. balance/step_time_s/rank3."""
    return f"{prefix}/rank{rank}"


def per_rank_pattern(prefix: str) -> str:
    """Regular expression matching every rank's key of a quantity (the world size varies)."""
    return f"^{prefix}/rank[0-9]+$"


def imbalance(prefix: str) -> str:
    """(max - min) / mean over ranks."""
    return f"{prefix}/imbalance"


def efficiency(prefix: str) -> str:
    """min / max over ranks: 1 when balanced."""
    return f"{prefix}/efficiency"


def moe(key: str) -> str:
    """Key of one expert-load figure, e.g. moe/layer3/imbalance -> balance/moe/layer3/imbalance."""
    return f"{BALANCE_MOE}/{key.removeprefix('moe/')}"


def moe_pattern() -> str:
    return f"^{BALANCE_MOE}/.+$"


def host_scalar(value: float) -> torch.Tensor:
    """A number to `self.log` without stalling the GPU.

    Lightning turns a logged Python number into a tensor on the module's device. On CUDA that is
    a blocking copy from pageable memory, which first waits for every queued kernel: the GPU then
    sits idle while the host catches up, once per logged number per step (Lightning issue #20995
    is about where such waits land). A CPU tensor is kept on the CPU, where Lightning reads it
    back anyway."""
    return torch.tensor(float(value), dtype=torch.float32, device="cpu")
