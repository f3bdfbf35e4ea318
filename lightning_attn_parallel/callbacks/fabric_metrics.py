"""Throughput, MFU and memory for a Fabric loop: the Trainer callbacks' figures, by the same code
(throughput.py's `throughput_metrics`, memory.py's `memory_gib`, accounting.py's token count) and
under the same names, logged through Fabric's loggers (`fabric.log_dict`, W&B included).

A Fabric loop has no callback hooks at micro-batch granularity, so the loop calls `step_end(step)`
after each optimizer step; tokens are counted at the model's input as under the Trainer.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Optional

from ..hardware import device_peak_tflops
from ..models.protocol import find_transformer
from .accounting import ConsumedTokens, FlopsPerToken, tensor_parallel_degree
from .distributed import gather_rows
from .memory import memory_gib, memory_metrics, reset_peak
from .throughput import throughput_metrics
from .timing import WindowTimer


class FabricThroughput:
    """Every `log_every_n_steps` optimizer steps: tokens/s, TFLOP/s per GPU, MFU, step time and
    the memory figures, logged through `fabric` and kept in `history`."""

    def __init__(self, fabric: Any, model: Any, log_every_n_steps: int = 10,
                 peak_tflops: Optional[float] = None) -> None:
        self.fabric = fabric
        self.every = log_every_n_steps
        self.model = find_transformer(model)
        self.peak = peak_tflops or device_peak_tflops(fabric.device, str(fabric.strategy.precision.precision))
        self.history: list[tuple[int, dict[str, float]]] = []
        # ConsumedTokens reads the strategy's batch layout as `trainer.strategy` (duck-typed)
        self._consumed = ConsumedTokens()
        self._view = SimpleNamespace(strategy=fabric.strategy)  # what the Trainer-side helpers read
        self._consumed.attach(self._view, SimpleNamespace(model=self.model))
        self._flops_per_token = FlopsPerToken()
        self.timer = WindowTimer()
        self._open()

    def _open(self) -> None:
        self._tokens = self._flops = 0.0
        self._steps = 0
        reset_peak(self.fabric.device)
        self.timer.start(self.fabric.device)

    def step_end(self, step: int) -> dict[str, float]:
        """Account for one optimizer step; at the window's end gather, log and return the figures
        (collective: every rank calls it at the same steps)."""
        for tokens, seq_len in self._consumed.take():
            self._tokens += tokens
            self._flops += tokens * self._flops_per_token(self.model, seq_len)
        self._steps += 1
        if step % self.every:
            return {}
        rows = gather_rows([self._tokens, self._flops, self.timer.elapsed_s(), *memory_gib(self.fabric.device)])
        metrics = throughput_metrics([r[:3] for r in rows], tensor_parallel_degree(self._view), self._steps, self.peak)
        metrics.update(memory_metrics([r[3:] for r in rows]))  # one gather for both
        self.fabric.log_dict(metrics, step=step)
        self.history.append((step, metrics))
        self._open()
        return metrics


__all__ = ["FabricThroughput"]
