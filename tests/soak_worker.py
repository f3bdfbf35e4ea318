"""One rank of the kill soak (tests/test_kill_soak.py): a small data-parallel model trained on two
gloo ranks with a checkpoint after every step, alternately blocking (checkpoint.save_distributed)
and asynchronous (async_checkpoint.AsyncSaves), resuming from ROOT/ckpt when it exists.

    train(root, total_steps, rank, port)   # in a process of its own (the test forks them)

Before each phase this rank writes it to ROOT/phase-rank<R> ("step <n>", "sync-save <n>",
"async-save <n>", "step <n> async-in-flight" while the previous step's save is being written), so
the test can kill it inside the phase it wants. At
the end it writes its final parameters to ROOT/final-rank<R>.pt.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

from lightning_attn_parallel import checkpoint
from lightning_attn_parallel.async_checkpoint import AsyncSaves


def phase(root: Path, text: str) -> None:
    (root / f"phase-rank{dist.get_rank()}").write_text(text)


def batch(step: int, rank: int) -> torch.Tensor:
    return torch.randn(8, 64, generator=torch.Generator().manual_seed(1000 * step + rank))


def train(root: Path, total: int, rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    path = root / "ckpt"
    step = 0
    if path.exists():
        model(batch(0, rank)).sum().backward()  # optimizer states exist before they are loaded
        optimizer.step()
        optimizer.zero_grad()
        step = checkpoint.load_distributed(path, model, optimizer)["step"]
    saves = AsyncSaves()
    while step < total:
        step += 1
        phase(root, f"step {step}" + (" async-in-flight" if saves.in_flight else ""))
        saves.poll()
        loss = (model(batch(step, rank)) ** 2).mean()
        loss.backward()
        for p in model.parameters():
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()
        optimizer.step()
        optimizer.zero_grad()
        if step % 2:
            phase(root, f"sync-save {step}")
            saves.wait()
            checkpoint.save_distributed(path, model, optimizer, {"step": step})
        else:
            phase(root, f"async-save {step}")
            state = {"model": get_model_state_dict(model),
                     "optimizers": {"0": get_optimizer_state_dict(model, optimizer)}}
            saves.save(path, state, {"step": step}, leader=rank == 0)
    saves.close()
    phase(root, "done")
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, root / f"final-rank{rank}.pt")
    dist.destroy_process_group()
