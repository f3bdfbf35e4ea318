"""Bad steps named: a non-finite loss or gradient norm stops the run with one line, or is skipped.

Every optimizer step, before the update, this rank's gradient norm (its local shards: the global
norm is finite exactly when every rank's part is) and the step's micro-batch losses are checked
on the device: the result is OR-ed into a flag and the first bad step is kept beside it, with no
host wait. The flag reaches the host with the logged metrics (every `log_every_n_steps`) and
before every checkpoint is written, gathered over all ranks; a bad step then ends the run with
one `NonFiniteStep` line naming the step, the ranks, and each rank's samples of that step (the
token file and the window's tokens or documents, where the data module knows them:
LMDataModule.describe_batch). A checkpoint is never written after a bad step, so the last one
holds the weights from before it.

`skip_nonfinite=N` (opt-in) instead skips up to N bad steps: the ranks agree on every step
before the update (one all-reduce and one host read per step, the price of deciding in time),
and a bad step's gradients are dropped, so the optimizer leaves weights and states untouched
(torch's optimizers skip parameters without a gradient). The step still counts (global_step
and the LR schedule move on, as with a gradient scaler's skipped steps). Bad step N+1 stops.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Optional

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from torch.distributed.tensor import DTensor

NO_STEP = -1


class NonFiniteStep(RuntimeError):
    """A training step whose loss or gradient norm was NaN or infinite."""


class NonFiniteGuard(Callback):
    """Stops (default) or skips (`skip_nonfinite=N`) steps with a non-finite loss or grad norm."""

    def __init__(self, skip_nonfinite: int = 0, log_every_n_steps: Optional[int] = None) -> None:
        if isinstance(skip_nonfinite, bool) or not isinstance(skip_nonfinite, int) or skip_nonfinite < 0:
            from ..errors import UserError

            raise UserError(f"skip_nonfinite={skip_nonfinite!r} is not a number of steps: use 0 to stop "
                            "at the first non-finite step, or N >= 1 to skip up to N of them")
        self.skip_nonfinite = skip_nonfinite
        self.log_every_n_steps = log_every_n_steps
        self.skipped: list[int] = []
        # on the device: [first bad step or NO_STEP, what was bad then (LOSS | GRAD bits)]
        self._first_bad: Optional[torch.Tensor] = None
        self._bad: Optional[torch.Tensor] = None  # this step's bits so far
        self._batches: OrderedDict[int, list[tuple[int, int]]] = OrderedDict()  # step -> (epoch, batch)

    # ---------------------------------------------------------------- per micro-batch, on device
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        step = trainer.global_step + 1
        self._batches.setdefault(step, []).append((trainer.current_epoch, batch_idx))
        while len(self._batches) > 2 * self._every(trainer) + 2:
            self._batches.popitem(last=False)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            self._flag(LOSS, ~torch.isfinite(loss.detach()).all())
        if trainer.global_step + 1 in self._batches:
            return  # gradients are still accumulating
        if self.skip_nonfinite == 0:  # (skipping was decided before the update)
            if self._bad is not None:
                self._record(trainer.global_step)
            if trainer.global_step % self._every(trainer) == 0:
                self.check(trainer)
        self._bad = None

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            grads = []  # fp16's scaler skips a step whose gradients overflowed: that is not a bad step
        else:
            grads = [g.to_local() if isinstance(g, DTensor) else g
                     for g in (p.grad for group in optimizer.param_groups for p in group["params"])
                     if g is not None]
            masters = _fused_masters(trainer, optimizer)
            if masters is not None:  # gradient parts held aside for the fused step
                grads += [g for _, held, grad in masters.step_gradients() for g in (held, grad) if g is not None]
        if grads:  # one pass over the gradients, as the clipping norm's
            self._flag(GRAD, ~torch.isfinite(torch.stack([n.float() for n in torch._foreach_norm(grads)]).sum()))
        if self.skip_nonfinite:
            self._skip_if_bad(trainer, optimizer)

    # ---------------------------------------------------------------- where the host looks
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        self.check(trainer)  # never write the weights of a bad step over the last good checkpoint

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.check(trainer)

    def check(self, trainer: L.Trainer) -> None:
        """Collective: raise NonFiniteStep on every rank if any rank recorded a bad step."""
        first = self._first_bad
        if first is None:
            first = torch.tensor([NO_STEP, 0], device=trainer.strategy.root_device)
        found = _gather(first).view(-1, 2).tolist()
        steps = [s for s, _ in found if s != NO_STEP]
        if steps:
            step = min(steps)
            raise NonFiniteStep(self._report(trainer, step, [kind if s == step else 0 for s, kind in found]))

    # ---------------------------------------------------------------- helpers
    def _every(self, trainer: L.Trainer) -> int:
        return self.log_every_n_steps or trainer.log_every_n_steps or 1

    def _flag(self, bit: int, bad: torch.Tensor) -> None:
        bits = bad.to(torch.long) * bit
        self._bad = bits if self._bad is None else self._bad | bits

    def _record(self, completed_step: int) -> None:
        """Keep `completed_step` as the first bad one if this step was bad (no host wait)."""
        now = torch.stack([torch.full_like(self._bad, completed_step), self._bad])
        if self._first_bad is None:
            self._first_bad = torch.stack([torch.full_like(self._bad, NO_STEP), torch.zeros_like(self._bad)])
        take = (self._bad != 0) & (self._first_bad[0] == NO_STEP)
        self._first_bad = torch.where(take, now, self._first_bad)

    def _skip_if_bad(self, trainer: L.Trainer, optimizer: torch.optim.Optimizer) -> None:
        bits = self._bad if self._bad is not None else torch.tensor(0, device=trainer.strategy.root_device)
        kinds = _gather(bits.reshape(1)).tolist()  # one host read per step: the price of skipping
        self._bad = None
        if not any(kinds):
            return
        step = trainer.global_step + 1
        if len(self.skipped) >= self.skip_nonfinite:
            raise NonFiniteStep(self._report(trainer, step, kinds))
        self.skipped.append(step)
        for group in optimizer.param_groups:  # no gradient: the optimizer leaves these alone
            for p in group["params"]:
                p.grad = None
        masters = _fused_masters(trainer, optimizer)
        if masters is not None:  # and nor does the fused step
            masters.discard_step_gradients()
        if trainer.is_global_zero:
            print(f"warning: skipped step {step}, {_what(kinds)} ({len(self.skipped)} of "
                  f"skip_nonfinite={self.skip_nonfinite})", flush=True)

    def _report(self, trainer: L.Trainer, step: int, kinds: list[int]) -> str:
        """The one line: the step, the ranks and what was bad there, the samples of those ranks
        whose loss was bad (of every bad rank if only gradients were)."""
        describe = getattr(trainer.datamodule, "describe_batch", None) if trainer.datamodule else None
        mine = [describe(e, b) for e, b in self._batches.get(step, [])] if describe else []
        mine = "; ".join(m for m in mine if m) or "unknown (the data module does not say)"
        everyone = [mine]
        if dist.is_available() and dist.is_initialized():
            everyone = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, mine)
        named = [r for r, k in enumerate(kinds) if k & LOSS] or [r for r, k in enumerate(kinds) if k]
        samples = " | ".join(f"rank {r}: {everyone[r]}" for r in named)
        budget = (f"{len(self.skipped)} step(s) skipped already under skip_nonfinite={self.skip_nonfinite}"
                  if self.skip_nonfinite else "skip such steps with skip_nonfinite=N")
        return (f"step {step} is not finite: {_what(kinds)}; its samples: {samples}; no checkpoint was "
                f"written after it (the last one holds the weights from before it); check those samples, "
                f"lower the learning rate, or {budget}")


LOSS, GRAD = 1, 2


def _what(kinds: list[int]) -> str:
    """'loss on rank 1, gradient norm on ranks 0, 1' from each rank's LOSS | GRAD bits."""
    parts = []
    for bit, name in ((LOSS, "loss"), (GRAD, "gradient norm")):
        ranks = [r for r, k in enumerate(kinds) if k & bit]
        if ranks:
            parts.append(f"{name} on rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}")
    return ", ".join(parts)


def _fused_masters(trainer: L.Trainer, optimizer: torch.optim.Optimizer):
    """The master weights whose fused step holds `optimizer`'s gradients as parts, or None."""
    masters = getattr(trainer.strategy, "master_weights", None)
    return masters if masters is not None and masters.holds_step_gradients(optimizer) else None


def _gather(value: torch.Tensor) -> torch.Tensor:
    """Every rank's `value` (1-d), concatenated; just `value` in one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value.cpu()
    out = [torch.empty_like(value) for _ in range(dist.get_world_size())]
    dist.all_gather(out, value.contiguous())
    return torch.cat(out).cpu()


__all__ = ["NonFiniteGuard", "NonFiniteStep"]
