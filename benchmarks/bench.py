"""Side-by-side GPU benchmarks: attn_hybrid against Lightning's built-in strategies.

The suites are data (benchmarks/suites.yaml); this file is their one runner. Each row trains the
same model on the same synthetic tokens in its own process (so peak memory is its own), and one
table compares them: tokens/s, TFLOP/s per GPU, MFU, peak memory, and the ratio to the first row.
MFU follows docs/ARCHITECTURE.md ("MFU"): model FLOPs per token x tokens/s per GPU / the card's
datasheet peak at the run's precision (lightning_attn_parallel.hardware).

    python benchmarks/bench.py strategies          # or any suite of suites.yaml
    python benchmarks/bench.py multi_gpu --only 0 2
Append `--out FILE.json` to keep the raw results.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SUITES_FILE = Path(__file__).with_name("suites.yaml")


def load_suites(path: Path = SUITES_FILE) -> tuple[dict[str, dict], dict[str, dict]]:
    """(models by name, suites by name) of the suites file."""
    import yaml

    data = yaml.safe_load(path.read_text())
    return data["models"], data["suites"]


@dataclass
class Config:
    name: str
    strategy: str = "attn_hybrid"  # attn_hybrid | auto | ddp | fsdp | model_parallel
    precision: str = "bf16-mixed"
    micro_batch: int = 8
    seq_len: int = 2048
    steps: int = 12
    warmup: int = 4
    compile: bool = False
    loss_chunk_tokens: Optional[int] = None
    checkpointing: str = "none"
    offload: bool = False
    callbacks: bool = False
    grouped_gemm: bool = True
    devices: int = 1
    plan: dict = field(default_factory=dict)  # extra ParallelPlan fields, e.g. {"tp": 2}
    model: dict = field(default_factory=dict)  # ModelConfig fields (a row names one of `models:`)


def suite(name: str, path: Path = SUITES_FILE) -> tuple[list[Config], bool]:
    """(the rows of suite `name` as Configs, whether to add the planner's predictions)."""
    models, suites = load_suites(path)
    if name not in suites:
        print(f"error: unknown suite {name!r}: use one of {', '.join(suites)} (or add it to "
              f"{path.name})", file=sys.stderr)
        raise SystemExit(2)
    configs = []
    for row in suites[name]["rows"]:
        row = dict(row)
        model = row.pop("model", "llama_1b")
        configs.append(Config(**row, model=dict(models[model])))
    return configs, bool(suites[name].get("predict", False))


# ---------------------------------------------------------------------------- one run
def run_one(cfg: Config) -> dict[str, Any]:
    """Train `cfg` for a few steps in this process and measure the steady-state window."""
    import lightning as L
    import torch
    from torch.utils.data import DataLoader, Dataset

    import lightning_attn_parallel as lap
    from lightning_attn_parallel.hardware import device_peak_tflops
    from lightning_attn_parallel.models import ModelConfig

    torch.backends.cuda.matmul.allow_tf32 = True

    class RandomTokens(Dataset):
        def __len__(self) -> int:
            return 10**6

        def __getitem__(self, i: int) -> dict:
            g = torch.Generator().manual_seed(i)
            x = torch.randint(cfg.model["vocab_size"], (cfg.seq_len + 1,), generator=g)
            return {"input_ids": x[:-1], "labels": x[1:]}

    class Timer(L.Callback):
        def __init__(self) -> None:
            self.start = self.end = None
            self.static = 0

        def on_train_batch_start(self, trainer, module, batch, idx) -> None:
            if idx == cfg.warmup:
                torch.cuda.synchronize()
                # after an optimizer step and before this step's forward: parameters, gradient
                # buffers and optimizer states only (the planner's static memory)
                self.static = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, module, out, batch, idx) -> None:
            if idx == cfg.steps - 1:
                torch.cuda.synchronize()
                self.end = time.perf_counter()

    model_cfg = ModelConfig(**cfg.model)

    class Module(lap.CausalLMModule):
        def configure_model(self) -> None:
            super().configure_model()
            if cfg.strategy == "model_parallel":  # what a Lightning user writes for FSDP2
                from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

                mesh = self.device_mesh["data_parallel"]
                policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                for block in self.model.blocks:
                    fully_shard(block, mesh=mesh, mp_policy=policy)
                fully_shard(self.model, mesh=mesh, mp_policy=policy)
            if cfg.compile and cfg.strategy != "attn_hybrid":
                for block in self.model.blocks:
                    block.compile()
            for sub in self.model.modules():  # baselines: same expert kernel choice
                if hasattr(sub, "use_grouped_mm"):
                    sub.use_grouped_mm = cfg.grouped_gemm

    module = Module(model_cfg, lr=1e-4, warmup_steps=2, total_steps=1000,
                    loss_chunk_tokens=cfg.loss_chunk_tokens)
    builder = STRATEGIES.get(cfg.strategy)
    strategy: Any = builder(cfg) if builder is not None else cfg.strategy  # a Lightning name
    callbacks: list = [Timer()]
    if cfg.callbacks:
        from lightning_attn_parallel.callbacks import default_callbacks

        callbacks += default_callbacks(log_every_n_steps=5, report=False)
    trainer = L.Trainer(accelerator="gpu", devices=cfg.devices, strategy=strategy, precision=cfg.precision,
                        max_steps=cfg.steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                        limit_val_batches=0)
    loader = DataLoader(RandomTokens(), batch_size=cfg.micro_batch, num_workers=2)
    trainer.fit(module, loader)
    timer = callbacks[0]
    seconds = timer.end - timer.start
    # micro_batch is per data-parallel rank; tensor- and context-parallel ranks share samples
    dp = cfg.devices // (cfg.plan.get("tp", 1) * cfg.plan.get("cp", 1))
    tokens = (cfg.steps - cfg.warmup) * cfg.micro_batch * cfg.seq_len * dp
    with torch.device("meta"):
        from lightning_attn_parallel.models import build_model

        flops_per_token = build_model(model_cfg).flops_per_token(cfg.seq_len)
    tps = tokens / seconds
    peak = device_peak_tflops(torch.device("cuda", 0), cfg.precision)
    per_gpu = tps / cfg.devices
    result = {"tokens_per_s": tps, "tokens_per_s_per_gpu": per_gpu,
              "tflops_per_gpu": flops_per_token * per_gpu / 1e12,
              "mfu": flops_per_token * per_gpu / (peak * 1e12) if peak else None,
              "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
              "static_gib": timer.static / 2**30,
              "reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
              "flops_per_token": flops_per_token, "device": torch.cuda.get_device_name(0)}
    logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("throughput/")}
    if logged:
        result["callback_metrics"] = logged
    return result


# ---------------------------------------------------------------------------- strategies
def _attn_hybrid(cfg: Config) -> Any:
    import lightning_attn_parallel as lap

    plan = lap.ParallelPlan(compile=cfg.compile, activation_checkpointing=cfg.checkpointing,
                            offload_activations=cfg.offload, grouped_gemm=cfg.grouped_gemm, **cfg.plan)
    return lap.AttnHybridStrategy(plan=plan)


def _model_parallel(cfg: Config) -> Any:
    """Lightning's ModelParallelStrategy; the module applies fully_shard in configure_model."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    return ModelParallelStrategy()


def _fsdp(cfg: Config) -> Any:
    from lightning.pytorch.strategies import FSDPStrategy

    from lightning_attn_parallel.models.llama import TransformerBlock

    return FSDPStrategy(auto_wrap_policy={TransformerBlock}, sharding_strategy="FULL_SHARD")


# A row's `strategy` names one of these, or is passed to the Trainer as a Lightning name.
STRATEGIES = {"attn_hybrid": _attn_hybrid, "model_parallel": _model_parallel, "fsdp": _fsdp}


# ---------------------------------------------------------------------------- planner
def predicted(cfg: Config, device: str) -> dict[str, float]:
    """The planner's memory and speed for `cfg` on the card named `device`."""
    from lightning_attn_parallel.models import ModelConfig
    from lightning_attn_parallel.plan import ParallelPlan
    from lightning_attn_parallel.planning import ClusterSpec, estimate_memory, estimate_time, gpu_spec

    gpu = gpu_spec(device)
    model_cfg = ModelConfig(**cfg.model)
    plan = ParallelPlan(activation_checkpointing=cfg.checkpointing, compile=cfg.compile,
                        grouped_gemm=cfg.grouped_gemm).resolve(1)
    mem = estimate_memory(model_cfg, plan, cfg.micro_batch, cfg.seq_len, cfg.precision, gpu,
                          loss_chunk_tokens=cfg.loss_chunk_tokens)
    timing = estimate_time(model_cfg, plan, ClusterSpec(1, 1), gpu, cfg.micro_batch, cfg.seq_len,
                           cfg.precision, loss_chunk_tokens=cfg.loss_chunk_tokens)
    return {"pred_peak_gib": mem.allocated / 2**30, "pred_static_gib": mem.static / 2**30,
            "pred_tokens_per_s": timing.tokens_per_s}


def table(rows: list[tuple[Config, dict]]) -> str:
    base = next((r for _, r in rows if "tokens_per_s" in r), None)
    lines = ["| config | tokens/s | tokens/s/GPU | TFLOP/s/GPU | MFU | peak GiB | vs first |",
             "|---|---|---|---|---|---|---|"]
    for cfg, r in rows:
        if "tokens_per_s" not in r:
            lines.append(f"| {cfg.name} | {r.get('error', 'failed')} | | | | | |")
            continue
        ratio = r["tokens_per_s"] / base["tokens_per_s"]
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
        lines.append(f"| {cfg.name} | {r['tokens_per_s']:,.0f} | {r.get('tokens_per_s_per_gpu', r['tokens_per_s']):,.0f} | "
                     f"{r['tflops_per_gpu']:.0f} | {mfu} | {r['peak_gib']:.1f} | {ratio:.3f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("suite")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--out")
    parser.add_argument("--only", type=int, nargs="*")
    args = parser.parse_args()
    if args.one:  # child process: one configuration
        cfg = Config(**json.loads(args.one))
        print("RESULT " + json.dumps(run_one(cfg)), flush=True)
        return
    configs, predict = suite(args.suite.removeprefix("suite="))
    if args.only:
        configs = [configs[i] for i in args.only]
    rows = []
    for cfg in configs:
        proc = subprocess.run([sys.executable, __file__, "x", "--one", json.dumps(asdict(cfg))],
                              capture_output=True, text=True, cwd=ROOT)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if lines:
            result = json.loads(lines[-1][7:])
        else:
            tail = proc.stderr.strip().splitlines()[-3:]
            oom = "out of memory" in proc.stderr.lower()
            result = {"error": "out of memory" if oom else " / ".join(tail)[-300:]}
        if predict and "tokens_per_s" in result:
            try:  # a planner error must not lose the measurement
                result.update(predicted(cfg, result["device"]))
            except Exception as err:  # noqa: BLE001
                result["prediction_error"] = f"{type(err).__name__}: {err}"
        rows.append((cfg, result))
        print(cfg.name, json.dumps(result), flush=True)
        if args.out:  # after every configuration, so a run cut short keeps what it measured
            Path(args.out).write_text(json.dumps([[asdict(c), r] for c, r in rows], indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
