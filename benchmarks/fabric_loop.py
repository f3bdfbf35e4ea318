"""The Fabric front-end's speed: a Fabric loop under attn_hybrid on the suite's 1B Llama, to
compare with the Trainer row of the same plan and precision in the `fabric` suite.

    torchrun --nproc-per-node 1 benchmarks/fabric_loop.py --out fabric.json [--tiny]
"""
from __future__ import annotations

import argparse
import json
import time

import lightning as L
import torch

import lightning_attn_parallel as lap
from lightning_attn_parallel.fabric import training_loss
from lightning_attn_parallel.hardware import device_peak_tflops
from lightning_attn_parallel.module import optimizer_groups

LLAMA_1B = dict(vocab_size=32000, d_model=2048, n_layers=22, n_heads=32, n_kv_heads=4, ffn_dim=5632,
                max_seq_len=262144)  # the suite's llama_1b
TINY = dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=256)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--precision", default="bf16-true")
    parser.add_argument("--compile", default="model")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--loss-chunk-tokens", type=int, default=4096)
    args = parser.parse_args()
    cfg = lap.ModelConfig(**(TINY if args.tiny else LLAMA_1B))
    plan = lap.ParallelPlan(compile=args.compile if torch.cuda.is_available() else "none")
    fabric = L.Fabric(strategy=lap.fabric.AttnHybridFabricStrategy(plan=plan), devices=1, precision=args.precision)
    fabric.launch()
    with fabric.init_module():
        model = lap.build_model(cfg)
    model = fabric.setup_module(model)
    optimizer = fabric.setup_optimizers(torch.optim.AdamW(optimizer_groups(model, 0.1), lr=3e-4,
                                                          fused=torch.cuda.is_available() or None))
    tokens = torch.randint(cfg.vocab_size, (args.micro_batch, args.seq_len + 1), device=fabric.device)
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
        loss, _ = training_loss(fabric, model, batch, loss_chunk_tokens=args.loss_chunk_tokens)
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    tokens_per_s = args.steps * args.micro_batch * args.seq_len / elapsed
    tflops = tokens_per_s * model.flops_per_token(args.seq_len) / 1e12  # the project's FLOP count (MFU convention)
    peak = device_peak_tflops(fabric.device, args.precision)
    if fabric.is_global_zero:  # the keys bench.py's table reads, as the Trainer rows give them
        with open(args.out, "w") as out:
            json.dump({"tokens_per_s": tokens_per_s, "tflops_per_gpu": tflops, "mfu": tflops / peak if peak else None,
                       "step_time_s": elapsed / args.steps, "loss": float(loss),
                       "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0,
                       "precision": args.precision, "compile": plan.compile}, out)


if __name__ == "__main__":
    main()
