"""Every replica of a MoE router applies the same auxiliary-loss-free bias update.

The update follows the routing loads since the last optimizer step; each data-parallel replica
sees other tokens, so the loads must be summed over every rank first, or the replicas' biases (and
with them the routing) drift apart. The MoE layers take that sum through their `load_sum` slot;
this callback fills it through the strategy's own all-reduce, so it works under any Lightning
strategy. A slot that parallel/ has filled already (expert parallelism, or pipeline parallelism,
whose stages sum over their own ranks) is left as it is.
"""
from __future__ import annotations

from functools import partial

import lightning as L

from ..models.protocol import find_transformer, moe_layers


def share_routing_loads(transformer, sum_over_ranks) -> None:
    """Fill each MoE layer's `load_sum` slot that expert parallelism left empty with
    `sum_over_ranks`, so every rank's routers see the loads of all ranks (both front-ends)."""
    for _, layer in moe_layers(transformer):
        if getattr(layer, "load_sum", None) is None:
            layer.load_sum = sum_over_ranks


class ShareRoutingLoads(L.Callback):
    """Fill the MoE layers' `load_sum` slot with a sum over all ranks (`strategy.reduce`)."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        transformer = find_transformer(pl_module)
        if trainer.world_size == 1 or transformer is None:
            return
        share_routing_loads(transformer, partial(trainer.strategy.reduce, reduce_op="sum"))


__all__ = ["ShareRoutingLoads", "share_routing_loads"]
