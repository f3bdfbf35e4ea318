"""AttnHybridStrategy: the Lightning glue that builds meshes and applies the parallelisms.

Everything model-specific lives in parallel/ (`parallel.apply.parallelize` applies a plan, in
order) and models/; state dicts are parallel/state_dict.py's, and workarounds for Lightning's own
behaviour are lightning_workarounds.py's. This file implements Lightning's Strategy hooks.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from datetime import timedelta
from typing import Any, Callable, ContextManager, Generator, Optional, Union

import torch
import torch.distributed as dist
from lightning.fabric.utilities.distributed import _distributed_is_initialized, _sync_ddp_if_available
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import ParallelStrategy, StrategyRegistry
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only
from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only
from torch import Tensor

from .faults import Heartbeat, resolve_timeout
from .hardware import cluster_for_plan
from .callbacks.metrics import GRAD_NORM, host_scalar
from .lightning_checkpoints import SplitStateCheckpoints
from .lightning_workarounds import clip_across_ranks, pinned, share_inf_checks
from .mesh import ParallelMeshes, build_meshes
from .models.protocol import find_transformer
from .parallel.data_parallel import DataParallelGradients
from .parallel.optimizer_step import step_over_mixed_tensors
from .parallel.gradient_reducer import GradientReducer
from .plan import ParallelPlan, as_plan
from .planning.auto import RunContext, resolve_plan
from .precision import with_master_weights
from .processes import start_process_group
from .pretrained import load_pretrained_into
from .step import StepBatch


class AttnHybridStrategy(SplitStateCheckpoints, ParallelStrategy):
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
        self.plan: Optional[ParallelPlan] = None
        self.meshes: Optional[ParallelMeshes] = None
        self.gradients: Optional[DataParallelGradients] = None  # the backward's data-parallel side
        self._step_context: Callable[[], ContextManager] = nullcontext
        self.context_parallel = None
        self.step_batch: Optional[StepBatch] = None  # this rank's share of the current micro-batch
        self.num_nodes = 1
        self._process_group_backend = process_group_backend
        self._timeout = resolve_timeout(timeout_s, timeout)
        self._heartbeat: Optional[Heartbeat] = None
        self._save_distributed_checkpoint = save_distributed_checkpoint
        self._async_checkpoint = async_checkpoint
        self._parallelized = False
        self._state_loaded_in_place = False

    # ------------------------------------------------------------------ processes
    @property
    def gradient_reducer(self) -> Optional[GradientReducer]:
        """The replicated plans' bucketed reducer (None under FSDP2 or before setup); the
        callbacks read its communication timings."""
        return self.gradients.reducer if self.gradients is not None else None

    @property
    def master_weights(self):
        """The replicated plans' master weights (None without them, or before setup)."""
        return self.gradients.masters if self.gradients is not None else None

    @contextmanager
    def masters_in_place(self) -> Generator[None, None, None]:
        """The module holds the fp32 masters for the duration (state dicts, the optimizer's
        set-up); then its compute copies again, refreshed from the masters."""
        if self.master_weights is None:
            yield
            return
        with self.master_weights.masters():
            yield
        self.master_weights.refresh()

    @property
    def precision_plugin(self) -> Precision:
        return self._precision_plugin if self._precision_plugin is not None else Precision()

    @precision_plugin.setter
    def precision_plugin(self, plugin: Optional[Precision]) -> None:
        """Lightning's plugin for the Trainer's precision; "bf16-mixed" becomes master weights
        when the plan asks for them (precision.py)."""
        self._precision_plugin = plugin if plugin is None else with_master_weights(
            plugin, self._requested_plan.mixed_precision)

    @property
    def root_device(self) -> torch.device:
        assert self.parallel_devices is not None
        return self.parallel_devices[self.local_rank]

    @property
    def num_processes(self) -> int:
        return len(self.parallel_devices) if self.parallel_devices is not None else 0

    @property
    def ranks_per_node(self) -> int:
        declared = self._requested_plan.ranks_per_node
        return declared or max(self.num_processes, 1)

    @property
    def is_distributed(self) -> bool:
        return True

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        """DP ranks split the data; TP and CP ranks of one DP rank see the same samples."""
        if self.meshes is None:
            return {"num_replicas": self.world_size, "rank": self.global_rank}
        return {"num_replicas": self.meshes.dp_size, "rank": self.meshes.dp_rank}

    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        if not self.cluster_environment.creates_processes_externally:
            self._launcher = _SubprocessScriptLauncher(self.cluster_environment, self.num_processes,
                                                       self.num_nodes)

    def setup_environment(self) -> None:
        from .parallel.apply import check_plan

        check_plan(self._requested_plan, self.num_nodes * self.num_processes, self._model_config,
                   self.root_device)
        super().setup_environment()
        reset_seed()
        self.set_world_ranks()
        self._process_group_backend, heartbeat = start_process_group(
            self.cluster_environment, self.root_device, self._process_group_backend, self._timeout)
        self._heartbeat = self._heartbeat or heartbeat
        self.plan, notes = resolve_plan(self._requested_plan, self._run_context(), self._model_config)
        for note in notes:
            rank_zero_info(note)
        self.meshes = build_meshes(self.plan, self.root_device.type, self.ranks_per_node)
        if self.lightning_module is not None:
            self.lightning_module._device_mesh = self.meshes.dense

    @property
    def _model_config(self):
        return getattr(self.lightning_module, "model_config", None)

    def _run_context(self) -> RunContext:
        """The coming run as the planner sees it (the data module's batch and sequence sizes)."""
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        datamodule = getattr(trainer, "datamodule", None)
        return RunContext(self.world_size, self.root_device.type, self.num_nodes, self.num_processes,
                          str(self.precision_plugin.precision), getattr(datamodule, "micro_batch_size", 1),
                          getattr(datamodule, "seq_len", None),
                          getattr(trainer, "accumulate_grad_batches", 1))

    def set_world_ranks(self) -> None:
        if self.cluster_environment is not None:
            self.cluster_environment.set_global_rank(self.node_rank * self.num_processes + self.local_rank)
            self.cluster_environment.set_world_size(self.num_nodes * self.num_processes)
        rank_zero_only.rank = utils_rank_zero_only.rank = self.global_rank

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
                step_over_mixed_tensors(optimizer)
                if self.master_weights is not None:  # one cast into the compute copies per step
                    optimizer.register_step_post_hook(lambda *_: self.master_weights.refresh())
        self.setup_precision_plugin()
        share_inf_checks(self.precision_plugin, self.root_device)
        clip_across_ranks(self.precision_plugin, lambda norm: self.lightning_module.log(GRAD_NORM, norm))
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)

    def model_to_device(self) -> None:
        assert self.model is not None
        if not any(p.is_meta for p in self.model.parameters()):  # a meta model is allocated by _parallelize
            self.model.to(self.root_device)

    def _parallelize(self, module: LightningModule) -> None:
        from .parallel.apply import parallelize

        assert self.plan is not None and self.meshes is not None
        result = parallelize(module, find_transformer(module), self.plan, self.meshes,
                             precision=str(self.precision_plugin.precision),
                             cluster=cluster_for_plan(self.plan, max(1, self.world_size // self.ranks_per_node),
                                                      self.ranks_per_node),
                             # each rank allocates and reads only the slices it holds
                             materialize=lambda: load_pretrained_into(module, self.root_device),
                             compute_dtype=getattr(self.precision_plugin, "compute_dtype", None))
        self.gradients = result.gradients
        self._step_context = result.step_context
        self.context_parallel = result.context_parallel
        if self.global_rank == 0:
            print(result.table, flush=True)
        from .models.attention_backend import describe_sdpa_backends

        rank_zero_info(describe_sdpa_backends(self.root_device.type))  # chosen once, here

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
        self.step_batch = self.context_parallel.prepare_batch(args[0])
        if log:
            batcher = self.context_parallel
            self.lightning_module.log_dict({
                "parallel/context_parallel_active": host_scalar(batcher.last_mode == "context"),
                "parallel/cp_degree": host_scalar(batcher.last_degree)}, on_step=True)
        return (self.step_batch,) + tuple(args[1:])

    def training_step(self, *args: Any, **kwargs: Any):
        with self._step_context():  # the memory levers applied per step (activation offload)
            return super().training_step(*self._layout_batch(args, log=True), **kwargs)

    def validation_step(self, *args: Any, **kwargs: Any):
        return super().validation_step(*self._layout_batch(args, log=False), **kwargs)

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
    def barrier(self, name: Optional[str] = None) -> None:
        if not _distributed_is_initialized():
            return
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[self.root_device.index])
        else:
            dist.barrier()

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if not _distributed_is_initialized():
            return obj
        holder = [obj]
        dist.broadcast_object_list(holder, src)
        return holder[0]

    def reduce(self, tensor: Union[Tensor, Any], group: Optional[Any] = None,
               reduce_op: Optional[Union[dist.ReduceOp, str]] = "mean") -> Tensor:
        if isinstance(tensor, Tensor):
            return _sync_ddp_if_available(tensor, group, reduce_op=reduce_op)
        return tensor

    def on_exception(self, exception: BaseException) -> None:
        """A failed collective becomes a PeerFailure naming the ranks that did not arrive."""
        heartbeat, self._heartbeat = self._heartbeat, None
        if heartbeat is None:
            return
        failure = heartbeat.explain(exception)
        heartbeat.stop(clean=False)  # this rank failed: the others must not wait for it
        if failure is not None:
            raise failure from exception

    def teardown(self) -> None:
        self.finish_checkpoints()  # before the process group goes
        if self.master_weights is not None:
            self.master_weights.masters_in_place()  # the module ends holding the masters
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None
        if self.gradient_reducer is not None:
            self.gradient_reducer.remove_hooks()
        super().teardown()

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(cls.strategy_name, cls,
                                   description="Attention-aware hybrid data/tensor/context/expert parallelism")


def register() -> None:
    """Make `Trainer(strategy="attn_hybrid")` resolve (importing the package calls this)."""
    if AttnHybridStrategy.strategy_name not in StrategyRegistry:
        AttnHybridStrategy.register_strategies(StrategyRegistry)
