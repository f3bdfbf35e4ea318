"""Dynamic context-parallel degree against a fixed cp on the same document mix (GPUs).

Every rank of one CP group (the whole world: cp = number of GPUs, dp = 1) trains the same
model on the same packed windows of the heavy-tailed mix of `cp_document_balance.py`, twice:

- fixed: `cp_min_seq_len=0`, every micro-batch split over all cp ranks;
- dynamic: `cp_min_seq_len=M`, each micro-batch gets the degree its longest document needs
  (1, 2, 4, ... up to cp) and the CP group works as sub-groups on its rows.

Micro-batches hold cp windows (so degree 1 can give each rank one), documents masked, the
document-balanced split under both. Reported: useful tokens/s (tokens with a label, whole
group), step time, and how often each degree ran. Forward, backward and the gradient average
over the group are timed; the optimizer is left out (the same in both).

    torchrun --nproc-per-node 2 benchmarks/cp_dynamic_degree.py --seq-len 16384
    torchrun --nproc-per-node 8 benchmarks/cp_dynamic_degree.py --seq-len 32768 --min-seq-len 4096
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from collections import Counter

import torch
import torch.distributed as dist

from cp_document_balance import document_mix, pack
from lightning_attn_parallel.mesh import build_meshes
from lightning_attn_parallel.models import ModelConfig, build_model
from lightning_attn_parallel.models.loss import IGNORE_INDEX, cross_entropy_sum
from lightning_attn_parallel.parallel.context_parallel import apply_context_parallel
from lightning_attn_parallel.parallel.cp_batch import ContextParallelBatcher
from lightning_attn_parallel.plan import ParallelPlan

LLAMA_1B = dict(vocab_size=32000, d_model=2048, n_layers=22, n_heads=32, n_kv_heads=4,
                ffn_dim=5632, rope_theta=10000.0)
TINY = dict(vocab_size=32000, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128)


def window_batch(spans: list[tuple[int, int]], seq_len: int, vocab: int,
                 g: torch.Generator) -> dict[str, torch.Tensor]:
    """One packed window of random tokens with the given document spans."""
    ids = torch.empty(seq_len, dtype=torch.long)
    pos = torch.empty(seq_len, dtype=torch.long)
    labels = torch.randint(0, vocab, (seq_len,), generator=g)
    for d, (a, b) in enumerate(spans):
        ids[a:b] = d
        pos[a:b] = torch.arange(b - a)
        labels[b - 1] = IGNORE_INDEX  # nothing predicted across documents
    return {"input_ids": torch.randint(0, vocab, (seq_len,), generator=g), "labels": labels,
            "positions": pos, "document_ids": ids}


def batches(args, cp: int) -> list[dict[str, torch.Tensor]]:
    windows = pack(document_mix(args.seq_len * cp * args.steps, args.seed), args.seq_len,
                   cp * args.steps)
    g = torch.Generator().manual_seed(args.seed)
    rows = [window_batch(spans, args.seq_len, LLAMA_1B["vocab_size"], g) for spans in windows]
    return [{key: torch.stack([r[key] for r in rows[i * cp:(i + 1) * cp]]) for key in rows[0]}
            for i in range(args.steps)]


def run(args, meshes, min_seq_len: int, data, device: torch.device) -> dict:
    rank = dist.get_rank()
    plan = dataclasses.replace(meshes.plan, cp_min_seq_len=min_seq_len)
    torch.manual_seed(0)
    cfg = ModelConfig(**(TINY if args.tiny else LLAMA_1B), max_seq_len=args.seq_len)
    model = build_model(cfg).to(device)
    model = apply_context_parallel(model, meshes.group("cp"), args.kernel)
    batcher = ContextParallelBatcher(model, meshes, plan)
    degrees, times, useful = Counter(), [], 0
    for step, batch in enumerate(data):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        synchronize(device)
        start = time.perf_counter()
        local = batcher.prepare_batch(batch)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            hidden = model(local.input_ids, local.positions, local.document_ids)
            loss_sum, _ = cross_entropy_sum(hidden, model.output, local.labels, 8192)
        (loss_sum / local.num_tokens * local.loss_scale).backward()
        for p in model.parameters():
            dist.all_reduce(p.grad)
        synchronize(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
            useful += int((batch["labels"] != IGNORE_INDEX).sum())
            degrees[batcher.last_degree] += 1
        model.zero_grad(set_to_none=True)
    seconds = sum(times)
    return {"mode": "dynamic" if min_seq_len else "fixed", "min_seq_len": min_seq_len,
            "useful_tokens_per_s": useful / seconds, "step_s": seconds / len(times),
            "degrees": dict(sorted(degrees.items())),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0,
            "rank": rank}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=16384)
    parser.add_argument("--min-seq-len", type=int, default=4096,
                        help="dynamic mode: a rank holds less than this much of the longest document")
    parser.add_argument("--kernel", default="allgather", choices=("allgather", "ring", "ulysses"))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="")
    parser.add_argument("--tiny", action="store_true", help="a tiny model on CPU/gloo (smoke check)")
    args = parser.parse_args()
    if args.tiny:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    else:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    world = dist.get_world_size()
    plan = ParallelPlan(cp=world, cp_kernel=args.kernel, cp_min_seq_len=1).resolve(world)
    meshes = build_meshes(plan, device.type, ranks_per_node=int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    data = batches(args, world)
    rows = [run(args, meshes, 0, data, device), run(args, meshes, args.min_seq_len, data, device)]
    if dist.get_rank() == 0:
        base = rows[0]["useful_tokens_per_s"]
        print(f"| mode | cp | seq_len | useful tokens/s | step s | degrees run | peak GiB | vs fixed |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['mode']} | {dist.get_world_size()} | {args.seq_len} "
                  f"| {r['useful_tokens_per_s']:,.0f} | {r['step_s']:.3f} | {r['degrees']} "
                  f"| {r['peak_gib']:.1f} | {r['useful_tokens_per_s'] / base:.3f}x |")
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
