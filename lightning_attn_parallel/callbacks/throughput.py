"""Tokens per second, TFLOP/s per GPU, MFU and step time.

Global throughput counts each token once. Ranks of a tensor-parallel group process the same
tokens (each computes a slice of every matmul), and so do the stages of a pipeline (each runs its
blocks on every token of the batch), while context-parallel and data-parallel ranks process
distinct tokens. So the global token count of a window is the sum over ranks of local tokens
divided by tp x pp. Lightning's ThroughputMonitor instead multiplies one rank's rate by the
world size, which counts every token tp times under tensor parallelism.

Tokens are counted at the model's input (see accounting.ConsumedTokens), after any splitting
the strategy does. FLOPs follow the model's own count at the full sequence length (attention
cost grows with the whole sequence even when context parallelism gives a rank only part of
it), and per-GPU figures divide the global work by the world size, so
MFU = FLOPs/token x tokens/s per GPU / peak. Under pipeline parallelism FLOPs per token are the
whole model's (models/flops.py), although a rank holds only its stages: the whole model's work on
the pipeline's tokens, over world size x peak.
"""
from __future__ import annotations

from typing import Optional, Sequence

import lightning as L

from ..hardware import device_peak_tflops
from . import metrics as m
from .accounting import FlopsPerToken, token_sharing_degree
from .base import TokenCountingMetrics
from .distributed import gather_rows


def throughput_metrics(rows: Sequence[Sequence[float]], tp: int, steps: int,
                       peak_tflops: Optional[float]) -> dict[str, float]:
    """Window metrics from every rank's (local tokens, local FLOPs, elapsed seconds); `tp`: the
    ranks that process the same tokens (accounting.token_sharing_degree).

    The slowest rank's elapsed time is the window's wall time: the step is done when all are.
    """
    world = len(rows)
    tokens = sum(r[0] for r in rows) / tp
    flops = sum(r[1] for r in rows) / tp
    wall = max(r[2] for r in rows)
    if wall <= 0:
        return {}
    tokens_per_s = tokens / wall
    tflops_per_gpu = flops / wall / world / 1e12
    out = {
        m.TOKENS_PER_S: tokens_per_s,
        m.TOKENS_PER_S_PER_GPU: tokens_per_s / world,
        m.TFLOPS_PER_GPU: tflops_per_gpu,
        m.STEP_TIME_S: wall / steps,
    }
    if peak_tflops:
        out[m.MFU] = tflops_per_gpu / peak_tflops
    return out


class ThroughputCallback(TokenCountingMetrics):
    """Logs throughput once per window and shows global tokens/s in the progress bar.

    `peak_tflops` overrides the datasheet table (needed for MFU on cards or CPUs not in it).
    """

    def __init__(self, log_every_n_steps: Optional[int] = None,
                 peak_tflops: Optional[float] = None) -> None:
        super().__init__(log_every_n_steps)
        self.peak_tflops = peak_tflops
        self._peak: Optional[float] = None
        self._flops_per_token = FlopsPerToken()
        self._tokens = 0.0
        self._flops = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._peak = self.peak_tflops or device_peak_tflops(pl_module.device, trainer.precision)

    def start_window(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._tokens = 0.0
        self._flops = 0.0

    def micro_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for tokens, seq_len in self._consumed.take():
            self._tokens += tokens
            self._flops += tokens * self._flops_per_token(pl_module.model, seq_len)

    def window_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule,
                       steps: int) -> dict[str, float]:
        rows = gather_rows([self._tokens, self._flops, self.timer.elapsed_s()])
        return throughput_metrics(rows, token_sharing_degree(trainer), steps, self._peak)

    def after_emit(self, pl_module: L.LightningModule, metrics: dict[str, float]) -> None:
        if m.TOKENS_PER_S in metrics:
            pl_module.log(m.PROGRESS_BAR_TOKENS_PER_S, m.host_scalar(metrics[m.TOKENS_PER_S]), prog_bar=True,
                          logger=False)
