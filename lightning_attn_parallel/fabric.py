"""`Fabric(strategy="attn_hybrid")`: the same plans, checkpoints and metrics for a loop the user
writes.

Fabric's strategies are a class tree of their own, so this is the Fabric side of the glue; what
both front-ends do alike (process group, plan, meshes, `parallelize`, optimizers, batch layout)
is hybrid_base.py's, and the state dicts, clipping, gradient reducer and pretrained loading are
the same functions the Trainer's strategy calls. A loop::

    fabric = L.Fabric(strategy="attn_hybrid", devices=8, precision="bf16-mixed")
    fabric.launch()
    with fabric.init_module():
        model = lap.build_model(cfg)  # or, under init_module(empty_init=True), lap.fabric.pretrained_model(folder)
    model = fabric.setup_module(model)
    optimizer = fabric.setup_optimizers(torch.optim.AdamW(model.parameters()))
    for i, batch in enumerate(fabric.setup_dataloaders(loader)):   # sampled over dp ranks only
        with fabric.no_backward_sync(model, enabled=(i + 1) % accumulate != 0):
            loss, logged = lap.fabric.training_loss(fabric, model, batch)   # cp: lays the batch out
            fabric.backward(loss / accumulate)
        ...

Checkpoints are the Trainer's: a torch.distributed.checkpoint folder (or one file for a
replicated plan) whose model and optimizer states carry the names a `CausalLMModule` gives them,
so either front-end resumes the other's (`fabric.save` / `fabric.load`, `Trainer(ckpt_path=...)`).
"""
from __future__ import annotations

from contextlib import AbstractContextManager, ExitStack, nullcontext
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any, Optional, Union

import torch
from lightning.fabric.plugins.precision import Precision
from lightning.fabric.strategies import STRATEGY_REGISTRY, ParallelStrategy
from lightning.fabric.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from lightning.fabric.strategies.strategy import _BackwardSyncControl
from lightning.fabric.utilities.distributed import _sync_ddp_if_available
from torch import nn
from torch.optim import Optimizer

from .errors import UserError
from .hybrid_base import HybridParallelism
from .models.protocol import find_transformer
from .plan import ParallelPlan, as_plan
from .precision import with_master_weights

# What Lightning's Fabric allows with a model-parallel strategy, and 64-true for exactness tests.
# 16-mixed would need every rank to agree on inf checks (the Trainer swaps in a sharded scaler).
PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "16-true", "64-true")


class AttnHybridFabricStrategy(HybridParallelism, ParallelStrategy):
    """Attention-aware hybrid parallelism for Lightning Fabric: `Fabric(strategy="attn_hybrid")`.

    Args:
        plan: a ParallelPlan, a dict of its fields, "auto" or None (auto: the planner chooses,
            once `fabric.setup` shows it the model).
        timeout_s: how long any collective may wait for the other ranks.
        save_distributed_checkpoint: sharded checkpoints (a folder, loadable under another plan)
            when parameters are sharded; replicated plans always write one file.
        process_group_backend: "nccl" on CUDA and "gloo" on CPU unless given.
    """

    strategy_name = "attn_hybrid"
    launcher_class = _SubprocessScriptLauncher  # this front-end's launcher of processes

    def __init__(self, plan: Union[ParallelPlan, dict, str, None] = None, accelerator=None,
                 parallel_devices: Optional[list[torch.device]] = None, cluster_environment=None,
                 checkpoint_io=None, precision: Optional[Precision] = None,
                 process_group_backend: Optional[str] = None, timeout: Optional[timedelta] = None,
                 timeout_s: Optional[float] = None, save_distributed_checkpoint: bool = True) -> None:
        self._requested_plan = as_plan(plan)  # first: the precision setter reads it
        super().__init__(accelerator=accelerator, parallel_devices=parallel_devices,
                         cluster_environment=cluster_environment, checkpoint_io=checkpoint_io,
                         precision=precision)
        self._init_hybrid(process_group_backend, timeout, timeout_s)
        self._num_nodes = 1
        self._save_distributed_checkpoint = save_distributed_checkpoint
        self._backward_sync_control = _AccumulationControl(self)
        self._balanced: Optional[nn.Module] = None  # a MoE model whose router biases follow the loads

    @property
    def num_nodes(self) -> int:
        return self._num_nodes

    @property
    def precision(self) -> Precision:
        return self._precision if self._precision is not None else Precision()

    @precision.setter
    def precision(self, precision: Optional[Precision]) -> None:
        """Fabric's plugin for the run's precision; "bf16-mixed" becomes master weights when the
        plan asks for them (precision.py). Others than PRECISIONS are refused here, when
        `Fabric(...)` is built."""
        if precision is None:
            self._precision = None
            return
        name = str(getattr(precision, "precision", ""))
        if name not in PRECISIONS:
            raise UserError(f"Fabric(strategy='attn_hybrid', precision={name!r}) is not supported: use one of "
                            f"{', '.join(PRECISIONS)}")
        self._precision = with_master_weights(precision, self._requested_plan.mixed_precision)

    # ------------------------------------------------------------------ processes
    def setup_environment(self) -> None:
        self._check_requested_plan(None)
        if self._requested_plan.pp > 1:  # the Trainer's step runs the schedule; Fabric's loop is the user's
            from .plan import PlanError

            raise PlanError(f"ParallelPlan pp={self._requested_plan.pp} runs under the Trainer only "
                            "(Trainer(strategy=AttnHybridStrategy(plan=...))): set pp=1 with Fabric")
        super().setup_environment()
        self._join_world()
        if not self._requested_plan.is_auto:  # "auto" waits for the model (setup_module)
            self._resolve_plan(self._fabric_run(), None)

    def _fabric_run(self):
        return self._run_context(str(self.precision.precision))

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        if self.meshes is None:
            raise UserError("Fabric(strategy='attn_hybrid') with plan='auto' chooses its plan from the model: "
                            "call fabric.setup(model) before fabric.setup_dataloaders(...)")
        return super().distributed_sampler_kwargs

    # ------------------------------------------------------------------ model and optimizers
    def module_init_context(self, empty_init: Optional[bool] = None) -> AbstractContextManager:
        """empty_init=True: the model is built on the meta device; `setup_module` allocates each
        rank's slices once the plan is applied (and reads them from a pretrained folder)."""
        if not empty_init:
            return super().module_init_context(empty_init)
        stack = ExitStack()
        stack.enter_context(torch.device("meta"))
        stack.enter_context(self.precision.module_init_context())
        return stack

    def module_to_device(self, module: nn.Module) -> None:
        if not any(p.is_meta for p in module.parameters()):  # a meta model is allocated by setup_module
            module.to(self.root_device)

    def setup_module(self, module: nn.Module) -> nn.Module:
        from .pretrained import load_pretrained_into

        if self.meshes is None:
            self._resolve_plan(self._fabric_run(), getattr(find_transformer(module), "config", None))
        self._apply_plan(module, str(self.precision.precision), getattr(self.precision, "compute_dtype", None),
                         # each rank allocates and reads only the slices it holds
                         materialize=lambda: load_pretrained_into(module, self.root_device))
        self._balanced = _routers_to_balance(module, partial(self.all_reduce, reduce_op="sum"), self.world_size)
        return module

    def setup_module_and_optimizers(self, module: nn.Module, optimizers: list[Optimizer],
                                    scheduler: Optional[Any] = None) -> tuple[nn.Module, list[Optimizer], Any]:
        """`fabric.setup(model, optimizer)`: the optimizers, built over the parameters the model
        had, are pointed at the ones the plan left (by name), then set up."""
        from .parallel.optimizer_step import rebind_parameters
        from .parallel.state_dict import state_dict_name

        names = {id(p): state_dict_name(n) for n, p in module.named_parameters(remove_duplicate=False)}
        module = self.setup_module(module)
        with self.masters_in_place():
            now = {state_dict_name(n): p for n, p in module.named_parameters(remove_duplicate=False)}
        for optimizer in optimizers:
            rebind_parameters(optimizer, lambda p: now[names[id(p)]])
            self._prepare_fabric_optimizer(optimizer)
        return module, optimizers, scheduler

    def setup_optimizer(self, optimizer: Optimizer) -> Optimizer:
        """An optimizer built over the set-up model: under master weights it sees the compute
        copies, and is pointed at their masters."""
        if self.master_weights is not None:
            from .parallel.optimizer_step import rebind_parameters

            rebind_parameters(optimizer, self.master_weights.master_of)
        return self._prepare_fabric_optimizer(optimizer)

    def _prepare_fabric_optimizer(self, optimizer: Optimizer) -> Optimizer:
        """As the Trainer's (`_prepare_optimizer`), and, for MoE models that balance their
        routers without an auxiliary loss, the bias update after each step that CausalLMModule
        runs under the Trainer."""
        self._prepare_optimizer(optimizer)
        if self._balanced is not None:
            from .models.deepseek import update_moe_biases

            transformer = self._balanced
            optimizer.register_step_post_hook(lambda *_: update_moe_biases(transformer))
        return optimizer

    # ------------------------------------------------------------------ the step
    def backward(self, tensor: torch.Tensor, module: Optional[nn.Module], *args: Any, **kwargs: Any) -> None:
        """The data-parallel side around Fabric's backward (reducer buckets, master gradients,
        FSDP2 fix-ups). Overriding it makes Fabric refuse a `loss.backward()` outside
        `fabric.backward`, which would skip them."""
        if self.gradients is not None:
            self.gradients.before_backward()
        super().backward(tensor, module, *args, **kwargs)
        if self.gradients is not None:
            self.gradients.after_backward()

    def clip_gradients_value(self, module: nn.Module, optimizer: Optimizer, clip_val: Union[float, int]) -> None:
        """Per element: under master weights' fused step the gradients are first put in place."""
        from .parallel.master_weights import holding

        held = holding(self.master_weights, optimizer)
        if held is not None:
            held.materialize_grads()
        super().clip_gradients_value(module, optimizer, clip_val)

    def clip_gradients_norm(self, module: nn.Module, optimizer: Optimizer, max_norm: Union[float, int],
                            norm_type: Union[float, int] = 2.0, error_if_nonfinite: bool = True) -> torch.Tensor:
        """By the norm over every rank and mesh (parallel/clipping.py): tp, ep and FSDP2 shards."""
        from .parallel.clipping import clip_step_grad_norm_

        self.precision.unscale_gradients(optimizer)
        norm = clip_step_grad_norm_(self.precision.main_params(optimizer), optimizer, max_norm, norm_type,
                                    master_weights=self.master_weights)
        if error_if_nonfinite and not torch.isfinite(norm):
            raise RuntimeError(f"the total norm of order {norm_type} of the gradients is {norm.item()}: "
                               "pass error_if_nonfinite=False to clip anyway")
        return norm

    def all_reduce(self, tensor: torch.Tensor, group: Optional[Any] = None,
                   reduce_op: Optional[Union[torch.distributed.ReduceOp, str]] = "mean") -> torch.Tensor:
        if isinstance(tensor, torch.Tensor):
            return _sync_ddp_if_available(tensor, group, reduce_op=reduce_op)
        return tensor

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, path: Union[str, Path], state: dict[str, Any], storage_options: Optional[Any] = None,
                        filter: Optional[dict] = None) -> None:
        """The Trainer's format (lightning_checkpoints.py): `state`'s model and optimizers, and
        everything else in it (stateful objects by their state dicts)."""
        from .lightning_checkpoints import save_fabric_state

        if storage_options is not None or filter is not None:
            raise UserError("fabric.save under attn_hybrid takes no storage_options or filter: save the whole state")
        with self.masters_in_place():
            save_fabric_state(Path(self.broadcast(str(path))), state, self._save_distributed_checkpoint,
                              self.is_global_zero, self.barrier)

    def load_checkpoint(self, path: Union[str, Path], state: Optional[dict[str, Any]] = None, strict: bool = True,
                        weights_only: Optional[bool] = None) -> dict[str, Any]:
        """A checkpoint of either front-end, saved under any plan, into `state` in place; returns
        what the checkpoint holds beyond `state`'s keys."""
        from .lightning_checkpoints import load_fabric_state

        if not isinstance(state, dict):
            raise UserError("fabric.load under attn_hybrid needs the state to fill: "
                            "fabric.load(path, {'model': model, 'optimizer': optimizer, ...})")
        with self.masters_in_place():
            return load_fabric_state(Path(self.broadcast(str(path))), state, strict, self.root_device)


def _routers_to_balance(module: nn.Module, sum_over_ranks: Any, world_size: int) -> Optional[nn.Module]:
    """The protocol model of `module` if its MoE routers update their biases by the loads
    (auxiliary-loss-free balancing); their `load_sum` slot, unless expert parallelism filled it,
    sums the loads over every rank (as the ShareRoutingLoads callback does for the Trainer)."""
    from .callbacks.routing_loads import share_routing_loads

    transformer = find_transformer(module)
    cfg = getattr(transformer, "config", None)
    if cfg is None or not cfg.is_moe or cfg.bias_update_speed <= 0:
        return None
    if world_size > 1:
        share_routing_loads(transformer, sum_over_ranks)
    return transformer


class _AccumulationControl(_BackwardSyncControl):
    """`fabric.no_backward_sync(model, enabled=True)`: micro-batches that only accumulate send
    nothing (DataParallelGradients.accumulating, as the Trainer's accumulation)."""

    def __init__(self, strategy: AttnHybridFabricStrategy) -> None:
        self._strategy = strategy

    def no_backward_sync(self, module: nn.Module, enabled: bool) -> AbstractContextManager:
        gradients = self._strategy.gradients
        return gradients.accumulating() if enabled and gradients is not None else nullcontext()


# ---------------------------------------------------------------------------- the user's loop
def training_loss(fabric: Any, model: nn.Module, batch: Any, loss_chunk_tokens: Optional[int] = None,
                  fused: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to differentiate, mean token loss of the global step to log) of a set-up protocol
    model on a loader's batch: the strategy lays the batch out (context parallelism), and the
    head and loss run under the precision's forward context, as the Trainer's step does. The
    same objective as `CausalLMModule` (models/objective.py). The forward runs in the plan's
    step context (activation offload)."""
    from .models.objective import causal_lm_loss

    strategy = fabric.strategy
    if hasattr(strategy, "layout_batch"):
        batch = strategy.layout_batch(batch)
    with getattr(strategy, "step_context", nullcontext)(), fabric.autocast():  # e.g. activation offload
        return causal_lm_loss(model, batch, loss_chunk_tokens, fused)


def pretrained_model(path: Union[str, Path], max_seq_len: Optional[int] = None) -> nn.Module:
    """The project's model for the Hugging Face folder `path`, built on the meta device and
    marked to be loaded: `fabric.setup` under attn_hybrid allocates and reads each rank's slices
    only. Build it inside `fabric.init_module(empty_init=True)`."""
    from .models import build_model
    from .models.hf import Checkpoint

    cfg = Checkpoint(path).model_config(max_seq_len)
    with torch.device("meta"):
        model = build_model(cfg)
    model.pretrained = str(path)
    return model


def register() -> None:
    """Make `Fabric(strategy="attn_hybrid")` resolve (importing the package calls this)."""
    if AttnHybridFabricStrategy.strategy_name not in STRATEGY_REGISTRY:
        AttnHybridFabricStrategy.register_strategies(STRATEGY_REGISTRY)


register()  # importing the module is what makes the name resolve (registration.py)


__all__ = ["AttnHybridFabricStrategy", "PRECISIONS", "pretrained_model", "register", "training_loss"]
