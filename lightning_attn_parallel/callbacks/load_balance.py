"""How evenly the work is spread over ranks: busy time, tokens and attention FLOPs per rank.

Only rank 0 reaches W&B, so every rank's figures are gathered when the window closes and
logged as balance/<quantity>/rank<r>, with the imbalance (max - min) / mean and the efficiency
min / max of each quantity.

Busy time is the window's wall time less the exposed (not overlapped) communication time that
the strategy's gradient reducer reports: a fast rank spends the difference waiting for the slow
one inside the gradient collective, and counting that wait would make every rank look equally
slow. Collectives inside the forward pass (tensor or context parallelism) are not reported by
the reducer, so under those plans tokens and attention FLOPs are the sharper signal.

Attention FLOPs per rank use the model's attention term at the full sequence length times the
rank's tokens, divided by tp (tensor parallelism splits the heads), so ranks that drew longer
sequences show up as FLOP imbalance even when step times are equal. Under pipeline parallelism a
rank counts the attention of the blocks it holds, so uneven stages show up too. Like the model's
count, it ignores the causal mask.

For MoE models, `models.deepseek.moe_load_stats(model)` gives the per-layer expert load; the
maximum over ranks of each figure is logged under balance/moe/. Under pipeline parallelism a
rank holds some layers only: every rank gathers a slot for each MoE layer of the whole model
(NaN where another stage holds it), so rank 0 logs every stage's layers.
"""
from __future__ import annotations

import importlib
import math
from typing import Callable, Optional, Sequence

import lightning as L
from torch import nn

from . import metrics as m
from .accounting import gradient_reducer, held_layer_fraction, tensor_parallel_degree
from .base import TokenCountingMetrics
from .distributed import gather_rows
from ..models.flops import attention_flops_per_token


def spread(values: Sequence[float]) -> tuple[float, float]:
    """(imbalance, efficiency) = ((max - min) / mean, min / max); (0, 1) when all are zero."""
    high, low = max(values), min(values)
    mean = sum(values) / len(values)
    if high <= 0:
        return 0.0, 1.0
    return (high - low) / mean, low / high


def balance_metrics(per_rank: dict[str, Sequence[float]]) -> dict[str, float]:
    """Per-rank values, imbalance and efficiency of each quantity (keyed by metric prefix)."""
    out: dict[str, float] = {}
    for prefix, values in per_rank.items():
        for rank, value in enumerate(values):
            out[m.per_rank(prefix, rank)] = value
        out[m.imbalance(prefix)], out[m.efficiency(prefix)] = spread(values)
    return out


def _moe_load_stats(config) -> tuple[Optional[Callable[[nn.Module], dict[str, float]]], list[str]]:
    """The MoE statistics function if the DeepSeek model family provides one, and the names of
    its figures for every MoE layer of the whole model (the same on every rank)."""
    try:
        module = importlib.import_module("lightning_attn_parallel.models.deepseek")
    except ImportError:
        return None, []
    stats, names = getattr(module, "moe_load_stats", None), getattr(module, "moe_stat_names", None)
    return (stats, names(config)) if stats is not None and names is not None else (None, [])


class LoadBalanceCallback(TokenCountingMetrics):
    """Logs per-rank busy time per step, tokens per step and attention TFLOP per step."""

    def __init__(self, log_every_n_steps: Optional[int] = None) -> None:
        super().__init__(log_every_n_steps)
        self._moe_stats: Optional[Callable[[nn.Module], dict[str, float]]] = None
        self._moe_keys: list[str] = []
        self._tokens = 0.0
        self._attention_flops = 0.0
        self._exposed_s = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        config = getattr(pl_module.model, "config", None)
        self._moe_stats, self._moe_keys = _moe_load_stats(config) if getattr(config, "is_moe", False) \
            else (None, [])

    def start_window(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._tokens = 0.0
        self._attention_flops = 0.0
        self._exposed_s = 0.0

    def micro_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        share = held_layer_fraction(pl_module.model) / tensor_parallel_degree(trainer)
        for tokens, seq_len in self._consumed.take():
            self._tokens += tokens
            self._attention_flops += tokens * attention_flops_per_token(pl_module.model.config,
                                                                        seq_len) * share

    def optimizer_step_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        reducer = gradient_reducer(trainer)
        if reducer is not None:
            self._exposed_s += float(reducer.comm_stats().get("exposed_comm_time_s", 0.0))

    def window_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule,
                       steps: int) -> dict[str, float]:
        busy = max(self.timer.elapsed_s() - self._exposed_s, 0.0)
        local = [busy / steps, self._tokens / steps, self._attention_flops / steps / 1e12]
        moe_keys = self._moe_keys if self._moe_stats is not None else []
        if moe_keys:
            stats = self._moe_stats(pl_module.model)
            local += [float(stats.get(key, math.nan)) for key in moe_keys]
        rows = gather_rows(local)
        out = balance_metrics({prefix: [row[i] for row in rows]
                               for i, prefix in enumerate(m.BALANCE_QUANTITIES)})
        for j, key in enumerate(moe_keys, start=len(m.BALANCE_QUANTITIES)):
            held = [row[j] for row in rows if not math.isnan(row[j])]  # ranks holding the layer
            if held:
                out[m.moe(key)] = max(held)
        return out
