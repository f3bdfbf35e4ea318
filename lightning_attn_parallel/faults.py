"""Hung and dead peers: every collective waits at most `timeout_s`, and the ranks that did not
arrive are named in one line.

torch bounds the collectives itself: the process-group timeout makes a gloo collective raise, and
on NCCL the watchdog aborts the communicator (TORCH_NCCL_ASYNC_ERROR_HANDLING) and, on a timeout,
dumps its flight recorder (the last collectives of every rank, TORCH_NCCL_TRACE_BUFFER_SIZE /
TORCH_NCCL_DUMP_ON_TIMEOUT) for `python -m torch.distributed.flight_recorder.fr_trace`, which
names the ranks that never joined. What torch does not say in its error is WHICH rank is missing:
gloo reports "Timed out waiting 3000ms for recv" or "Connection closed by peer [ip]:port".

So every rank runs a `Heartbeat`: a daemon thread that bumps a counter in the rendezvous store
(the TCPStore every process group already has) a few times per timeout. A thread of its own keeps
beating however long the training thread computes, so a counter that stops means a process that
is frozen (SIGSTOP, a wedged host) or dead (kill -9, out of memory). It is used twice:
- when a collective fails (the strategy's `on_exception`), `explain` reads every counter twice,
  a few beats apart, and turns the error into a `PeerFailure` naming the silent ranks and the
  operation;
- as a backstop for waits no collective timeout covers, each rank watches its next two ranks;
  one silent for `timeout_s` is reported to the store (every rank reads that key each beat), and
  every surviving rank prints one line `error: PeerFailure: ...` and exits with code 1.
The store traffic is one write and a few reads per rank per beat, whatever the world size.
"""
from __future__ import annotations

import os
import re
import sys
import threading
import time
import traceback
from datetime import timedelta
from typing import Optional, Sequence

import torch.distributed as dist

from .errors import first_line

# Ten minutes: longer than any legitimate wait of one rank for another (torch.compile of the first
# step on a slow rank, rank 0 writing a consolidated checkpoint while the others wait at a
# barrier, a data loader's first batches on a cold file system), short enough that a frozen job
# frees its nodes in minutes rather than after torch's 30-minute gloo default. It equals torch's
# own NCCL default, so CPU and GPU runs behave alike.
DEFAULT_TIMEOUT_S = 600.0

KEY_PREFIX = "lap/heartbeat/"
FAULT_KEY = "lap/fault"
DONE = b"done"
EXIT_CODE = 1


class PeerFailure(RuntimeError):
    """A collective could not complete because other ranks stopped answering or died; the
    message names them and the operation."""


def resolve_timeout(timeout_s: Optional[float], timeout: Optional[timedelta] = None) -> timedelta:
    """The process-group timeout: `timeout_s` if given, else Lightning's `timeout`, else the
    default. A non-positive or non-numeric value is refused (a ValueError naming it)."""
    if timeout_s is None:
        return timeout if timeout is not None else timedelta(seconds=DEFAULT_TIMEOUT_S)
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
        raise ValueError(f"strategy.timeout_s={timeout_s!r} is not a positive number of seconds: "
                         f"use e.g. strategy.timeout_s={DEFAULT_TIMEOUT_S:g}")
    return timedelta(seconds=float(timeout_s))


def bound_new_groups(timeout: timedelta) -> None:
    """Give process groups created from now on (DeviceMesh dimensions, the reducer's groups) the
    same timeout as the world: torch's `new_group(timeout=None)` takes the backend's default
    instead (30 minutes on gloo, 10 on NCCL), and torch has no public setting for it."""
    from torch.distributed import distributed_c10d

    distributed_c10d.default_pg_timeout = timeout
    if hasattr(distributed_c10d, "default_pg_nccl_timeout"):
        distributed_c10d.default_pg_nccl_timeout = timeout


def configure_nccl(trace_dir: Optional[str] = None) -> None:
    """Turn on torch's NCCL fault machinery before the process group starts (values the user
    set in the environment win): a timed-out or failed collective aborts its communicator and
    ends the process instead of hanging, and the flight recorder keeps each rank's last
    collectives and writes them to `trace_dir` on a timeout."""
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")  # abort, skip clean-up, exit
    os.environ.setdefault("TORCH_NCCL_TRACE_BUFFER_SIZE", "2000")
    os.environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")
    if trace_dir:
        os.makedirs(trace_dir, exist_ok=True)
        os.environ.setdefault("TORCH_NCCL_DEBUG_INFO_TEMP_FILE", os.path.join(trace_dir, "nccl_trace_rank_"))


class Heartbeat:
    """This rank's heartbeat in the rendezvous store, and the reading of the others'."""

    def __init__(self, store: dist.Store, rank: int, world_size: int, timeout_s: float,
                 store_host: str) -> None:
        self.store, self.rank, self.world_size = store, rank, world_size
        self.timeout_s = timeout_s
        self.period = min(max(timeout_s / 10, 0.1), 2.0)
        self.store_host = store_host  # who to name when the store itself stops answering
        self._count = 0
        self._stop = threading.Event()
        self._last_ok = time.monotonic()
        self._main = threading.main_thread()

    # ---------------------------------------------------------------- beating
    def start(self) -> "Heartbeat":
        self._beat()
        self._last_ok = time.monotonic()
        for target, name in ((self._run, "lap-heartbeat"), (self._watch_store, "lap-store-watch")):
            threading.Thread(target=target, name=name, daemon=True).start()
        return self

    def stop(self, clean: bool = True) -> None:
        """Stop beating; `clean`: tell the others this rank left on purpose (not a fault)."""
        self._stop.set()
        if not clean:
            return
        try:
            self.store.set(KEY_PREFIX + str(self.rank), DONE)
        except Exception:  # noqa: BLE001 - the store may be gone at shutdown
            pass

    def _beat(self) -> None:
        self._count += 1
        self.store.set(KEY_PREFIX + str(self.rank), str(self._count))

    def _run(self) -> None:
        neighbours = [(self.rank + k) % self.world_size for k in (1, 2) if k < self.world_size]
        seen = {r: (None, time.monotonic()) for r in neighbours}
        while not self._stop.wait(self.period):
            silent = []
            try:
                self._beat()
                if self.store.check([FAULT_KEY]):
                    self._exit(self.store.get(FAULT_KEY).decode())
                now = time.monotonic()
                for r in neighbours:
                    value = self._read(r)
                    if value != seen[r][0]:
                        seen[r] = (value, now)
                    elif value != DONE and now - seen[r][1] > self.timeout_s:
                        silent.append(r)
                self._last_ok = now
            except Exception:  # noqa: BLE001 - the store went away: _watch_store reports it
                continue
            if silent and not self._stop.is_set():
                try:
                    missing = self.silent_ranks() or silent
                except Exception:  # noqa: BLE001 - name the neighbours at least
                    missing = silent
                message = (f"{_ranks(missing)} stopped answering for {self.timeout_s:g} s "
                           f"(strategy.timeout_s) while rank {self.rank} waited in "
                           f"{main_thread_operation(self._main)}; {_FIX}")
                try:
                    self.store.set(FAULT_KEY, message)
                finally:
                    self._exit(message)

    def _watch_store(self) -> None:
        """The store's own host frozen: a store call then blocks without end (TCPStore's socket
        reads have no timeout), so a second thread, which never touches the store, notices that
        no beat has succeeded for `timeout_s`."""
        while not self._stop.wait(self.period):
            if time.monotonic() - self._last_ok > self.timeout_s + self.period:
                self._exit(f"{self.store_host} stopped answering for {self.timeout_s:g} s while "
                           f"rank {self.rank} waited in {main_thread_operation(self._main)}; {_FIX}")

    def _exit(self, message: str) -> None:
        """Print the one line and end this process: the training thread is stuck in a wait that
        cannot be interrupted from Python."""
        if self._stop.is_set():
            return
        print(f"error: {PeerFailure.__name__}: {message}", file=sys.stderr, flush=True)
        os._exit(EXIT_CODE)

    # ---------------------------------------------------------------- reading
    def _read(self, rank: int) -> Optional[bytes]:
        key = KEY_PREFIX + str(rank)
        return self.store.get(key) if self.store.check([key]) else None

    def silent_ranks(self, window: Optional[float] = None) -> list[int]:
        """Ranks whose counter did not move over `window` seconds (several beats) and that did not
        leave on purpose. Raises if the store cannot be read."""
        window = max(3 * self.period, 1.0) if window is None else window
        peers = [r for r in range(self.world_size) if r != self.rank]
        before = {r: self._read(r) for r in peers}
        time.sleep(window)
        return [r for r in peers if before[r] != DONE and self._read(r) == before[r]]

    def explain(self, error: BaseException) -> Optional[PeerFailure]:
        """A PeerFailure naming the ranks behind a failed collective, or None when `error` did not
        come from a collective."""
        if not is_collective_failure(error):
            return None
        operation = failed_operation(error.__traceback__)
        cause = first_line(error)
        try:
            if self.store.check([FAULT_KEY]):
                return PeerFailure(self.store.get(FAULT_KEY).decode())
            missing = self.silent_ranks()
        except Exception:  # noqa: BLE001 - the store went down with its host
            return PeerFailure(f"{self.store_host} did not arrive at {operation} ({cause}); {_FIX}")
        if not missing:
            return PeerFailure(f"{operation} failed ({cause}) although every rank is alive: a rank is "
                               f"in another collective or slower than strategy.timeout_s="
                               f"{self.timeout_s:g}; raise strategy.timeout_s if the ranks are only slow")
        return PeerFailure(f"{_ranks(missing)} did not arrive at {operation} ({cause}): "
                           f"{'it' if len(missing) == 1 else 'they'} stopped or died; {_FIX}")


_FIX = "see that rank's log and host, then resume from the last checkpoint"


def start_heartbeat(timeout: timedelta) -> Optional[Heartbeat]:
    """Start this rank's heartbeat over a connection of its own to the rendezvous store (so its
    waits never queue behind the training thread's); None in a one-process world or when the
    store's address is not in the environment (MASTER_ADDR / MASTER_PORT). Groups created from now
    on get `timeout` too (`bound_new_groups`)."""
    if not dist.is_initialized():
        return None
    bound_new_groups(timeout)
    if dist.get_world_size() == 1:
        return None
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not host or not port:
        return None
    store = dist.TCPStore(host, int(port), is_master=False, timeout=timeout, wait_for_workers=False)
    # torchrun's agent serves the store; otherwise init_process_group started it in rank 0.
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store_host = f"the rendezvous store at {host}:{port}" if agent else "rank 0 (which serves the rendezvous store)"
    return Heartbeat(store, dist.get_rank(), dist.get_world_size(), timeout.total_seconds(),
                     store_host).start()


def is_collective_failure(error: BaseException) -> bool:
    """A torch.distributed error, or a RuntimeError raised inside torch.distributed (gloo raises
    plain RuntimeErrors for timeouts and closed connections)."""
    if isinstance(error, PeerFailure):
        return False
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    if not isinstance(error, RuntimeError):
        return False
    return bool(_BACKEND_ERROR.search(str(error))) or any(
        _is_torch_distributed(f.filename) for f in traceback.extract_tb(error.__traceback__))


# What gloo and NCCL errors say when a wait on a Work object (no torch.distributed frame) fails.
_BACKEND_ERROR = re.compile(r"gloo|nccl|c10d|ProcessGroup|closed by peer|Timed out waiting", re.I)


def failed_operation(tb) -> str:
    """`all_reduce (gradient_reducer.py:140, finish)`: the collective (the innermost
    torch.distributed function; "a collective" when the wait is on an async Work object) and the
    innermost caller outside torch."""
    return _describe(traceback.extract_tb(tb))


def main_thread_operation(thread: threading.Thread) -> str:
    frame = sys._current_frames().get(thread.ident)  # noqa: SLF001 - the only way to see a blocked thread
    return _describe(traceback.extract_stack(frame)) if frame is not None else "an unknown operation"


def _describe(frames: Sequence[traceback.FrameSummary]) -> str:
    """The innermost torch.distributed function (a c10d collective if any) and the innermost
    caller outside torch, from frames ordered outermost first."""
    in_dist = [f for f in frames if _is_torch_distributed(f.filename)]
    collectives = [f for f in in_dist if f.filename.endswith("distributed_c10d.py")]
    callers = [f for f in frames if "/torch/" not in f.filename and "threading.py" not in f.filename]
    op = (collectives or in_dist)[-1].name if in_dist else "a collective"
    if not callers:
        return op
    caller = callers[-1]
    return f"{op} ({os.path.basename(caller.filename)}:{caller.lineno}, {caller.name})"


def _is_torch_distributed(filename: str) -> bool:
    return f"{os.sep}torch{os.sep}distributed{os.sep}" in filename


def _ranks(ranks: Sequence[int]) -> str:
    ranks = sorted(ranks)
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))


__all__ = ["DEFAULT_TIMEOUT_S", "PeerFailure", "Heartbeat", "resolve_timeout", "configure_nccl",
           "bound_new_groups",
           "start_heartbeat", "is_collective_failure", "failed_operation"]
