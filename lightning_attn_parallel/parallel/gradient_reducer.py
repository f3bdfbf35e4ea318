"""Bucketed, overlapped gradient all-reduce for replicated parameters.

Why not torch's DistributedDataParallel: DDP reduces every parameter over one process group,
while this plugin reduces dense parameters over dp x cp and expert parameters over edp (each with
its own scale), may split a group's reduction into intra- and inter-node stages, and must leave
the LightningModule unwrapped so tensor/context/expert parallelism can rewrite its layers.

How it works (in the spirit of Megatron-Core's DDP): parameters are laid into flat buffers per
(reduction group, dtype), cut into buckets of about `bucket_mb`. `param.grad` is a view into its
bucket, so autograd accumulates micro-batches in place. A post-accumulate-grad hook counts each
bucket's ready parameters; once a bucket (and every bucket before it, so all ranks issue
collectives in the same order) is complete, its all-reduce is launched while the backward pass
goes on. On micro-batches that only accumulate, nothing is sent.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..mesh import ReductionGroup
from ..hardware import ClusterSpec
from .collectives import choose_hierarchical, hierarchical_all_reduce


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (tensor-parallel parameter), or the tensor itself."""
    return t._local_tensor if hasattr(t, "_local_tensor") else t


def grad_view_for(param: nn.Parameter, view: torch.Tensor) -> torch.Tensor:
    """A `.grad` for `param` backed by `view`: DTensor parameters need a DTensor gradient."""
    if not hasattr(param, "device_mesh"):
        return view
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(view, param.device_mesh, param.placements, run_check=False,
                              shape=param.shape, stride=param.stride())


@dataclass
class Bucket:
    index: int
    group: ReductionGroup
    buffer: torch.Tensor
    params: list[nn.Parameter]
    hierarchical: bool
    ready: set[int] = field(default_factory=set)
    work: Optional[object] = None

    @property
    def complete(self) -> bool:
        return len(self.ready) == len(self.params)


@dataclass
class CommStats:
    collectives: int = 0
    bytes: int = 0
    comm_time_s: float = 0.0
    exposed_comm_time_s: float = 0.0
    launched_during_backward: int = 0

    def as_dict(self) -> dict[str, float]:
        return {"comm_time_s": self.comm_time_s, "exposed_comm_time_s": self.exposed_comm_time_s,
                "bytes": self.bytes, "collectives": self.collectives,
                "launched_during_backward": self.launched_during_backward}


class GradientReducer:
    """Owns the gradient buffers of replicated parameters and their reduction."""

    def __init__(self, param_groups: list[tuple[list[nn.Parameter], ReductionGroup]],
                 bucket_mb: float = 25.0, hierarchical: str = "auto",
                 cluster: ClusterSpec = ClusterSpec()) -> None:
        self.sync_enabled = True
        self.cluster = cluster
        self.hierarchical_mode = hierarchical
        self.buckets: list[Bucket] = []
        self._views: dict[int, torch.Tensor] = {}
        self._bucket_of: dict[int, Bucket] = {}
        self._hooks = []
        self._window_open = False
        self._next_launch = 0
        self._in_backward = False
        self.stats = CommStats()
        self._last_stats = CommStats()
        self._cuda_stream: Optional[torch.cuda.Stream] = None
        self._cuda_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._last_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._pending_exposed: Optional[tuple[torch.cuda.Event, torch.cuda.Event]] = None
        for params, group in param_groups:
            self._build_buckets([p for p in params if p.requires_grad], group, bucket_mb)
        for bucket in self.buckets:
            for p in bucket.params:
                self._hooks.append(p.register_post_accumulate_grad_hook(self._on_grad_ready))

    # ------------------------------------------------------------------ layout
    def _build_buckets(self, params: list[nn.Parameter], group: ReductionGroup, bucket_mb: float) -> None:
        if not params or (group.group is None and group.scale == 1.0):
            return  # a group of one rank with nothing to scale
        limit = int(bucket_mb * 2**20)
        # Lay buffers out by the dtype and size of each parameter's local shard.
        by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
        # Reverse registration order approximates the order in which backward produces grads.
        for p in reversed(params):
            by_dtype.setdefault(p.dtype, []).append(p)
        for dtype, plist in by_dtype.items():
            current: list[nn.Parameter] = []
            size = 0
            for p in plist:
                current.append(p)
                size += local_tensor(p).numel() * p.element_size()
                if size >= limit:
                    self._add_bucket(current, group, dtype)
                    current, size = [], 0
            if current:
                self._add_bucket(current, group, dtype)

    def _add_bucket(self, params: list[nn.Parameter], group: ReductionGroup, dtype: torch.dtype) -> None:
        numel = sum(local_tensor(p).numel() for p in params)
        buffer = torch.zeros(numel, dtype=dtype, device=local_tensor(params[0]).device)
        nbytes = numel * buffer.element_size()
        bucket = Bucket(index=len(self.buckets), group=group, buffer=buffer, params=params,
                        hierarchical=choose_hierarchical(self.hierarchical_mode, nbytes, group, self.cluster))
        offset = 0
        for p in params:
            local = local_tensor(p)
            self._views[id(p)] = buffer[offset: offset + local.numel()].view_as(local)
            self._bucket_of[id(p)] = bucket
            offset += local.numel()
        self.buckets.append(bucket)

    # ------------------------------------------------------------------ backward
    def prepare_for_backward(self) -> None:
        """Called before each backward. The first backward of an accumulation window zeroes the
        buffers and points every `.grad` at its bucket view so autograd accumulates in place."""
        self._in_backward = True
        if self._window_open:
            return
        self._window_open = True
        self._next_launch = 0
        self.stats = CommStats()
        self._cuda_events = []
        for bucket in self.buckets:
            bucket.buffer.zero_()
            bucket.ready.clear()
            bucket.work = None
            for p in bucket.params:
                p.grad = grad_view_for(p, self._views[id(p)])

    def holds(self, param: nn.Parameter) -> bool:
        """Whether a bucket holds `param`'s gradient (parameters of one-rank groups are in none)."""
        return id(param) in self._views

    def grad_ready(self, param: nn.Parameter) -> None:
        """`param`'s gradient for this micro-batch is in place (called by its post-accumulate
        hook, or by whoever put it there: master weights add their compute copies' gradients).
        A parameter in no bucket (a one-rank group) needs nothing."""
        if id(param) in self._views:
            self._on_grad_ready(param)

    def _on_grad_ready(self, param: nn.Parameter) -> None:
        view = self._views[id(param)]
        grad = local_tensor(param.grad)
        if grad.data_ptr() != view.data_ptr():
            # .grad was replaced (set to None and re-created): fold it into the bucket.
            view.add_(grad)
            param.grad = grad_view_for(param, view)
        if not self.sync_enabled:
            return
        bucket = self._bucket_of[id(param)]
        bucket.ready.add(id(param))
        self._launch_ready()

    def _launch_ready(self) -> None:
        while self._next_launch < len(self.buckets) and self.buckets[self._next_launch].complete:
            self._launch(self.buckets[self._next_launch])
            self._next_launch += 1

    def _launch(self, bucket: Bucket) -> None:
        group = bucket.group
        bucket.buffer.mul_(group.scale)  # pre-scale: no overflow of low-precision sums
        if group.group is None:
            return  # one rank: scaling was all there was to do
        self.stats.collectives += 1
        self.stats.bytes += bucket.buffer.numel() * bucket.buffer.element_size()
        if self._in_backward:
            self.stats.launched_during_backward += 1
        if bucket.buffer.is_cuda:
            self._launch_cuda(bucket)
        elif bucket.hierarchical:
            start = time.perf_counter()
            hierarchical_all_reduce(bucket.buffer, group)  # gloo: blocking, exact
            self.stats.comm_time_s += time.perf_counter() - start
        else:
            bucket.work = dist.all_reduce(bucket.buffer, group=group.group, async_op=True)

    def _launch_cuda(self, bucket: Bucket) -> None:
        """Issue the collectives on a side stream that first waits for the gradients: the
        compute stream never waits for communication until `finish`."""
        if self._cuda_stream is None:
            self._cuda_stream = torch.cuda.Stream(device=bucket.buffer.device)
        stream = self._cuda_stream
        stream.wait_stream(torch.cuda.current_stream(bucket.buffer.device))
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            start.record(stream)
            if bucket.hierarchical:
                hierarchical_all_reduce(bucket.buffer, bucket.group)
            else:
                dist.all_reduce(bucket.buffer, group=bucket.group.group)
            end.record(stream)
        self._cuda_events.append((start, end))

    def finish(self) -> None:
        """After the last backward of a window: launch what is left (parameters that received no
        gradient), wait for every collective and hand the averaged gradients to the optimizer."""
        self._in_backward = False
        if not self.sync_enabled:
            return
        wait_start = time.perf_counter()
        for bucket in self.buckets:
            bucket.ready.update(id(p) for p in bucket.params)
        self._launch_ready()
        for bucket in self.buckets:
            if bucket.work is not None:
                bucket.work.wait()
                bucket.work = None
        if self._cuda_stream is not None:
            device = self.buckets[0].buffer.device
            before = torch.cuda.Event(enable_timing=True)
            before.record(torch.cuda.current_stream(device))
            torch.cuda.current_stream(device).wait_stream(self._cuda_stream)
            self._pending_exposed = (before, self._cuda_events[-1][1]) if self._cuda_events else None
            self._last_events = self._cuda_events
        else:
            waited = time.perf_counter() - wait_start
            self.stats.exposed_comm_time_s += waited
            self.stats.comm_time_s += waited
        self._window_open = False
        self._last_stats = self.stats

    def comm_stats(self) -> dict[str, float]:
        """Statistics of the last completed optimizer step (CUDA timings resolved lazily, so
        reading them never forces a device synchronisation in the hot path)."""
        stats = self._last_stats
        if self._last_events and all(end.query() for _, end in self._last_events):
            stats.comm_time_s = sum(s.elapsed_time(e) for s, e in self._last_events) / 1e3
            if self._pending_exposed is not None:
                before, last_end = self._pending_exposed
                stats.exposed_comm_time_s = max(0.0, before.elapsed_time(last_end) / 1e3)
            self._last_events = []
        return stats.as_dict()

    def remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()


def broadcast_parameters(params: Iterable[nn.Parameter], group: ReductionGroup) -> None:
    """Start every replica from the same weights: broadcast from the group's first rank."""
    if group.group is None:
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(local_tensor(p.data), src=group.ranks[0], group=group.group)
