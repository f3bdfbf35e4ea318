"""Run a function on N gloo processes on the CPU and collect what each rank returns.

Parity tests compare those results with one process on the same global batch.
"""
from __future__ import annotations

import io
import os
import socket
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Ranks are forked from a server that has imported torch, Lightning and the package once (per
# test session): starting a rank then costs milliseconds, where a spawned one spent about 6 s of
# a 2-core CPU on imports before its first collective. Each rank still gets its parent's
# current environment (the server's is the one it started with), but what torch and Lightning
# read from the environment at import time comes from the first call's.
CONTEXT = mp.get_context("forkserver")
CONTEXT.set_forkserver_preload(["torch", "lightning", "lightning_attn_parallel",
                                "lightning_attn_parallel.async_checkpoint"])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue, environ: dict) -> None:
    os.environ.clear()
    os.environ.update(environ)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        # Serialise to bytes: tensors put on a torch queue are shared through file descriptors
        # that vanish when this process exits.
        buffer = io.BytesIO()
        torch.save(result, buffer)
        queue.put((rank, "ok", buffer.getvalue()))
    except BaseException:  # noqa: BLE001 - report any failure to the parent test
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout: float = 240.0) -> list[Any]:
    """Spawn `world_size` processes running fn(rank, world_size, *args); return results by rank.

    `fn` must be a module-level function (it is pickled). Results must be picklable (move
    tensors to CPU and detach them).
    """
    queue = CONTEXT.Queue()
    port = free_port()
    procs = [CONTEXT.Process(target=_worker, args=(r, world_size, port, fn, args, queue, dict(os.environ)))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors = []
    for _ in range(world_size):
        try:
            rank, status, payload = queue.get(timeout=timeout)
        except Exception:  # queue.Empty: a worker hung or died without reporting
            for p in procs:
                p.kill()
            raise AssertionError(f"distributed workers did not finish within {timeout}s")
        if status == "ok":
            results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
        else:
            errors.append(f"rank {rank}:\n{payload}")
    for p in procs:
        p.join(timeout)
    if errors:
        raise AssertionError("distributed worker failed:\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, name: str = "") -> None:
    """Relative error of the whole tensor (norm of difference / norm of reference) below rtol."""
    actual = actual.detach().double()
    expected = expected.detach().double()
    denom = expected.norm().clamp_min(1e-12)
    err = (actual - expected).norm() / denom
    assert err < rtol, f"{name}: relative error {err:.3e} >= {rtol:.0e}"
