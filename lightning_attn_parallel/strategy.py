"""AttnHybridStrategy: the Lightning glue that builds meshes and applies the parallelisms.

Everything model-specific lives in parallel/ (`parallel.apply.parallelize` applies a plan, in
order) and models/; state dicts are parallel/state_dict.py's, and workarounds for Lightning's own
behaviour are lightning_workarounds.py's. This file implements Lightning's Strategy hooks.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from datetime import timedelta
from typing import Any, Generator, Optional, Union

import torch
import torch.distributed as dist
from lightning.fabric.utilities.distributed import _sync_ddp_if_available
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import ParallelStrategy, StrategyRegistry
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor

from .callbacks.metrics import GRAD_NORM, TRAIN_LOSS, VAL_LOSS, host_scalar
from .callbacks.progress import loss_on_progress_bar
from .hybrid_base import HybridParallelism
from .lightning_checkpoints import SplitStateCheckpoints
from .lightning_workarounds import clip_across_ranks, pinned, share_inf_checks
from .plan import ParallelPlan, PlanError, as_plan
from .planning.auto import RunContext
from .precision import with_master_weights
from .pretrained import load_pretrained_into


class AttnHybridStrategy(SplitStateCheckpoints, HybridParallelism, ParallelStrategy):
    """Attention-aware hybrid parallelism for Lightning: `Trainer(strategy="attn_hybrid")`.

    Args:
        plan: a ParallelPlan, a dict of its fields, "auto" or None (auto: the planner chooses).
        timeout_s: how long any collective may wait for the other ranks (default
            faults.DEFAULT_TIMEOUT_S); past it the rank exits naming the ranks that did not arrive.
        save_distributed_checkpoint: sharded checkpoints (a folder, loadable under another plan)
            when parameters are sharded; replicated plans always write one file.
        async_checkpoint: write checkpoint folders in the background (async_checkpoint.py), any
            plan; training waits only for the copy to host memory.
        process_group_backend: "nccl" on CUDA and "gloo" on CPU unless given.
    """

    strategy_name = "attn_hybrid"
    launcher_class = _SubprocessScriptLauncher  # this front-end's launcher of processes
    # CausalLMModule(pretrained=...) builds its model on the meta device for this strategy
    materializes_meta_models = True

    def __init__(self, plan: Union[ParallelPlan, dict, str, None] = None,
                 accelerator=None, parallel_devices: Optional[list[torch.device]] = None,
                 cluster_environment=None, checkpoint_io=None, precision_plugin=None,
                 process_group_backend: Optional[str] = None,
                 timeout: Optional[timedelta] = None, timeout_s: Optional[float] = None,
                 save_distributed_checkpoint: bool = True, async_checkpoint: bool = False) -> None:
        self._requested_plan = as_plan(plan)  # first: the precision plugin's setter reads it
        super().__init__(accelerator=accelerator, parallel_devices=parallel_devices,
                         cluster_environment=cluster_environment, checkpoint_io=checkpoint_io,
                         precision_plugin=precision_plugin)
        self._init_hybrid(process_group_backend, timeout, timeout_s)
        self.num_nodes = 1
        self._save_distributed_checkpoint = save_distributed_checkpoint
        self._async_checkpoint = async_checkpoint
        if self._requested_plan.pp > 1 and not save_distributed_checkpoint:
            raise PlanError(f"ParallelPlan pp={self._requested_plan.pp} saves checkpoint folders (each stage "
                            "writes its own blocks): set save_distributed_checkpoint=true")
        self._parallelized = False
        self._state_loaded_in_place = False

    # ------------------------------------------------------------------ processes
    @property
    def precision_plugin(self) -> Precision:
        return self._precision_plugin if self._precision_plugin is not None else Precision()

    @precision_plugin.setter
    def precision_plugin(self, plugin: Optional[Precision]) -> None:
        """Lightning's plugin for the Trainer's precision; "bf16-mixed" becomes master weights
        when the plan asks for them (precision.py)."""
        self._precision_plugin = plugin if plugin is None else with_master_weights(
            plugin, self._requested_plan.mixed_precision)

    def setup_environment(self) -> None:
        self._check_requested_plan(self._model_config)
        super().setup_environment()
        self._join_world()
        self._resolve_plan(self._run_context(), self._model_config)
        if self.lightning_module is not None:
            self.lightning_module._device_mesh = self.meshes.dense

    @property
    def _model_config(self):
        return getattr(self.lightning_module, "model_config", None)

    def _run_context(self) -> RunContext:
        """The coming run as the planner sees it (the data module's batch and sequence sizes)."""
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        datamodule = getattr(trainer, "datamodule", None)
        return super()._run_context(str(self.precision_plugin.precision), getattr(datamodule, "micro_batch_size", 1),
                                    getattr(datamodule, "seq_len", None),
                                    getattr(trainer, "accumulate_grad_batches", 1))

    # ------------------------------------------------------------------ model set-up
    def setup(self, trainer: Trainer) -> None:
        assert self.model is not None and self.accelerator is not None
        self._state_loaded_in_place = False
        self.accelerator.setup(trainer)
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        if not self._parallelized:
            self._parallelize(self.lightning_module)
            self._parallelized = True
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self._reset_optimizers_and_schedulers()
            with self.masters_in_place():  # the optimizer updates the master weights
                self.setup_optimizers(trainer)
            for optimizer in self.optimizers:
                self._prepare_optimizer(optimizer)
        self.setup_precision_plugin()
        share_inf_checks(self.precision_plugin, self.root_device)
        clip_across_ranks(self.precision_plugin, lambda norm: self.lightning_module.log(GRAD_NORM, norm),
                          stage_group=self.meshes.group("pp") if self.pipeline is not None else None,
                          master_weights=self.master_weights)
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)

    def model_to_device(self) -> None:
        assert self.model is not None
        if not any(p.is_meta for p in self.model.parameters()):  # a meta model is allocated by _parallelize
            self.model.to(self.root_device)

    def _parallelize(self, module: LightningModule) -> None:
        self._apply_plan(module, str(self.precision_plugin.precision),
                         getattr(self.precision_plugin, "compute_dtype", None),
                         # each rank allocates and reads only the slices it holds
                         materialize=lambda: load_pretrained_into(module, self.root_device))

    # ------------------------------------------------------------------ training step
    def batch_to_device(self, batch: Any, device: Optional[torch.device] = None, dataloader_idx: int = 0) -> Any:
        device = device or self.root_device
        return super().batch_to_device(pinned(batch, device), device, dataloader_idx)

    def _layout_batch(self, args: tuple, log: bool) -> tuple:
        """Context parallelism: this rank's share of the batch (split along the sequence over a
        degree decided by its longest document, or its length), handed to the module as a
        StepBatch; the callbacks read the same StepBatch as `step_batch`."""
        if self.context_parallel is None or not args:
            return args
        self.layout_batch(args[0])
        if log:
            batcher = self.context_parallel
            self.lightning_module.log_dict({
                "parallel/context_parallel_active": host_scalar(batcher.last_mode == "context"),
                "parallel/cp_degree": host_scalar(batcher.last_degree)}, on_step=True)
        return (self.step_batch,) + tuple(args[1:])

    def training_step(self, *args: Any, **kwargs: Any):
        if self.pipeline is not None:  # the schedule runs forward and backward (parallel/pipeline.py)
            args = self._layout_batch(args, log=True)  # context parallelism: this rank's shard
            # the step context (activation offload) spans the schedule's forwards and backwards
            with self.step_context(), self.precision_plugin.train_step_context():
                trainer = self.lightning_module.trainer
                loss = self.pipeline.training_step(args[0], self.gradients,
                                                   zero_grad=args[1] % trainer.accumulate_grad_batches == 0,
                                                   accumulate=trainer.accumulate_grad_batches)
            # logged: the token loss, as CausalLMModule logs it; returned: what one process
            # differentiates, balance losses included
            self.lightning_module.log(TRAIN_LOSS, loss, prog_bar=loss_on_progress_bar(trainer))
            return loss + self.pipeline.aux_loss.to(loss)
        with self.step_context():  # the memory levers applied per step (activation offload)
            return super().training_step(*self._layout_batch(args, log=True), **kwargs)

    def validation_step(self, *args: Any, **kwargs: Any):
        if self.pipeline is not None:
            with self.precision_plugin.val_step_context():
                loss = self.pipeline.validation_step(self._layout_batch(args, log=False)[0])
            self.lightning_module.log(VAL_LOSS, loss, prog_bar=True, sync_dist=True)
            return None
        return super().validation_step(*self._layout_batch(args, log=False), **kwargs)

    def backward(self, closure_loss: Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> Tensor:
        if self.pipeline is None:
            return super().backward(closure_loss, optimizer, *args, **kwargs)
        # the schedule ran every micro-batch's backward in training_step: only the hooks remain
        self.pipeline.restore_gradients()
        closure_loss = self.precision_plugin.pre_backward(closure_loss, self.lightning_module)
        closure_loss = self.precision_plugin.post_backward(closure_loss, self.lightning_module)
        self.post_backward(closure_loss)
        return closure_loss

    def pre_backward(self, closure_loss: Tensor) -> None:
        if self.gradients is not None:
            self.gradients.before_backward()

    def post_backward(self, closure_loss: Tensor) -> None:
        if self.gradients is not None:
            self.gradients.after_backward()

    @contextmanager
    def block_backward_sync(self) -> Generator[None, None, None]:
        """Micro-batches that only accumulate: see DataParallelGradients.accumulating."""
        with self.gradients.accumulating() if self.gradients is not None else nullcontext():
            yield

    # ------------------------------------------------------------------ collectives
    def reduce(self, tensor: Union[Tensor, Any], group: Optional[Any] = None,
               reduce_op: Optional[Union[dist.ReduceOp, str]] = "mean") -> Tensor:
        if isinstance(tensor, Tensor):
            return _sync_ddp_if_available(tensor, group, reduce_op=reduce_op)
        return tensor

    def teardown(self) -> None:
        self.finish_checkpoints()  # the save in flight completes before the process group goes
        super().teardown()


def register() -> None:
    """Make `Trainer(strategy="attn_hybrid")` resolve (importing the package calls this)."""
    if AttnHybridStrategy.strategy_name not in StrategyRegistry:
        AttnHybridStrategy.register_strategies(StrategyRegistry)


register()  # importing the module is what makes the name resolve (registration.py)
