"""AttnHybridStrategy: the Lightning glue that builds meshes and applies the parallelisms.

Everything model-specific lives in parallel/ (`parallel.apply.parallelize` applies a plan, in
order) and models/; state dicts are parallel/state_dict.py's, and workarounds for Lightning's own
behaviour are lightning_workarounds.py's. This file implements Lightning's Strategy hooks.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, ContextManager, Generator, Mapping, Optional, Union

import torch
import torch.distributed as dist
from lightning.fabric.utilities.distributed import (
    _distributed_is_initialized,
    _get_default_process_group_backend_for_device,
    _init_dist_connection,
    _sync_ddp_if_available,
)
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies import ParallelStrategy, StrategyRegistry
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only
from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only
from torch import Tensor

from .faults import Heartbeat, configure_nccl, resolve_timeout, start_heartbeat
from .hardware import cluster_for_plan
from .callbacks.metrics import host_scalar
from .lightning_workarounds import pinned, settle_fit_loop_state, share_inf_checks
from .mesh import ParallelMeshes, build_meshes
from .models.protocol import find_transformer
from .parallel.apply import DataParallelGradients
from .parallel.gradient_reducer import GradientReducer
from .plan import ParallelPlan, PlanError, as_plan
from .pretrained import load_pretrained_into
from .step import StepBatch


class AttnHybridStrategy(ParallelStrategy):
    """Attention-aware hybrid parallelism for Lightning: `Trainer(strategy="attn_hybrid")`.

    Args:
        plan: a ParallelPlan, a dict of its fields, "auto" or None (auto: the planner chooses).
        timeout_s: how long any collective may wait for the other ranks (default
            faults.DEFAULT_TIMEOUT_S); past it the rank exits naming the ranks that did not arrive.
        save_distributed_checkpoint: sharded checkpoints (a folder, loadable under another plan)
            when parameters are sharded; replicated plans always write one file.
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
                 save_distributed_checkpoint: bool = True) -> None:
        super().__init__(accelerator=accelerator, parallel_devices=parallel_devices,
                         cluster_environment=cluster_environment, checkpoint_io=checkpoint_io,
                         precision_plugin=precision_plugin)
        self._requested_plan = as_plan(plan)
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
        self._parallelized = False
        self._state_loaded_in_place = False

    # ------------------------------------------------------------------ processes
    @property
    def gradient_reducer(self) -> Optional[GradientReducer]:
        """The replicated plans' bucketed reducer (None under FSDP2 or before setup); the
        callbacks read its communication timings."""
        return self.gradients.reducer if self.gradients is not None else None

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
        self._requested_plan_checked()
        super().setup_environment()
        reset_seed()
        self.set_world_ranks()
        backend = self._process_group_backend or _get_default_process_group_backend_for_device(self.root_device)
        self._process_group_backend = backend
        kwargs: dict[str, Any] = {"timeout": self._timeout}
        if self.root_device.type == "cuda":
            kwargs["device_id"] = self.root_device
        if backend == "nccl":
            configure_nccl()
        _init_dist_connection(self.cluster_environment, backend, **kwargs)
        self._heartbeat = self._heartbeat or start_heartbeat(self._timeout)
        from .planning.auto import resolve_plan

        self.plan = resolve_plan(self._requested_plan, self, self.lightning_module)
        self.meshes = build_meshes(self.plan, self.root_device.type, self.ranks_per_node)
        if self.lightning_module is not None:
            self.lightning_module._device_mesh = self.meshes.dense

    def _requested_plan_checked(self) -> None:
        """Fail before any process group starts when the degrees cannot fit the world or the model
        (the same check_model the CLI's pre-flight runs)."""
        plan = self._requested_plan
        if not plan.is_auto:
            resolved = plan.resolve(self.num_nodes * self.num_processes)
            model_cfg = getattr(self.lightning_module, "model_config", None)
            if model_cfg is not None:
                resolved.check_model(model_cfg)
        if plan.fp8 != "none":
            from .parallel.float8 import float8_unavailable

            reason = float8_unavailable(self.root_device)
            if reason is not None:
                raise PlanError(f"ParallelPlan fp8={plan.fp8!r} cannot run: {reason}; or set fp8='none'")

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
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        share_inf_checks(self.precision_plugin, self.root_device)
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
                             materialize=lambda: load_pretrained_into(module, self.root_device))
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
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None
        if self.gradient_reducer is not None:
            self.gradient_reducer.remove_hooks()
        super().teardown()

    # ------------------------------------------------------------------ checkpoints
    @property
    def _state_split_over_ranks(self) -> bool:
        fully_sharded = self.gradients is not None and self.gradients.fully_sharded
        return self.plan is not None and (fully_sharded or self.plan.tp > 1 or self.plan.ep > 1)

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True

    @property
    def lightning_restore_optimizer(self) -> bool:
        """Lightning restores optimizer states through `load_optimizer_state_dict` (any plan,
        any single-file format), except after a checkpoint folder, which `load_checkpoint` has
        already loaded into the model and the optimizers."""
        return not self._state_loaded_in_place

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """Sharded plans: a sharded state dict for a checkpoint folder, or the full one for a
        single file (parallel/state_dict.py)."""
        if not self._state_split_over_ranks:
            return super().lightning_module_state_dict()
        from .parallel.state_dict import model_state

        return model_state(self.model, full=not self._save_distributed_checkpoint,
                           expert_parallel=self.plan.ep > 1)

    def optimizer_state(self, optimizer) -> dict[str, Any]:
        if not self._state_split_over_ranks:
            return super().optimizer_state(optimizer)
        from .parallel.state_dict import optimizer_state

        return optimizer_state(self.model, getattr(optimizer, "_optimizer", optimizer),
                               full=not self._save_distributed_checkpoint, expert_parallel=self.plan.ep > 1)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Optional[Any] = None) -> None:
        """Write to a temporary name and rename, so an interrupted save never destroys the last
        good checkpoint. Sharded plans write a torch.distributed.checkpoint folder."""
        path = Path(self.broadcast(str(filepath)))
        checkpoint = settle_fit_loop_state(checkpoint)
        if self._state_split_over_ranks and self._save_distributed_checkpoint:
            from .checkpoint import save_lightning_checkpoint

            save_lightning_checkpoint(path, checkpoint, is_rank_zero=self.is_global_zero)
            self.barrier()
            return
        from .checkpoint import save_file

        save_file(path, checkpoint, is_writer=self.is_global_zero)

    def load_checkpoint(self, checkpoint_path, weights_only: Optional[bool] = None) -> dict[str, Any]:
        """A checkpoint folder (saved under any plan) is loaded into the model and optimizers in
        place, whatever this run's plan, and the rest of the Lightning dict is returned; a single
        file is read and its states are applied by `load_model_state_dict` and
        `load_optimizer_state_dict`."""
        path = Path(self.broadcast(str(checkpoint_path)))
        self._state_loaded_in_place = False
        if path.is_dir():
            from .checkpoint import load_lightning_checkpoint

            checkpoint = load_lightning_checkpoint(path, self.model, self.optimizers)
            self._state_loaded_in_place = True
            return checkpoint
        from .checkpoint import check_shared_tensors, read_checkpoint_file

        checkpoint = read_checkpoint_file(path)
        check_shared_tensors(path, self.lightning_module, checkpoint.get("state_dict", {}))
        return checkpoint

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        if "state_dict" not in checkpoint:
            return  # a checkpoint folder was loaded in place by load_checkpoint
        if not self._state_split_over_ranks:
            return super().load_model_state_dict(checkpoint, strict=strict)
        from .parallel.state_dict import load_full_model_state

        load_full_model_state(self.model, checkpoint["state_dict"], strict)

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        """Optimizer states of a single file, saved under any plan (parallel/state_dict.py)."""
        if "optimizer_states" not in checkpoint:
            return  # a checkpoint folder was loaded in place by load_checkpoint
        from .parallel.state_dict import load_optimizer_state

        for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"]):
            load_optimizer_state(self.model, getattr(optimizer, "_optimizer", optimizer), state,
                                 self._state_split_over_ranks, self.root_device)

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(cls.strategy_name, cls,
                                   description="Attention-aware hybrid data/tensor/context/expert parallelism")


def register() -> None:
    """Make `Trainer(strategy="attn_hybrid")` resolve (importing the package calls this)."""
    if AttnHybridStrategy.strategy_name not in StrategyRegistry:
        AttnHybridStrategy.register_strategies(StrategyRegistry)
