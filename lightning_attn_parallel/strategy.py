"""AttnHybridStrategy: the Lightning glue that builds meshes and applies the parallelisms.

Everything model-specific lives in parallel/ (one function per parallelism) and models/; this file
only decides the order: tensor parallel -> expert parallel -> context parallel -> activation
checkpointing -> compile -> data parallel (GradientReducer, or FSDP2/HSDP when dp_shard > 1).
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Generator, Mapping, Optional, Union

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
from torch import Tensor, nn

from .faults import Heartbeat, configure_nccl, resolve_timeout, start_heartbeat
from .mesh import ParallelMeshes, build_meshes
from .hardware import cluster_for_plan
from .parallel.gradient_reducer import GradientReducer
from .plan import ParallelPlan, PlanError, as_plan
from .pretrained import load_pretrained_into


def find_transformer(module: nn.Module) -> Optional[nn.Module]:
    """The sub-module that follows the model protocol (has `blocks` whose items have
    `attention`), or None for an arbitrary user model (which then gets data parallelism only)."""
    for sub in module.modules():
        blocks = getattr(sub, "blocks", None)
        if isinstance(blocks, nn.ModuleList) and len(blocks) and hasattr(blocks[0], "attention"):
            return sub
    return None


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
        self.gradient_reducer: Optional[GradientReducer] = None
        self.fully_sharded = False
        self._gradient_fixups: tuple = ()  # FSDP2 gradients to finish (parallel.apply)
        self._gradients_synced = True  # False inside block_backward_sync
        self.context_parallel = None
        self.num_nodes = 1
        self._process_group_backend = process_group_backend
        self._timeout = resolve_timeout(timeout_s, timeout)
        self._heartbeat: Optional[Heartbeat] = None
        self._save_distributed_checkpoint = save_distributed_checkpoint
        self._parallelized = False
        self._state_loaded_in_place = False

    # ------------------------------------------------------------------ processes
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
        self.plan = self._resolve_plan()
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

    def _resolve_plan(self) -> ParallelPlan:
        plan = self._requested_plan
        if plan.is_auto:
            plan = self._auto_plan()
        return self._resolve_accumulation(plan.resolve(self.world_size))

    def _resolve_accumulation(self, plan: ParallelPlan) -> ParallelPlan:
        """Pin accumulation="auto" to one policy (the planner's, on GPUs) and log the choice."""
        from dataclasses import replace

        from .planning.auto import accumulation_for_strategy

        module = self.lightning_module
        policy, reason = accumulation_for_strategy(getattr(module, "model_config", None), self,
                                                   module, plan)
        if plan.sharded and plan.accumulation == "auto":
            rank_zero_info(f"attn_hybrid: gradient accumulation {policy}: {reason}")
        return replace(plan, accumulation=policy)

    def _auto_plan(self) -> ParallelPlan:
        """Ask the planner when the module describes its model; plain data parallelism otherwise."""
        module = self.lightning_module
        model_cfg = getattr(module, "model_config", None)
        if model_cfg is None:
            rank_zero_info("attn_hybrid: no model config to plan from; using data parallelism over "
                           f"{self.world_size} ranks")
            return ParallelPlan()
        from .planning.auto import auto_plan_for_strategy

        plan, reason = auto_plan_for_strategy(model_cfg, self, module)
        rank_zero_info(f"attn_hybrid: auto plan {plan.describe()}: {reason}")
        return plan

    def _requested_plan_template(self) -> ParallelPlan:
        """The user's options (bucket size, kernels, compile...) for the planner to keep."""
        from dataclasses import replace

        return replace(self._requested_plan, mode="manual")

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
            load_pretrained_into(self.lightning_module)  # each rank reads only its slices
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self._reset_optimizers_and_schedulers()
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        self._share_inf_checks()
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)

    def model_to_device(self) -> None:
        assert self.model is not None
        self.model.to(self.root_device)

    def _parallelize(self, module: LightningModule) -> None:
        from .parallel.apply import parallelize

        assert self.plan is not None and self.meshes is not None
        result = parallelize(module, find_transformer(module), self.plan, self.meshes,
                             precision=str(self.precision_plugin.precision),
                             cluster=cluster_for_plan(self.plan, max(1, self.world_size // self.ranks_per_node),
                                                      self.ranks_per_node))
        self.gradient_reducer = result.reducer
        self.fully_sharded = result.fully_sharded
        self._gradient_fixups = result.gradient_fixups
        self.context_parallel = result.context_parallel
        if self.global_rank == 0:
            print(result.table, flush=True)
        from .models.attention_backend import describe_sdpa_backends

        rank_zero_info(describe_sdpa_backends(self.root_device.type))  # chosen once, here

    @property
    def expert_parallel_group(self) -> Optional[dist.ProcessGroup]:
        """The group over which experts are split (for global gradient norms), or None."""
        if self.plan is None or self.plan.ep == 1 or self.meshes is None or self.meshes.expert is None:
            return None
        return self.meshes.group("ep")

    def _share_inf_checks(self) -> None:
        """16-mixed: agree on inf/NaN across ranks so every rank skips the same steps (sharded
        gradients see only part of the inf checks). torch's ShardedGradScaler does exactly that."""
        scaler = getattr(self.precision_plugin, "scaler", None)
        if scaler is None or not isinstance(scaler, torch.amp.GradScaler):
            return
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        if not isinstance(scaler, ShardedGradScaler):
            self.precision_plugin.scaler = ShardedGradScaler(
                device=self.root_device.type, init_scale=scaler.get_scale() if scaler.is_enabled() else 2.0**16,
                process_group=dist.group.WORLD)

    # ------------------------------------------------------------------ training step
    def _layout_batch(self, args: tuple, log: bool) -> tuple:
        """Context parallelism: split this batch along the sequence over a degree decided by its
        longest document (or its length), and tell the module the global sequence length (for
        FLOP counts)."""
        if self.context_parallel is None or not args:
            return args
        batch = self.context_parallel.prepare_batch(args[0])
        module = self.lightning_module
        module.global_seq_len = batch["global_seq_len"]
        if log:
            module.log("parallel/context_parallel_active",
                       float(self.context_parallel.last_mode == "context"), on_step=True)
            module.log("parallel/cp_degree", float(self.context_parallel.last_degree), on_step=True)
        return (batch,) + tuple(args[1:])

    def training_step(self, *args: Any, **kwargs: Any):
        args = self._layout_batch(args, log=True)
        if self.plan is not None and self.plan.offload_activations:
            # Saved activations go to pinned host memory and come back for the backward pass.
            with torch.autograd.graph.save_on_cpu(pin_memory=self.root_device.type == "cuda"):
                return super().training_step(*args, **kwargs)
        return super().training_step(*args, **kwargs)

    def validation_step(self, *args: Any, **kwargs: Any):
        return super().validation_step(*self._layout_batch(args, log=False), **kwargs)

    def pre_backward(self, closure_loss: Tensor) -> None:
        if self.gradient_reducer is not None:
            self.gradient_reducer.prepare_for_backward()

    def post_backward(self, closure_loss: Tensor) -> None:
        if self.gradient_reducer is not None:
            self.gradient_reducer.finish()
        if self._gradients_synced:  # reduced (final) on this micro-batch: finish them once
            for fixup in self._gradient_fixups:
                fixup.apply()

    @contextmanager
    def block_backward_sync(self) -> Generator[None, None, None]:
        """Micro-batches that only accumulate send nothing (the replicated reducer), or what the
        plan's accumulation policy says (FSDP2/HSDP; see parallel.fully_sharded)."""
        reducer = self.gradient_reducer
        if reducer is not None:
            reducer.sync_enabled = False
        if self.fully_sharded:
            from .parallel.fully_sharded import set_gradient_sync

            set_gradient_sync(self.model, False, self.plan.accumulation)
        self._gradients_synced = False
        try:
            yield
        finally:
            self._gradients_synced = True
            if reducer is not None:
                reducer.sync_enabled = True
            if self.fully_sharded:
                from .parallel.fully_sharded import set_gradient_sync

                set_gradient_sync(self.model, True)

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
    def _sharded_state(self) -> bool:
        return self.plan is not None and (self.fully_sharded or self.plan.tp > 1 or self.plan.ep > 1)

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True

    @property
    def lightning_restore_optimizer(self) -> bool:
        """Lightning restores optimizer states through `load_optimizer_state_dict` (any plan,
        any single-file format), except after a checkpoint folder, which `load_checkpoint` has
        already loaded into the model and the optimizers."""
        return not self._state_loaded_in_place

    @property
    def _expert_parallel(self) -> bool:
        return self.plan is not None and self.plan.ep > 1

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """Sharded plans: a sharded state dict for a checkpoint folder, or the full one for a
        single file. Under expert parallelism each expert tensor appears with its global shape (a
        view of this rank's block, gathered for the full state dict), never one rank's block."""
        if not self._sharded_state:
            return super().lightning_module_state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = not self._save_distributed_checkpoint
        if self._expert_parallel:
            # Views of the live tensors, not CPU copies (DTensor.from_local would move those
            # back to the mesh's device); DCP copies to the CPU as it writes, and the full state
            # dict is gathered one tensor at a time into rank 0's CPU memory.
            from .parallel.expert_state import full_state, global_model_state

            state = global_model_state(self.model, get_model_state_dict(self.model))
            return full_state(state) if full else state
        options = StateDictOptions(full_state_dict=full, cpu_offload=True)
        return get_model_state_dict(self.model, options=options)

    def optimizer_state(self, optimizer) -> dict[str, Any]:
        if not self._sharded_state:
            return super().optimizer_state(optimizer)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        optimizer = getattr(optimizer, "_optimizer", optimizer)
        full = not self._save_distributed_checkpoint
        if self._expert_parallel:
            from .parallel.expert_state import full_state, global_optimizer_state

            state = global_optimizer_state(self.model, get_optimizer_state_dict(self.model, optimizer))
            return full_state(state) if full else state
        options = StateDictOptions(full_state_dict=full, cpu_offload=True)
        return get_optimizer_state_dict(self.model, optimizer, options=options)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Optional[Any] = None) -> None:
        """Write to a temporary name and rename, so an interrupted save never destroys the last
        good checkpoint. Sharded plans write a torch.distributed.checkpoint folder."""
        path = Path(self.broadcast(str(filepath)))
        checkpoint = _settle_fit_loop_state(checkpoint)
        if self._sharded_state and self._save_distributed_checkpoint:
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
        from .checkpoint import read_checkpoint_file

        return read_checkpoint_file(path)

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        if "state_dict" not in checkpoint:
            return  # a checkpoint folder was loaded in place by load_checkpoint
        if self._sharded_state:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            from .parallel.expert_state import local_model_state

            state = local_model_state(self.model, checkpoint["state_dict"])  # experts: my block
            set_model_state_dict(self.model, state,
                                 options=StateDictOptions(full_state_dict=True, strict=strict))
            return
        super().load_model_state_dict(checkpoint, strict=strict)

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        """Optimizer states of a single-file checkpoint: torch's own format (parameters numbered,
        written by a replicated plan) or full states keyed by parameter name (written by a
        sharded plan with save_distributed_checkpoint=False). A replicated plan loads the former
        directly; everything else goes through `set_optimizer_state_dict`, which shards the full
        states to this plan's layout."""
        if "optimizer_states" not in checkpoint:
            return  # a checkpoint folder was loaded in place by load_checkpoint
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        from .parallel.expert_state import local_optimizer_state

        for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"]):
            optimizer = getattr(optimizer, "_optimizer", optimizer)
            keyed_by_name = _optimizer_state_keyed_by_name(state)
            if not self._sharded_state and not keyed_by_name:
                optimizer.load_state_dict(state)
                _optimizers_to_device([optimizer], self.root_device)
                continue
            if not keyed_by_name:
                state = _optimizer_state_by_name(self.model, optimizer, state)
            state = local_optimizer_state(self.model, state)  # experts: this rank's block
            set_optimizer_state_dict(self.model, optimizer, state,
                                     options=StateDictOptions(full_state_dict=True))

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(cls.strategy_name, cls,
                                   description="Attention-aware hybrid data/tensor/context/expert parallelism")


def _settle_fit_loop_state(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """Make a checkpoint saved once an epoch's loop has ended resume where that run stopped.

    Lightning's loop state is ambiguous there, and with max_steps its restart goes wrong:
    - `trainer.fit(max_steps=k); trainer.save_checkpoint(path)` stopped mid-epoch: the fit loop
      has counted the epoch as completed, so the resumed run would start the next epoch number
      (its sampler shuffles differently) at the old batch index;
    - the same, stopped on the epoch's last batch (Lightning issue #19617), or a save from
      `on_train_epoch_end` (ModelCheckpoint without validation): the resumed run first trains one
      batch more in an epoch that has none left.
    So an epoch that reached its last batch is recorded as completed, with the next one to start
    at batch 0; an epoch cut short is recorded as unfinished, to continue at the next batch.
    Checkpoints saved while an epoch runs (on_train_batch_end, validation) are left unchanged.
    """
    fit_loop = checkpoint.get("loops", {}).get("fit_loop")
    if not fit_loop or "epoch_progress" not in fit_loop or "epoch_loop.batch_progress" not in fit_loop:
        return checkpoint
    epoch = fit_loop["epoch_progress"]["current"]
    if not epoch["started"] or epoch["processed"] != epoch["started"]:
        return checkpoint  # saved while an epoch was running
    checkpoint = dict(checkpoint)
    checkpoint["loops"] = copy.deepcopy(checkpoint["loops"])
    fit_loop = checkpoint["loops"]["fit_loop"]
    batches = fit_loop["epoch_loop.batch_progress"]
    finished = batches["is_last_batch"]
    for progress in fit_loop["epoch_progress"].values():
        if finished:
            progress["completed"] = progress["processed"]
        else:
            progress["processed"] = progress["completed"] = progress["started"] - 1
    if finished:
        batches["current"] = {key: 0 for key in batches["current"]}
        batches["is_last_batch"] = False
    if "epoch" in checkpoint:
        checkpoint["epoch"] = fit_loop["epoch_progress"]["current"]["completed"]
    return checkpoint


def _optimizer_state_keyed_by_name(state: Mapping[str, Any]) -> bool:
    return any(isinstance(p, str) for group in state.get("param_groups", ()) for p in group["params"])


def _optimizer_state_by_name(model: nn.Module, optimizer, state: Mapping[str, Any]) -> dict[str, Any]:
    """torch's optimizer state (parameters numbered in the optimizer's order) keyed by parameter
    name instead, the form `set_optimizer_state_dict` takes. The names, in the optimizer's
    order, come from `get_optimizer_state_dict`, which strips whatever wraps the model."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    current = get_optimizer_state_dict(model, optimizer)
    names = [name for group in current["param_groups"] for name in group["params"]]
    numbers = [p for group in state["param_groups"] for p in group["params"]]
    if len(names) != len(numbers):
        raise ValueError(f"the checkpoint's optimizer has {len(numbers)} parameters but this run's has "
                         f"{len(names)}: resume with the configure_optimizers it was saved with")
    rename = dict(zip(numbers, names))
    return {"state": {rename[k]: v for k, v in state["state"].items()},
            "param_groups": [{**group, "params": [rename[p] for p in group["params"]]}
                             for group in state["param_groups"]]}


def register() -> None:
    """Make `Trainer(strategy="attn_hybrid")` resolve (importing the package calls this)."""
    if AttnHybridStrategy.strategy_name not in StrategyRegistry:
        AttnHybridStrategy.register_strategies(StrategyRegistry)
