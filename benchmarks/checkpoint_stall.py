"""Training stall per checkpoint: a blocking save against an asynchronous one (GPUs).

Every rank holds its FSDP2 shard of the model (one GPU: the whole model) with AdamW's states, and
saves the same checkpoint folder a few times each way:

- blocking: `checkpoint.save_distributed` (torch.distributed.checkpoint, through `<path>.tmp` and
  a rename): training waits for the whole write;
- asynchronous: `async_checkpoint.AsyncSaves` (DCP's async_save, pinned host buffers kept
  between saves): training waits for the copy to host memory only; reported also is how long
  the background write took and the step time while a write was in flight.

The stall is the wall time a training step would wait (CUDA synchronized before and after). The
first asynchronous save also allocates the pinned buffers; its stall is reported apart.

    torchrun --nproc-per-node 1 benchmarks/checkpoint_stall.py --model llama_1b --dir /local/ckpt
    torchrun --nproc-per-node 8 benchmarks/checkpoint_stall.py --model llama3_8b --dir /local/ckpt
    torchrun --nproc-per-node 2 benchmarks/checkpoint_stall.py --model tiny --saves 2   # CPU check
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

from lightning_attn_parallel import checkpoint
from lightning_attn_parallel.async_checkpoint import AsyncSaves
from lightning_attn_parallel.models import ModelConfig, build_model

MODELS = {
    "llama_1b": dict(vocab_size=32000, d_model=2048, n_layers=22, n_heads=32, n_kv_heads=4, ffn_dim=5632),
    "llama3_8b": dict(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336),
    "tiny": dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def setup(args) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.device]:
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(0)
    with torch.device(device):
        model = build_model(ModelConfig(**MODELS[args.model], max_seq_len=args.seq_len))
    if dist.get_world_size() > 1:  # FSDP2 over every rank: each holds and saves its shard
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step(model, optimizer, args, device)  # the optimizer's states exist, as in a real checkpoint
    return model, optimizer, device


def step(model, optimizer, args, device) -> float:
    """One training step's wall time (forward, backward, AdamW)."""
    sync(device)
    start = time.perf_counter()
    ids = torch.randint(0, MODELS[args.model]["vocab_size"], (args.micro_batch, args.seq_len), device=device)
    positions = torch.arange(args.seq_len, device=device).expand_as(ids)
    model.output(model(ids, positions, None)).float().logsumexp(-1).mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync(device)
    return time.perf_counter() - start


def measure(args) -> dict:
    model, optimizer, device = setup(args)
    folder = [args.dir or (tempfile.mkdtemp(prefix="lap-stall-") if dist.get_rank() == 0 else None)]
    dist.broadcast_object_list(folder)  # one folder for every rank
    folder = folder[0]
    path = os.path.join(folder, "ckpt")
    plain_steps = [step(model, optimizer, args, device) for _ in range(args.steps)]
    blocking = []
    for i in range(args.saves):
        sync(device)
        start = time.perf_counter()
        checkpoint.save_distributed(path, model, optimizer, {"step": i})
        sync(device)
        blocking.append(time.perf_counter() - start)
    saves = AsyncSaves()
    stalls, writes, steps_in_flight = [], [], []
    for i in range(args.saves):
        state = {"model": get_model_state_dict(model),
                 "optimizers": {"0": get_optimizer_state_dict(model, optimizer)}}
        sync(device)
        start = time.perf_counter()
        saves.save(path, state, {"step": i}, leader=dist.get_rank() == 0)
        sync(device)
        stalls.append(time.perf_counter() - start)
        while saves.in_flight:  # train while it writes, as a run would
            steps_in_flight.append(step(model, optimizer, args, device))
            saves.poll()
        writes.append(time.perf_counter() - start)
    saves.close()
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    dist.barrier()
    if dist.get_rank() == 0 and not args.dir:
        shutil.rmtree(folder, ignore_errors=True)
    return {"model": args.model, "world_size": dist.get_world_size(), "checkpoint_bytes": size,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "step_s": statistics.median(plain_steps),
            "blocking_stall_s": statistics.median(blocking), "blocking_stall_each_s": blocking,
            "async_first_stall_s": stalls[0],
            "async_stall_s": statistics.median(stalls[1:] or stalls), "async_stall_each_s": stalls,
            "async_write_s": statistics.median(writes),
            "step_s_while_writing": statistics.median(steps_in_flight) if steps_in_flight else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="llama_1b")
    parser.add_argument("--dir", default="", help="checkpoint folder (default: a temporary one)")
    parser.add_argument("--saves", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="plain steps timed first")
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    result = measure(args)
    if dist.get_rank() == 0:
        print(json.dumps(result, indent=2))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=2)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
