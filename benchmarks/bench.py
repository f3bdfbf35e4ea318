"""Side-by-side GPU benchmarks: attn_hybrid against Lightning's built-in strategies.

Each configuration trains the same model on the same synthetic tokens in its own process (so
peak memory is its own), and one table compares them: tokens/s, TFLOP/s per GPU, MFU (FLOPs per
token by TorchTitan's convention, DESIGN section 5), peak memory, and the ratio to the first row.

    python benchmarks/bench.py suite=strategies            # issue: foundation
    python benchmarks/bench.py suite=long_context          # longest sequence per memory lever
    python benchmarks/bench.py suite=moe                   # grouped GEMM vs per-expert loop
    python benchmarks/bench.py suite=callbacks             # observability overhead
    python benchmarks/bench.py suite=planner_fit           # planner calibration set (fitted)
    python benchmarks/bench.py suite=planner_check         # planner validation set (predicted first)
    python benchmarks/bench.py suite=sharding              # FSDP/ModelParallel baselines vs ours, 1 GPU
    python benchmarks/bench.py suite=planner_moe_check     # planner on MoE runs (predicted first)
    python benchmarks/bench.py suite=multi_gpu             # 2 GPUs: DDP vs reducer, FSDP2, TP, CP
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

LLAMA_1B = dict(family="llama", vocab_size=32000, d_model=2048, n_layers=22, n_heads=32, n_kv_heads=4,
                ffn_dim=5632, max_seq_len=262144)
# DeepSeek-V2-Lite's widths (MLA, 64 routed + 2 shared experts, top-6) cut to 4 layers to fit one GPU.
V2_LITE_CUT = dict(family="deepseek", attention="mla", vocab_size=102400, d_model=2048, n_layers=4,
                   n_heads=16, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128,
                   qk_rope_head_dim=64, v_head_dim=128, ffn_dim=10944, max_seq_len=4096,
                   n_routed_experts=64, n_shared_experts=2, moe_top_k=6, moe_ffn_dim=1408,
                   first_k_dense_replace=1, norm_eps=1e-6)
PEAK_BF16 = 989e12


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
    plan: dict = field(default_factory=dict)  # extra ParallelPlan degrees, e.g. {"tp": 2}
    model: dict = field(default_factory=lambda: dict(LLAMA_1B))


# ---------------------------------------------------------------------------- one run
def run_one(cfg: Config) -> dict[str, Any]:
    """Train `cfg` for a few steps in this process and measure the steady-state window."""
    import lightning as L
    import torch
    from torch.utils.data import DataLoader, Dataset

    import lightning_attn_parallel as lap
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
    if cfg.strategy == "attn_hybrid":
        plan = lap.ParallelPlan(compile=cfg.compile, activation_checkpointing=cfg.checkpointing,
                                offload_activations=cfg.offload, grouped_gemm=cfg.grouped_gemm, **cfg.plan)
        strategy: Any = lap.AttnHybridStrategy(plan=plan)
    elif cfg.strategy == "model_parallel":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy()
    elif cfg.strategy == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        from lightning_attn_parallel.models.llama import TransformerBlock

        strategy = FSDPStrategy(auto_wrap_policy={TransformerBlock}, sharding_strategy="FULL_SHARD")
    else:
        strategy = cfg.strategy
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
    per_gpu = tps / cfg.devices
    result = {"tokens_per_s": tps, "tokens_per_s_per_gpu": per_gpu,
              "tflops_per_gpu": flops_per_token * per_gpu / 1e12,
              "mfu": flops_per_token * per_gpu / PEAK_BF16,
              "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
              "static_gib": timer.static / 2**30,
              "reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
              "flops_per_token": flops_per_token, "device": torch.cuda.get_device_name(0)}
    logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("throughput/")}
    if logged:
        result["callback_metrics"] = logged
    return result


# ---------------------------------------------------------------------------- suites
def suite(name: str) -> list[Config]:
    if name == "strategies":
        return [
            Config("lightning single-device, eager", strategy="auto"),
            Config("lightning DDP (1 GPU), eager", strategy="ddp"),
            Config("attn_hybrid, eager", strategy="attn_hybrid"),
            Config("lightning single-device + compile", strategy="auto", compile=True, steps=14, warmup=6),
            Config("attn_hybrid + compile", compile=True, steps=14, warmup=6),
            Config("attn_hybrid best: compile, chunked loss, bf16-true", compile=True,
                   loss_chunk_tokens=8192, precision="bf16-true", steps=14, warmup=6),
            Config("attn_hybrid best: compile, chunked loss, bf16-mixed, mb 12", compile=True,
                   loss_chunk_tokens=8192, micro_batch=12, steps=14, warmup=6),
        ]
    if name == "long_context":
        lever = dict(micro_batch=1, loss_chunk_tokens=4096)
        return [
            Config("lightning single-device 16k", strategy="auto", micro_batch=1, seq_len=16384, steps=5, warmup=2),
            Config("lightning single-device 32k", strategy="auto", micro_batch=1, seq_len=32768, steps=4, warmup=2),
            Config("attn_hybrid selective AC + chunked loss 16k", seq_len=16384, checkpointing="selective",
                   steps=5, warmup=2, **lever),
            Config("attn_hybrid selective AC + chunked loss 32k", seq_len=32768, checkpointing="selective",
                   steps=4, warmup=2, **lever),
            Config("attn_hybrid block AC + chunked loss 64k", seq_len=65536, checkpointing="block",
                   steps=3, warmup=1, **lever),
            Config("attn_hybrid block AC + chunked loss 128k", seq_len=131072, checkpointing="block",
                   steps=3, warmup=1, **lever),
        ]
    if name == "moe":
        moe = dict(V2_LITE_CUT)
        return [
            Config("V2-Lite cut, per-expert loop", grouped_gemm=False, micro_batch=4, seq_len=2048, model=moe),
            Config("V2-Lite cut, grouped GEMM", grouped_gemm=True, micro_batch=4, seq_len=2048, model=moe),
            Config("V2-Lite cut, lightning single-device (loop)", strategy="auto", grouped_gemm=False,
                   micro_batch=4, seq_len=2048, model=moe),
        ]
    if name == "multi_gpu":
        return [
            Config("attn_hybrid DP, 1 GPU", steps=10),
            Config("lightning DDP, 2 GPUs", strategy="ddp", devices=2, steps=10),
            Config("attn_hybrid DP (bucketed reducer), 2 GPUs", devices=2, steps=10),
            Config("attn_hybrid FSDP2 dp_shard=2, 2 GPUs", devices=2, plan={"dp_shard": 2}, steps=10),
            Config("attn_hybrid TP attention tp=2, 2 GPUs", devices=2, plan={"tp": 2}, steps=10),
            Config("attn_hybrid cp=2 ring, 64k, block AC, 2 GPUs", devices=2, micro_batch=1, seq_len=65536,
                   checkpointing="block", loss_chunk_tokens=4096, plan={"cp": 2, "cp_kernel": "ring"},
                   steps=4, warmup=2),
            Config("attn_hybrid cp=2 allgather, 64k, block AC, 2 GPUs", devices=2, micro_batch=1,
                   seq_len=65536, checkpointing="block", loss_chunk_tokens=4096,
                   plan={"cp": 2, "cp_kernel": "allgather"}, steps=4, warmup=2),
            Config("attn_hybrid cp=2 ring, 128k, block AC, 2 GPUs", devices=2, micro_batch=1,
                   seq_len=131072, checkpointing="block", loss_chunk_tokens=4096,
                   plan={"cp": 2, "cp_kernel": "ring"}, steps=4, warmup=2),
        ]
    if name == "callbacks":
        return [Config("attn_hybrid, callbacks off", steps=24, warmup=4),
                Config("attn_hybrid, callbacks on", callbacks=True, steps=24, warmup=4)]
    if name == "sharding":  # one GPU: sharding itself is a no-op, the wrappers' cost is not
        return [
            Config("lightning single-device", strategy="auto"),
            Config("lightning FSDPStrategy (FSDP1, full shard), 1 GPU", strategy="fsdp"),
            Config("lightning ModelParallelStrategy (fully_shard per block), 1 GPU", strategy="model_parallel",
                   precision="bf16-true"),
            Config("attn_hybrid (replicated, bucketed reducer), 1 GPU"),
            Config("attn_hybrid bf16-true, 1 GPU", precision="bf16-true"),
        ]
    if name == "planner_fit":  # the measurements the planner's constants are fitted to
        return [
            Config("fit: mb8 s2048 none bf16-mixed", micro_batch=8),
            Config("fit: mb4 s2048 block bf16-mixed", micro_batch=4, checkpointing="block"),
            Config("fit: mb1 s16384 selective chunked bf16-mixed", micro_batch=1, seq_len=16384,
                   checkpointing="selective", loss_chunk_tokens=4096, steps=8, warmup=3),
            Config("fit: mb2 s4096 none bf16-true", micro_batch=2, seq_len=4096, precision="bf16-true"),
            Config("fit: mb8 s2048 none bf16-mixed compile", micro_batch=8, compile=True, steps=14, warmup=6),
            Config("fit: mb1 s32768 block chunked bf16-mixed", micro_batch=1, seq_len=32768,
                   checkpointing="block", loss_chunk_tokens=4096, steps=6, warmup=2),
            Config("fit: mb4 s4096 attention bf16-mixed", micro_batch=4, seq_len=4096,
                   checkpointing="attention"),
        ]
    if name == "planner_check":  # fresh configurations, predicted before they were measured
        return [
            Config("check: mb6 s2048 selective bf16-mixed", micro_batch=6, checkpointing="selective"),
            Config("check: mb2 s8192 block chunked bf16-true", micro_batch=2, seq_len=8192,
                   checkpointing="block", loss_chunk_tokens=4096, precision="bf16-true"),
            Config("check: mb1 s16384 none chunked bf16-mixed", micro_batch=1, seq_len=16384,
                   loss_chunk_tokens=4096, steps=8, warmup=3),
            Config("check: mb4 s2048 none bf16-true compile", micro_batch=4, precision="bf16-true",
                   compile=True, steps=14, warmup=6),
            Config("check: mb16 s1024 block bf16-mixed", micro_batch=16, seq_len=1024, checkpointing="block"),
            Config("check: mb2 s8192 selective bf16-mixed", micro_batch=2, seq_len=8192,
                   checkpointing="selective"),
        ]
    if name == "planner_moe_check":  # MoE runs the planner's expert constants never saw
        moe = dict(V2_LITE_CUT)
        return [
            Config("moe check: mb4 s2048 grouped bf16-mixed", micro_batch=4, model=moe),
            Config("moe check: mb2 s4096 grouped bf16-mixed", micro_batch=2, seq_len=4096, model=moe),
            Config("moe check: mb8 s1024 grouped bf16-mixed", micro_batch=8, seq_len=1024, model=moe),
            Config("moe check: mb4 s2048 grouped bf16-true", micro_batch=4, precision="bf16-true", model=moe),
        ]
    if name == "planner":
        return [
            Config("mb8 s2048 none bf16-mixed", micro_batch=8),
            Config("mb4 s2048 block bf16-mixed", micro_batch=4, checkpointing="block"),
            Config("mb2 s4096 selective bf16-true", micro_batch=2, seq_len=4096, checkpointing="selective",
                   precision="bf16-true"),
            Config("mb1 s8192 none chunked bf16-mixed", micro_batch=1, seq_len=8192, loss_chunk_tokens=4096),
        ]
    raise SystemExit(f"unknown suite {name!r}: strategies, long_context, moe, callbacks, multi_gpu, "
                     "sharding, planner, planner_fit, planner_check, planner_moe_check")


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
        lines.append(f"| {cfg.name} | {r['tokens_per_s']:,.0f} | {r.get('tokens_per_s_per_gpu', r['tokens_per_s']):,.0f} | "
                     f"{r['tflops_per_gpu']:.0f} | "
                     f"{100 * r['mfu']:.1f}% | {r['peak_gib']:.1f} | {ratio:.3f}x |")
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
    configs = suite(args.suite.removeprefix("suite="))
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
        if "planner" in args.suite and "tokens_per_s" in result:
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
