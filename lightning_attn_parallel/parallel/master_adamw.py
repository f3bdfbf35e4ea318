"""One AdamW (or Adam) step of a master weight from its gradient parts, writing its compute copy.

Under master weights an optimizer step used to move, per parameter, 40 bytes: the backward hook
cast the bf16 gradient into a new fp32 `master.grad` (2 B read, 4 B write), torch's AdamW read
p, g, m, v and wrote p, m, v (28 B), and the refresh read the fp32 master and wrote the bf16 copy
(6 B). `adam_update_` does it in one pass over 28 B: it reads the bf16 gradient straight from the
compute copy (and the fp32 sum of earlier micro-batches, if any), updates p, m, v and writes the
compute copy. On CUDA it is compiled into a single element-wise kernel per tensor, launched in
groups of tensors from one compiled call.

The arithmetic is torch's `_single_tensor_adam` in the same order, and the optimizer's state
stays torch's (`{"step", "exp_avg", "exp_avg_sq"}`, `step` placed as torch places it for the
group's `fused`/`capturable` setting), so a checkpoint written by either path resumes on the
other. `fuses` decides in one place whether an optimizer's step can be taken this way.
"""
from __future__ import annotations

import warnings
from typing import Iterable, Optional, Sequence, Union

import torch
import torch._dynamo.config as dynamo_config
import torch.fx.experimental._config as fx_config
from torch.distributed.tensor import DTensor
from torch.optim.optimizer import _get_scalar_dtype

Scalar = Union[float, torch.Tensor]


@torch.no_grad()
def adam_update_(param: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                 held: Optional[torch.Tensor], grad: Optional[torch.Tensor],
                 multiplier: Optional[torch.Tensor], copy: Optional[torch.Tensor], lr: Scalar,
                 beta1: float, beta2: float, eps: float, weight_decay: float, decoupled: bool,
                 bias_correction1: Scalar, bias_correction2_sqrt: Scalar) -> None:
    """One Adam(W) step of `param` in place, with its moments, then its compute copy `copy`.

    The gradient is `held` (earlier micro-batches' sum, in the master's dtype) plus `grad` (the
    compute copy's, in its dtype), either may be None, times `multiplier` (the clipping
    coefficient; None for 1). `decoupled`: AdamW's weight decay, else Adam's L2 term. `lr` and
    the bias corrections are Python floats (eager, exactly torch's scalars) or 0-dim tensors on
    `param`'s device (compiled: a new learning rate is a new value, not a new graph)."""
    if held is None:
        g = grad.to(param.dtype)
    elif grad is None:
        g = held
    else:
        g = held.add(grad)  # as `master.grad.add_(copy.grad)` promotes
    if multiplier is not None:
        g = g.mul(multiplier)
    if weight_decay != 0:
        if decoupled:
            param.mul_(1 - lr * weight_decay)
        else:
            g = g.add(param, alpha=weight_decay)
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    step_size = lr / bias_correction1
    if isinstance(step_size, torch.Tensor):
        param.add_((exp_avg / denom) * step_size.neg())  # addcdiv_'s value takes a Number only
    else:
        param.addcdiv_(exp_avg, denom, value=-step_size)
    if copy is not None:
        copy.copy_(param)


@torch.no_grad()
def adam_update_group_(params: Sequence[torch.Tensor], exp_avgs: Sequence[torch.Tensor],
                       exp_avg_sqs: Sequence[torch.Tensor], helds: Sequence[Optional[torch.Tensor]],
                       grads: Sequence[Optional[torch.Tensor]], multiplier: Optional[torch.Tensor],
                       copies: Sequence[Optional[torch.Tensor]], lrs: Sequence[Scalar], beta1: float,
                       beta2: float, eps: float, weight_decay: float, decoupled: bool,
                       bias_corrections1: Sequence[Scalar], bias_corrections2_sqrt: Sequence[Scalar]) -> None:
    """`adam_update_` over parallel lists of tensors: compiled, one call launches every tensor's
    kernel (per tensor, the host's cost of a compiled call, about 0.1 ms, exceeded a small
    tensor's update on the GPU)."""
    for p, m, v, h, g, c, lr, bc1, bc2 in zip(params, exp_avgs, exp_avg_sqs, helds, grads, copies, lrs,
                                              bias_corrections1, bias_corrections2_sqrt):
        adam_update_(p, m, v, h, g, multiplier, c, lr, beta1, beta2, eps, weight_decay, decoupled, bc1, bc2)


# The tensors of one compiled call: the same shapes, dtypes and present parts, in groups of
# these lengths only. Sizes are symbols without duck shaping's equalities, so one graph serves
# every group of one length, rank, dtypes and set of parts: a Llama's 201 tensors take 27 calls
# and 6 graphs (as many more where earlier micro-batches' sums are held).
GROUP_LENGTHS = (16, 4, 1)


def groups(items: Sequence[tuple[Optional[torch.Tensor], ...]]) -> list[list[int]]:
    """Indices of `items` (tuples of tensors or None) batched for `adam_update_group_`: items
    of one signature (each tensor's shape and dtype, or None), in order, split into lengths
    from GROUP_LENGTHS, largest first."""
    by_signature: dict[tuple, list[int]] = {}
    for i, item in enumerate(items):
        key = tuple(None if t is None else (tuple(t.shape), t.dtype, t.device) for t in item)
        by_signature.setdefault(key, []).append(i)
    batches = []
    for indices in by_signature.values():
        start = 0
        while start < len(indices):
            length = next(n for n in GROUP_LENGTHS if n <= len(indices) - start)
            batches.append(indices[start:start + length])
            start += length
    return batches


# Compiled rather than a hand-written Triton kernel: the update is purely element-wise, and
# inductor already emits exactly this pointwise kernel per tensor (one load of each input, one
# store of p, m, v and the copy), with none of a hand-written kernel's dtype and layout cases to
# maintain.
_compiled = None
_BACKEND = "inductor"
_MAX_GRAPHS = 64  # the graphs a model's groups may take, above dynamo's default of 8 per function


def _compiles(device: torch.device) -> bool:
    return device.type == "cuda"


def _compile(update):
    """`update` compiled with symbolic sizes (dynamic=True) and no duck shaping: sizes that
    happen to be equal (a square matrix, two tensors of one size) are not made one symbol, so a
    graph does not depend on which sizes coincide."""
    compiled = torch.compile(update, dynamic=True, backend=_BACKEND)

    def call(*args) -> None:
        with fx_config.patch(use_duck_shape=False), dynamo_config.patch(recompile_limit=_MAX_GRAPHS):
            compiled(*args)

    return call


def _update_for(device: torch.device):
    global _compiled
    if not _compiles(device):
        return adam_update_group_
    if _compiled is None:
        _compiled = _compiled_or_eager(_compile(adam_update_group_))
    return _compiled


def _compiled_or_eager(compiled):
    """The compiled update, or, if compiling it fails on this machine (a compile error is raised
    before any tensor is written), the same update run eagerly from then on, with one warning:
    the step stays exact, only slower."""
    def update(*args) -> None:
        global _compiled
        nonlocal compiled
        try:
            compiled(*args)
        except Exception as err:  # noqa: BLE001 - any compile failure; the eager path is the reference
            warnings.warn(f"the fused master step could not be compiled ({type(err).__name__}: "
                          f"{str(err).splitlines()[0][:200]}); running it eagerly")
            # later steps look the update up again; this step's remaining groups already hold
            # this wrapper, which must not try to compile once per group
            _compiled = compiled = adam_update_group_
            adam_update_group_(*args)

    return update


# ---------------------------------------------------------------------------- when it applies
def fuses(optimizer: torch.optim.Optimizer, masters, reducer=None, enabled: bool = True) -> bool:
    """Whether `optimizer`'s steps can be taken by `adam_update_` from `masters`' gradient parts:
    the plan allows it; the optimizer is exactly torch's Adam or AdamW without amsgrad, maximize,
    differentiable or tensor hyperparameters; it holds every trainable master of `masters` and
    nothing else, all plain tensors; and no reducer bucket holds one of them (a bucket needs the
    master's gradient in place, to reduce it)."""
    if not enabled or masters is None or type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
        return False
    params = []
    for group in optimizer.param_groups:
        if group.get("amsgrad") or group.get("maximize") or group.get("differentiable"):
            return False
        if any(isinstance(v, torch.Tensor) for v in (group["lr"], *group["betas"], group["weight_decay"])):
            return False
        params += group["params"]
    trainable = [m for m in masters.master_params if m.requires_grad]
    if len(params) != len(trainable) or {id(p) for p in params} != {id(m) for m in trainable}:
        return False
    if any(isinstance(p, DTensor) or not p.is_contiguous() for p in params):
        return False
    return reducer is None or not any(reducer.holds(p) for p in params)


# ---------------------------------------------------------------------------- the optimizer's step
@torch.no_grad()
def step_masters(optimizer: torch.optim.Optimizer, parts: dict, multiplier: Optional[torch.Tensor]) -> None:
    """Adam(W) over every master in `parts` ({id(master): (master, held, grad, copy)}), with the
    hyperparameters `optimizer.param_groups` hold now (the scheduler's learning rate), updating
    `optimizer.state` exactly as torch's step would."""
    for group in optimizer.param_groups:
        todo = [parts[id(p)] for p in group["params"] if id(p) in parts]
        if not todo:
            continue
        states = [_state(optimizer, group, master) for master, *_ in todo]
        steps = [state["step"] for state in states]
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        decoupled = type(optimizer) is torch.optim.AdamW or bool(group.get("decoupled_weight_decay"))
        device = todo[0][0].device
        if group["fused"] or group["capturable"]:
            # the steps live beside the parameters: so do the bias corrections (no host sync)
            torch._foreach_add_(steps, 1)
            dtype = todo[0][0].dtype  # in the masters' precision (float32 steps, float64 masters)
            exponents = steps if steps[0].dtype == dtype else [s.to(dtype) for s in steps]
            bc1 = torch._foreach_pow(beta1, exponents)
            torch._foreach_neg_(bc1)
            torch._foreach_add_(bc1, 1)
            bc2 = torch._foreach_pow(beta2, exponents)
            torch._foreach_neg_(bc2)
            torch._foreach_add_(bc2, 1)
            torch._foreach_sqrt_(bc2)
            lrs = [_on(device, dtype, lr)] * len(todo)  # a fill, not a host-to-device copy
        else:  # torch's own arithmetic on the host (the steps live on the CPU)
            for step in steps:
                step += 1
            values = [step.item() for step in steps]
            bc1 = [1 - beta1 ** s for s in values]
            bc2 = [(1 - beta2 ** s) ** 0.5 for s in values]
            lrs = [lr] * len(todo)
            if device.type != "cpu":  # 0-dim device tensors, one per distinct value
                dtype, made = todo[0][0].dtype, {}
                for v in (lr, *bc1, *bc2):
                    if v not in made:
                        made[v] = _on(device, dtype, v)
                lrs, bc1, bc2 = ([made[v] for v in vs] for vs in (lrs, bc1, bc2))
        update = _update_for(device)
        mult = multiplier
        if mult is not None:
            mult = mult.to(device=device, dtype=todo[0][0].dtype)
        elif device.type != "cpu":
            mult = _on(device, todo[0][0].dtype, 1.0)  # one graph, clipped or not
        tensors = [_detached(master, state["exp_avg"], state["exp_avg_sq"], held, grad, copy)
                   for (master, held, grad, copy), state in zip(todo, states)]
        for batch in groups(tensors):
            p, m, v, h, g, c = ([tensors[i][k] for i in batch] for k in range(6))
            update(p, m, v, h, g, mult, c, [lrs[i] for i in batch], beta1, beta2, group["eps"],
                   group["weight_decay"], decoupled, [bc1[i] for i in batch], [bc2[i] for i in batch])


def _on(device: torch.device, dtype: torch.dtype, value: float) -> torch.Tensor:
    return torch.full((), value, dtype=dtype, device=device)


def _state(optimizer: torch.optim.Optimizer, group: dict, p: torch.Tensor) -> dict:
    """`optimizer.state[p]`, created as torch's Adam creates it on a parameter's first step."""
    state = optimizer.state[p]
    if len(state) == 0:
        state["step"] = (torch.zeros((), dtype=_get_scalar_dtype(is_fused=group["fused"]), device=p.device)
                         if group["capturable"] or group["fused"]
                         else torch.tensor(0.0, dtype=_get_scalar_dtype(), device="cpu"))
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return state


def _detached(*tensors: Optional[torch.Tensor]) -> list[Optional[torch.Tensor]]:
    """The tensors without autograd, as they are: not flattened, since a view's base shape would
    enter the compiled graph's guards."""
    return [t.detach() if t is not None else None for t in tensors]


# ---------------------------------------------------------------------------- gradients' norm
@torch.no_grad()
def parts_norm(parts: Iterable[tuple], norm_type: float, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """The `norm_type` norm of every master's gradient `held + grad` (parts as in step_masters),
    accumulated in `dtype` (the masters': bf16 -> fp32 is exact), without writing the sums."""
    singles, summed = [], []
    for _, held, grad, _ in parts:
        if held is not None and grad is not None:
            summed.append(torch.linalg.vector_norm(held.add(grad), norm_type, dtype=dtype))
        elif held is not None or grad is not None:
            singles.append(held if held is not None else grad)
    norms = list(torch._foreach_norm(singles, norm_type, dtype=dtype)) if singles else []
    norms += summed
    if not norms:
        return None
    return torch.linalg.vector_norm(torch.stack(norms), norm_type)


__all__ = ["adam_update_", "adam_update_group_", "groups", "fuses", "step_masters", "parts_norm"]
