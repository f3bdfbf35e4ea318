"""What the attn_hybrid strategy does the same way under both Lightning front-ends.

Lightning has two strategy class trees, the Trainer's (`lightning.pytorch.strategies`) and
Fabric's (`lightning.fabric.strategies`), with the same ideas under different hook names. This
mixin holds what both do alike: start the process group, resolve the plan, build the meshes,
apply the plan with `parallel.apply.parallelize`, set optimizers up for mixed tensor types and
master weights, lay out a context-parallel batch, and stop cleanly. strategy.py (the Trainer's)
and fabric.py (Fabric's) only map their front-end's hooks onto it.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from datetime import timedelta
from typing import Any, Callable, ContextManager, Generator, Optional

import torch
import torch.distributed as dist
from lightning.fabric.utilities.distributed import _distributed_is_initialized
from lightning.fabric.utilities.seed import reset_seed
from lightning_utilities.core.rank_zero import rank_zero_info, rank_zero_only
from torch import nn

from .faults import Heartbeat, resolve_timeout
from .hardware import cluster_for_plan
from .mesh import ParallelMeshes, build_meshes
from .models.protocol import find_transformer
from .parallel.data_parallel import DataParallelGradients
from .parallel.gradient_reducer import GradientReducer
from .parallel.optimizer_step import step_over_mixed_tensors
from .plan import ParallelPlan
from .planning.auto import RunContext, resolve_plan
from .processes import start_process_group
from .step import StepBatch


class HybridParallelism:
    """Mixed in before either front-end's `ParallelStrategy`; the front-end provides the ranks
    (`global_rank`, `local_rank`, `node_rank`, `world_size`), `parallel_devices`, `num_nodes` and
    `cluster_environment`."""

    def _init_hybrid(self, process_group_backend: Optional[str], timeout: Optional[timedelta],
                     timeout_s: Optional[float]) -> None:
        """After the front-end's own __init__ (which sets `_requested_plan` first: the precision
        setter reads it)."""
        self.plan: Optional[ParallelPlan] = None
        self.meshes: Optional[ParallelMeshes] = None
        self.gradients: Optional[DataParallelGradients] = None  # the backward's data-parallel side
        self._step_context: Callable[[], ContextManager] = nullcontext
        self.context_parallel = None
        self.pipeline = None  # pp > 1: parallel.pipeline.PipelineRunner, which runs the steps
        self.step_batch: Optional[StepBatch] = None  # this rank's share of the current micro-batch
        self._process_group_backend = process_group_backend
        self._timeout = resolve_timeout(timeout_s, timeout)
        self._heartbeat: Optional[Heartbeat] = None

    # ------------------------------------------------------------------ what callbacks read
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

    # ------------------------------------------------------------------ ranks and devices
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
            self._launcher = self.launcher_class(self.cluster_environment, self.num_processes, self.num_nodes)

    def set_world_ranks(self) -> None:
        if self.cluster_environment is not None:
            self.cluster_environment.set_global_rank(self.node_rank * self.num_processes + self.local_rank)
            self.cluster_environment.set_world_size(self.num_nodes * self.num_processes)
        rank_zero_only.rank = self.global_rank  # one object for Lightning, Fabric and lightning_utilities

    # ------------------------------------------------------------------ processes and plan
    def _check_requested_plan(self, model_config: Optional[Any]) -> None:
        """Before any process group starts: the plan fits the world (and the model, if known)."""
        from .parallel.apply import check_plan

        check_plan(self._requested_plan, self.num_nodes * self.num_processes, model_config, self.root_device)

    def _join_world(self) -> None:
        """Seed, ranks, process group and heartbeat (processes.py)."""
        reset_seed()
        self.set_world_ranks()
        self._process_group_backend, heartbeat = start_process_group(
            self.cluster_environment, self.root_device, self._process_group_backend, self._timeout)
        self._heartbeat = self._heartbeat or heartbeat

    def _resolve_plan(self, run: RunContext, model_config: Optional[Any]) -> None:
        """The plan to train with (planning.auto) and its meshes."""
        self.plan, notes = resolve_plan(self._requested_plan, run, model_config)
        for note in notes:
            rank_zero_info(note)
        self.meshes = build_meshes(self.plan, self.root_device.type, self.ranks_per_node)

    def _run_context(self, precision: str, micro_batch: int = 1, seq_len: Optional[int] = None,
                     accumulate: int = 1) -> RunContext:
        return RunContext(self.world_size, self.root_device.type, self.num_nodes, self.num_processes,
                          precision, micro_batch, seq_len, accumulate)

    def _apply_plan(self, module: nn.Module, precision: str, compute_dtype: Optional[torch.dtype],
                    materialize: Callable[[], None]) -> None:
        """`parallel.apply.parallelize` on `module`, keeping what the step needs from it."""
        from .models.attention_backend import describe_sdpa_backends
        from .parallel.apply import parallelize

        assert self.plan is not None and self.meshes is not None
        result = parallelize(module, find_transformer(module), self.plan, self.meshes, precision=precision,
                             cluster=cluster_for_plan(self.plan, max(1, self.world_size // self.ranks_per_node),
                                                      self.ranks_per_node),
                             materialize=materialize, compute_dtype=compute_dtype)
        self.gradients = result.gradients
        self._step_context = result.step_context
        self.context_parallel = result.context_parallel
        self.pipeline = result.pipeline
        if self.global_rank == 0:
            print(result.table, flush=True)
        rank_zero_info(describe_sdpa_backends(self.root_device.type))  # chosen once, here

    def _prepare_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Steps over groups that mix plain and DTensor parameters; under master weights, one cast
        into the compute copies after each step, or the fused update of the masters where
        `parallel.master_adamw.fuses` allows it."""
        step_over_mixed_tensors(optimizer)
        masters = self.master_weights
        if masters is not None:
            from .parallel.master_adamw import fuses

            owned = {id(m) for m in masters.master_params}
            if any(id(p) in owned for group in optimizer.param_groups for p in group["params"]):
                fused = fuses(optimizer, masters, self.gradient_reducer, self.plan.fused_master_step)
                masters.fused_optimizer = optimizer if fused else None
            # the fused update of the masters (which writes the copies), or the copies' refresh
            optimizer.register_step_post_hook(lambda opt, *_: masters.after_step(opt))
        return optimizer

    def step_context(self) -> ContextManager:
        """The context a training step's forward runs in: the plan's memory levers run per step
        (activation offload), or nothing."""
        return self._step_context()

    def layout_batch(self, batch: Any) -> Any:
        """Context parallelism: this rank's share of `batch` as a StepBatch (split along the
        sequence over a degree decided by its longest document, or its length); any other plan
        returns `batch` unchanged. The callbacks read the same StepBatch as `step_batch`."""
        if self.context_parallel is None:
            return batch
        self.step_batch = self.context_parallel.prepare_batch(batch)
        return self.step_batch

    # ------------------------------------------------------------------ collectives
    def barrier(self, *args: Any, **kwargs: Any) -> None:
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

    # ------------------------------------------------------------------ failure and the end
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
        self._release()
        super().teardown()

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(cls.strategy_name, cls,
                                   description="Attention-aware hybrid data/tensor/context/expert parallelism")

    def _release(self) -> None:
        """The module ends holding the masters; the heartbeat stops and the reducer's hooks go."""
        if self.master_weights is not None:
            self.master_weights.masters_in_place()
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None
        if self.gradient_reducer is not None:
            self.gradient_reducer.remove_hooks()


__all__ = ["HybridParallelism"]
