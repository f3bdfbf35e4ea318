"""Does training quality hold at each precision? A convergence study on a real corpus, on the GPU.

    bash benchmarks/convergence/prepare_corpus.sh      # once, where the package registries are
    python benchmarks/convergence.py --out benchmarks/results/convergence_h100.json \
        --png benchmarks/results/convergence_h100.png

The corpus is Debian's documentation of Python 3.11 and Perl 5.36 tokenized with GPT-2's BPE
(benchmarks/convergence/prepare_corpus.sh); the model a 141M-parameter Llama (d 1024, 8 layers,
GQA 16/4 heads, SwiGLU 2816, tied embeddings); every row trains the same model from the same
initialisation on the same batches for 2,000 steps of 4,096 tokens (about 1.2 epochs) with
warm-up and cosine decay to 10% of the peak rate, so the late, small updates that bf16 weights
lose are in the run. Rows: autocast (the reference) with two seeds (the noise), master weights,
bf16-true (bf16 weights and AdamW states), bf16-true with torchao's stochastically rounded AdamW,
and fp8 tensorwise on master weights. Several rows share the GPU at once (`--concurrent`), so
their tokens/s are comparable with each other only; the speed suites measure speed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MODEL = dict(family="llama", vocab_size=50257, d_model=1024, n_layers=8, n_heads=16, n_kv_heads=4,
             ffn_dim=2816, max_seq_len=512, tie_embeddings=True)
ROWS = {
    "autocast": dict(precision="bf16-mixed", plan=dict(mixed_precision="autocast"), seed=0),
    "autocast, seed 1": dict(precision="bf16-mixed", plan=dict(mixed_precision="autocast"), seed=1),
    "master weights": dict(precision="bf16-mixed", plan=dict(mixed_precision="master_weights"), seed=0),
    "bf16-true": dict(precision="bf16-true", plan={}, seed=0),
    "bf16-true, stochastic rounding": dict(precision="bf16-true", plan={}, seed=0,
                                           optimizer="adamw_bf16_stochastic_round"),
    "fp8 tensorwise on master weights": dict(precision="bf16-mixed", seed=0,
                                             plan=dict(mixed_precision="master_weights", fp8="tensorwise")),
}
REFERENCE, NOISE = "autocast", "autocast, seed 1"


def train_row(name: str, data: str, steps: int, micro_batch: int, seq_len: int, val_every: int,
              val_batches: int, cpu: bool) -> dict[str, Any]:
    """Train one row in this process; return its curves and speed."""
    import lightning as L
    import torch

    import lightning_attn_parallel as lap
    from lightning_attn_parallel.data.documents import DocumentDataModule
    from lightning_attn_parallel.models import ModelConfig

    row = ROWS[name]
    model = dict(MODEL, max_seq_len=seq_len) if not cpu else dict(
        MODEL, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=seq_len)
    L.seed_everything(row["seed"], verbose=False)
    module = lap.CausalLMModule(ModelConfig(**model), lr=6e-4, min_lr_ratio=0.1, warmup_steps=steps // 20,
                                total_steps=steps, weight_decay=0.1, optimizer=row.get("optimizer", "adamw"),
                                loss_chunk_tokens=None if cpu else 4096)
    data_module = DocumentDataModule(path=data, seq_len=seq_len, micro_batch_size=micro_batch,
                                     num_workers=0 if cpu else 2, seed=1234 + row["seed"])

    class Curves(L.Callback):
        def __init__(self) -> None:
            self.train: list[tuple[int, float]] = []
            self.val: list[tuple[int, float]] = []
            self.started = self.tokens = 0.0

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, idx) -> None:
            step = trainer.global_step
            if step == 20:  # after compilation: the steady state
                self.started, self.tokens = time.perf_counter(), 0.0
            if step > 20:
                self.tokens += micro_batch * seq_len
            if step % 10 == 0:
                self.train.append((step, float(outputs["loss"])))

        def on_validation_epoch_end(self, trainer, pl_module) -> None:
            if not trainer.sanity_checking and "val/loss" in trainer.callback_metrics:
                self.val.append((trainer.global_step, float(trainer.callback_metrics["val/loss"])))

    curves = Curves()
    plan = dict(row["plan"], compile="none" if cpu else "block")
    trainer = L.Trainer(accelerator="cpu" if cpu else "gpu", devices=1, precision=row["precision"],
                        strategy=lap.AttnHybridStrategy(plan=lap.ParallelPlan(**plan)), max_steps=steps,
                        val_check_interval=val_every, check_val_every_n_epoch=None,
                        limit_val_batches=val_batches, num_sanity_val_steps=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[curves])
    trainer.fit(module, data_module)
    seconds = time.perf_counter() - curves.started
    return {"name": name, **row, "model": model, "steps": steps, "tokens_per_step": micro_batch * seq_len,
            "train_loss": curves.train, "val_loss": curves.val,
            "final_val_loss": curves.val[-1][1] if curves.val else None,
            "tokens_per_s": curves.tokens / seconds if seconds > 0 else None,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if not cpu else 0.0}


def summarize(results: list[dict[str, Any]]) -> str:
    """The table: final validation loss against the reference, and the goal's verdict."""
    by_name = {r["name"]: r for r in results if r.get("final_val_loss") is not None}
    ref = by_name.get(REFERENCE)
    noise = abs(by_name[NOISE]["final_val_loss"] - ref["final_val_loss"]) if ref and NOISE in by_name else None
    allowed = max(noise or 0.0, 0.003 * ref["final_val_loss"]) if ref else None
    lines = ["| row | final val loss | vs autocast | within noise or 0.3% | tokens/s (shared GPU) | peak GiB |",
             "|---|---|---|---|---|---|"]
    for r in results:
        if r.get("final_val_loss") is None:
            lines.append(f"| {r['name']} | {r.get('error', 'failed')} | | | | |")
            continue
        gap = r["final_val_loss"] - ref["final_val_loss"] if ref else float("nan")
        within = "yes" if ref and abs(gap) <= allowed else "no"
        tps = f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else "n/a"
        lines.append(f"| {r['name']} | {r['final_val_loss']:.4f} | {gap:+.4f} | {within} | {tps} | {r['peak_gib']:.1f} |")
    if allowed is not None:
        lines.append(f"\nseed noise {noise:.4f}; allowed gap max(noise, 0.3% of {ref['final_val_loss']:.4f}) = {allowed:.4f}")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [r for r in results if r.get("val_loss")]  # rows that failed have no curve
    fig, (full, late) = plt.subplots(1, 2, figsize=(13, 4.8))
    for r in results:
        if r.get("val_loss"):
            steps, losses = zip(*r["val_loss"])
            for ax in (full, late):
                ax.plot(steps, losses, marker=".", label=r["name"])
    late_start = max(1, int(0.6 * max(r["steps"] for r in results)))
    late.set_xlim(late_start, max(r["steps"] for r in results))
    tail = [loss for r in results for step, loss in r.get("val_loss", []) if step >= late_start]
    if tail:
        late.set_ylim(min(tail) - 0.02, max(tail) + 0.02)
    full.set_title("validation loss")
    late.set_title("the last 40% of the run (learning rate decayed)")
    for ax in (full, late):
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    full.set_ylabel("loss (nats/token)")
    late.legend(fontsize=8)
    fig.suptitle("141M Llama on Debian's Python and Perl documentation (GPT-2 BPE), 2,000 steps x 4,096 tokens")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(ROOT / "data" / "convergence" / "corpus"))
    parser.add_argument("--out", default=None)
    parser.add_argument("--png", default=None)
    parser.add_argument("--rows", nargs="*", default=list(ROWS))
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--val-every", type=int, default=100)
    parser.add_argument("--val-batches", type=int, default=16)
    parser.add_argument("--concurrent", type=int, default=3, help="rows sharing the GPU at once")
    parser.add_argument("--cpu", action="store_true", help="a tiny model on the CPU (checks the script)")
    parser.add_argument("--work", default=None, help="folder of the rows' own results and logs")
    parser.add_argument("--assemble", action="store_true",
                        help="only gather the finished rows of --work into --out and --png")
    parser.add_argument("--run-row", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--row-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run_row is not None:  # a child: one row
        result = train_row(args.run_row, args.data, args.steps, args.micro_batch, args.seq_len,
                           args.val_every, args.val_batches, args.cpu)
        Path(args.row_out).write_text(json.dumps(result))
        return
    pending, running, results = list(args.rows), [], []
    work = Path(args.work) if args.work else Path(args.out or "convergence.json").with_suffix(".rows")
    work.mkdir(parents=True, exist_ok=True)
    if args.assemble:  # e.g. after a run cut short: what finished
        pending = []
        results = [json.loads(f.read_text()) for f in sorted(work.glob("*.json"))]
    while pending or running:
        while pending and len(running) < args.concurrent:
            name = pending.pop(0)
            out = work / f"{list(ROWS).index(name)}.json"
            cmd = [sys.executable, __file__, "--run-row", name, "--row-out", str(out), "--data", args.data,
                   "--steps", str(args.steps), "--micro-batch", str(args.micro_batch), "--seq-len",
                   str(args.seq_len), "--val-every", str(args.val_every), "--val-batches",
                   str(args.val_batches)] + (["--cpu"] if args.cpu else [])
            log = open(work / f"{list(ROWS).index(name)}.log", "w")
            running.append((name, out, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                                         env={**os.environ, "PYTHONUNBUFFERED": "1"}), log))
        for item in list(running):
            name, out, proc, log = item
            if proc.poll() is None:
                continue
            running.remove(item)
            log.close()
            if proc.returncode == 0 and out.exists():
                results.append(json.loads(out.read_text()))
            else:
                tail = (work / f"{list(ROWS).index(name)}.log").read_text().strip().splitlines()[-3:]
                results.append({"name": name, "error": " / ".join(tail)[-300:]})
            print(f"finished {name}: {results[-1].get('final_val_loss', results[-1].get('error'))}", flush=True)
        time.sleep(2)
    results.sort(key=lambda r: list(ROWS).index(r["name"]))
    print(summarize(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    if args.png:
        plot(results, Path(args.png))


if __name__ == "__main__":
    main()
