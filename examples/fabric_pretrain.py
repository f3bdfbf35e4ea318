"""Pretrain the tiny recipe with a Lightning Fabric loop under attn_hybrid (LitGPT-style).

    python examples/fabric_pretrain.py                      # CPU, 1 process
    python examples/fabric_pretrain.py --devices 2 --plan '{"dp_shard": 2}' --steps 20
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import lightning as L
import torch
import yaml
from torch.utils.data import DataLoader

import lightning_attn_parallel as lap
from lightning_attn_parallel.callbacks.fabric_metrics import FabricThroughput
from lightning_attn_parallel.data.corpus import build_embedded_corpus
from lightning_attn_parallel.data.datamodule import TokenWindows, open_tokens
from lightning_attn_parallel.fabric import training_loss
from lightning_attn_parallel.module import optimizer_groups

TINY = Path(lap.__file__).parent / "conf" / "model" / "tiny.yaml"  # the tiny recipe's model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--plan", default="{}", help="ParallelPlan fields as JSON")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--accumulate", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--log-every", type=int, default=5, help="optimizer steps per throughput window")
    parser.add_argument("--out", default="runs/fabric_pretrain")
    parser.add_argument("--data-cache", default="~/.cache/lightning_attn_parallel")
    args = parser.parse_args()

    strategy = lap.fabric.AttnHybridFabricStrategy(plan=lap.ParallelPlan(**json.loads(args.plan)))
    fabric = L.Fabric(accelerator="cpu" if not torch.cuda.is_available() else "auto", devices=args.devices,
                      strategy=strategy, precision=args.precision,
                      loggers=L.fabric.loggers.CSVLogger(args.out, name="logs"))
    fabric.launch()
    fabric.seed_everything(0)

    config = lap.ModelConfig(**yaml.safe_load(TINY.read_text()))
    with fabric.init_module(empty_init=False):
        model = lap.build_model(config)
    model = fabric.setup_module(model)
    optimizer = fabric.setup_optimizers(torch.optim.AdamW(optimizer_groups(model, 0.1), lr=3e-3, betas=(0.9, 0.95)))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 5) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))))

    tokens = open_tokens(build_embedded_corpus(Path(args.data_cache).expanduser()), "uint8")  # stdlib sources as bytes
    loader = fabric.setup_dataloaders(DataLoader(TokenWindows(tokens, args.seq_len), batch_size=args.micro_batch,
                                                 shuffle=True, drop_last=True))
    metrics = FabricThroughput(fabric, model, log_every_n_steps=args.log_every)
    step, batches = 0, iter(loader)
    while step < args.steps:
        for micro in range(args.accumulate):
            try:
                batch = next(batches)
            except StopIteration:
                batches = iter(loader)
                batch = next(batches)
            with fabric.no_backward_sync(model, enabled=micro < args.accumulate - 1):
                loss, logged = training_loss(fabric, model, batch)  # cp: lays the batch out
                fabric.backward(loss / args.accumulate)
        grad_norm = fabric.clip_gradients(model, optimizer, max_norm=1.0)
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
        step += 1
        metrics.step_end(step)
        fabric.log_dict({"train/loss": float(logged), "train/grad_norm": float(grad_norm)}, step=step)
        fabric.print(f"step {step}: loss {float(logged):.4f}")
    fabric.save(Path(args.out) / "final", {"model": model, "optimizer": optimizer,
                                          "lr_schedulers": [schedule.state_dict()], "global_step": step})
    fabric.logger.finalize("success")


if __name__ == "__main__":
    main()
