"""Master weights for replicated parameters: compute on low-precision copies, optimize fp32.

Megatron-Core's main parameters, for plans whose parameters FSDP2 does not manage (FSDP2's own
MixedPrecisionPolicy does the same for sharded ones). The module's parameters stay the fp32
masters: the optimizer, its states, clipping, state dicts, checkpoints and exports see them and
nothing else, so a checkpoint holds the masters and resumes bit for bit. For the forward and
backward, every parameter slot of the module holds a persistent compute copy in bf16 instead;
after each backward a hook adds the copy's gradient into the master's fp32 gradient (on every
micro-batch, or once on the last one with `accumulate="compute"`), and after each optimizer step
the masters are copied into the compute copies: one cast per optimizer step, whatever the number
of micro-batches. The copies are the same tensor objects for the whole run, so compiled graphs
never see a new parameter.

With a fused step (`fused_optimizer` set: torch's Adam or AdamW over every master, chosen by
parallel/master_adamw.py `fuses`), the micro-batch that synchronizes leaves its gradient on the
compute copy and sets the earlier micro-batches' fp32 sum aside (`master.grad = None`), so the
optimizer's own step skips the masters (torch's Adam skips parameters without a gradient) while
schedulers and hooks still see a normal step; its post-step hook then updates each master, its
moments and its compute copy in one pass from those parts (`after_step`). Clipping and the
non-finite check read the parts (`step_gradients`, `clip_`); `materialize_grads` puts them back
into `master.grad` for any other reader, and that step then runs unfused.

Why by hand: torch has no master-weight wrapper for unsharded modules (FSDP2 over a one-rank mesh
does it per forward, with all-gather and reduce-scatter copies of every parameter, which cost
about 7% of a step on one GPU), and Megatron-Core's lives inside its own DDP.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import torch
from torch import nn
from torch.distributed.tensor import DTensor

ACCUMULATION_DTYPES = ("master", "compute")


class MasterWeights:
    """Compute copies (in `compute_dtype`) of every parameter of `module`, which stay the masters.

    `grad_ready(master)`, if given, is told when a master's gradient for this micro-batch is in
    place (the gradient reducer launches its bucket then). `accumulate`: "master" adds every
    micro-batch's gradient into the master's (fp32) gradient; "compute" lets the copies accumulate
    in the compute dtype and adds once, on the micro-batch that synchronizes.
    """

    def __init__(self, module: nn.Module, compute_dtype: torch.dtype = torch.bfloat16,
                 grad_ready: Optional[Callable[[nn.Parameter], None]] = None,
                 accumulate: str = "master") -> None:
        if accumulate not in ACCUMULATION_DTYPES:
            raise ValueError(f"accumulate={accumulate!r} is unknown: use one of {ACCUMULATION_DTYPES}")
        self.module = module
        self.compute_dtype = compute_dtype
        self.grad_ready = grad_ready
        self.accumulate = accumulate
        self.synced = True  # False on micro-batches that only accumulate
        self.casts = 0  # refreshes of the compute copies (one per optimizer step)
        self.fused_optimizer: Optional[torch.optim.Optimizer] = None  # steps taken by master_adamw
        self.multiplier: Optional[torch.Tensor] = None  # this step's clipping coefficient (fused)
        self._held: dict[int, torch.Tensor] = {}  # fused: earlier micro-batches' sums, set aside
        self._materialized = False  # this step's gradients were put back into master.grad
        self._slots: list[tuple[nn.Module, str, nn.Parameter, nn.Parameter]] = []
        copies: dict[int, nn.Parameter] = {}
        for owner in module.modules():
            for name, master in list(owner._parameters.items()):
                if master is None:
                    continue
                copy = copies.get(id(master))
                if copy is None:  # shared parameters (tied embeddings) share one copy
                    copy = nn.Parameter(master.detach().to(compute_dtype), requires_grad=master.requires_grad)
                    copies[id(master)] = copy
                    if master.requires_grad:
                        copy.register_post_accumulate_grad_hook(self._hook_for(master))
                self._slots.append((owner, name, master, copy))
        self._pairs = [(m, c) for m, c in {id(m): (m, c) for _, _, m, c in self._slots}.values()]
        self._master_by_copy = {id(c): m for m, c in self._pairs}
        self.compute_in_place()

    @property
    def master_params(self) -> list[nn.Parameter]:
        """Every master, once (shared parameters appear once)."""
        return [master for master, _ in self._pairs]

    def master_of(self, tensor: torch.Tensor) -> torch.Tensor:
        """The master of a compute copy (an optimizer built over the module's parameters holds
        the copies); any other tensor, itself."""
        return self._master_by_copy.get(id(tensor), tensor)

    # ------------------------------------------------------------------ which tensors the module holds
    def compute_in_place(self) -> None:
        """The module holds the compute copies (forward and backward)."""
        for owner, name, _, copy in self._slots:
            owner._parameters[name] = copy

    def masters_in_place(self) -> None:
        """The module holds the masters (optimizer set-up, state dicts, the end of the run)."""
        for owner, name, master, _ in self._slots:
            owner._parameters[name] = master

    @contextmanager
    def masters(self) -> Iterator[None]:
        """The masters in the module for the duration, the compute copies again after."""
        self.masters_in_place()
        try:
            yield
        finally:
            self.compute_in_place()

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def refresh(self) -> None:
        """Copy every master into its compute copy: the one cast of an optimizer step."""
        masters = [_local(m) for m, _ in self._pairs]
        copies = [_local(c) for _, c in self._pairs]
        torch._foreach_copy_(copies, masters)
        self.casts += 1

    def flush(self) -> None:
        """With accumulate="compute": add the copies' accumulated gradients into the masters'
        (called on the micro-batch that synchronizes, after its backward). With a fused step:
        set the masters' held sums aside instead, so that the optimizer's own step skips them."""
        if self.fused_optimizer is not None:
            for master, _ in self._pairs:
                if master.grad is not None:
                    self._held[id(master)] = master.grad
                    master.grad = None
            return
        for master, copy in self._pairs:
            if copy.grad is not None:
                self._add_to_master(master, copy)

    def _hook_for(self, master: nn.Parameter) -> Callable[[nn.Parameter], None]:
        def hook(copy: nn.Parameter) -> None:
            if self.accumulate == "compute" and not self.synced:
                return  # accumulates in the copy's own gradient until the last micro-batch
            if self.fused_optimizer is not None and self.synced:
                return  # the fused step reads it from the copy
            self._add_to_master(master, copy)

        return hook

    @torch.no_grad()
    def _add_to_master(self, master: nn.Parameter, copy: nn.Parameter) -> None:
        grad = copy.grad
        if isinstance(grad, DTensor) and grad.placements != copy.placements:
            grad = grad.redistribute(copy.device_mesh, copy.placements)  # e.g. Partial -> Replicate
        if master.grad is None:
            master.grad = grad.to(master.dtype)
        else:
            _local(master.grad).add_(_local(grad))
        copy.grad = None
        if self.grad_ready is not None:
            self.grad_ready(master)


    # ------------------------------------------------------------------ the fused step
    def _parts(self) -> dict[int, tuple]:
        """{id(master): (master, held sum or None, copy's gradient or None, copy)} for every
        master with a gradient this step, in the masters' order."""
        parts = {}
        for master, copy in self._pairs:
            held, grad = self._held.get(id(master)), copy.grad
            if held is not None or grad is not None:
                parts[id(master)] = (master, held, grad, copy)
        return parts

    def step_gradients(self) -> Iterator[tuple[nn.Parameter, Optional[torch.Tensor], Optional[torch.Tensor]]]:
        """This step's gradient parts not yet in `master.grad`: (master, held sum, copy's
        gradient), either may be None; a master's gradient is their sum. Nothing unfused."""
        for master, held, grad, _ in self._parts().values():
            yield master, held, grad

    def holds_step_gradients(self, optimizer: torch.optim.Optimizer) -> bool:
        """Whether `optimizer`'s gradients are held as parts rather than in `.grad` this step."""
        optimizer = _unwrapped(optimizer)
        return optimizer is self.fused_optimizer and optimizer is not None and not self._materialized

    @torch.no_grad()
    def clip_(self, max_norm: float, norm_type: float = 2.0, stage_group=None) -> torch.Tensor:
        """Clip this step's gradients by their total norm without touching them: the norm is
        taken over the parts (accumulated in the masters' dtype) and its coefficient becomes the
        fused update's gradient multiplier (scaling bf16 gradients in place would round).
        Returns the total norm, as `parallel.clipping.clip_grad_norm_` does."""
        from .clipping import clip_coefficient, total_of
        from .master_adamw import parts_norm

        parts = list(self._parts().values())
        dtype = self._pairs[0][0].dtype if self._pairs else torch.float32
        norm = parts_norm(parts, float(norm_type), dtype)
        total = total_of([norm] if norm is not None else [], float(norm_type), stage_group)
        coef = clip_coefficient(total, max_norm)
        self.multiplier = coef if self.multiplier is None else self.multiplier * coef
        return total

    @torch.no_grad()
    def materialize_grads(self) -> None:
        """Add this step's gradient parts into the masters' `.grad`, as the unfused path holds
        them (scaled by any clipping coefficient so far): for a reader that needs them there.
        The optimizer's own step then updates the masters, and the copies are refreshed after."""
        for master, held, grad, copy in self._parts().values():
            g = held
            if grad is not None:
                g = grad.to(master.dtype) if g is None else g.add_(grad)
            if self.multiplier is not None:
                g.mul_(self.multiplier.to(g.device))
            master.grad = g
            copy.grad = None
        self._held.clear()
        self.multiplier = None
        self._materialized = self.fused_optimizer is not None

    def discard_step_gradients(self) -> None:
        """Drop this step's gradient parts: the step leaves the masters and their states alone."""
        for master, copy in self._pairs:
            copy.grad = None
        self._held.clear()
        self.multiplier = None

    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer's post-step hook: the fused update of every master from its gradient
        parts (which also writes the compute copies), or else the copies' refresh."""
        if not self.holds_step_gradients(optimizer):
            if _unwrapped(optimizer) is self.fused_optimizer:
                self._materialized = False  # the next step is fused again
            self.refresh()
            return
        from .master_adamw import step_masters

        parts = self._parts()
        if any(m.grad is not None for m, _ in self._pairs):
            self.refresh()  # the optimizer stepped masters itself (materialize_grads)
        if parts:
            step_masters(optimizer, parts, self.multiplier)
        self.discard_step_gradients()
        self.casts += 1


def holding(masters: Optional[MasterWeights], optimizer: torch.optim.Optimizer) -> Optional[MasterWeights]:
    """`masters` when its fused step holds `optimizer`'s gradients as parts this step, else None:
    the check every reader of the step's gradients (clipping, the non-finite guard) makes first."""
    return masters if masters is not None and masters.holds_step_gradients(optimizer) else None


def _unwrapped(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside Lightning's (`_optimizer`) or Fabric's (`optimizer`) wrapper."""
    for attr in ("_optimizer", "optimizer"):
        optimizer = getattr(optimizer, attr, optimizer)
    return optimizer


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


__all__ = ["MasterWeights", "ACCUMULATION_DTYPES", "holding"]
