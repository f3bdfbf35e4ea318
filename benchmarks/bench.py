"""Side-by-side GPU benchmarks: attn_hybrid against Lightning's built-in strategies.

The suites are data (benchmarks/suites.yaml); this file is their one runner. Each row trains the
same model on the same synthetic tokens in its own process (so peak memory is its own), and one
table compares them: tokens/s, TFLOP/s per GPU, MFU, peak memory, and the ratio to the first row.
MFU follows docs/ARCHITECTURE.md ("MFU"): model FLOPs per token x tokens/s per GPU / the card's
datasheet peak at the run's precision (lightning_attn_parallel.hardware).

    python benchmarks/bench.py strategies          # or any suite of suites.yaml
    python benchmarks/bench.py multi_gpu --only 0 2
Append `--out FILE.json` to keep the raw results (all rows of the invocation, in one file).

Multi-GPU rows launch their ranks through Lightning (`devices: N`). Before GPU time is spent:
    python benchmarks/bench.py multi_gpu_8 --cpu-dry-run     # every row shrunk, on gloo
    python benchmarks/bench.py multi_gpu_8 --predict-only --out PRED.json   # the planner's
    python benchmarks/bench.py multi_gpu_8 --compare PRED.json RESULTS.json # after the run
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SUITES_FILE = Path(__file__).with_name("suites.yaml")


def load_suites(path: Path = SUITES_FILE) -> tuple[dict[str, dict], dict[str, dict]]:
    """(models by name, suites by name) of the suites file. A model may name a recipe
    (`recipe: llama3_8b`): its fields are the recipe's `model:` section, then the entry's own."""
    import yaml

    data = yaml.safe_load(path.read_text())
    models = {}
    for name, spec in data["models"].items():
        spec = dict(spec)
        recipe = spec.pop("recipe", None)
        if recipe is not None:
            from lightning_attn_parallel.config import RECIPES_DIR

            spec = {**yaml.safe_load((RECIPES_DIR / f"{recipe}.yaml").read_text())["model"], **spec}
        models[name] = spec
    return models, data["suites"]


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
    fused_loss: bool = False  # liger's fused LM head + cross-entropy (attn_hybrid's module)
    optimizer: str = "adamw"  # CausalLMModule's optimizer (adamw_bf16_stochastic_round: torchao's)
    accumulate: int = 1  # micro-batches per optimizer step (steps and warmup count micro-batches)
    checkpointing: str = "none"
    offload: bool = False
    callbacks: bool = False
    grouped_gemm: bool = True
    devices: int = 1
    plan: dict = field(default_factory=dict)  # extra ParallelPlan fields, e.g. {"tp": 2}
    model: dict = field(default_factory=dict)  # ModelConfig fields (a row names one of `models:`)
    accelerator: str = "gpu"  # "cpu" under --cpu-dry-run
    family: Optional[str] = None  # scaling_efficiency: against this family's 1-device row
    search_max_seq_len: Optional[int] = None  # double seq_len up to this, until out of memory
    script: Optional[str] = None  # a benchmarks/ script run by torchrun instead of the Trainer
    script_args: list = field(default_factory=list)
    script_cpu_args: list = field(default_factory=list)  # its arguments under --cpu-dry-run
    pending: Optional[str] = None  # what the row waits for while its strategy has no runner
    profile: bool = False  # kernel time by category over the timed steps (kernel_profile.py)


def suite(name: str, path: Path = SUITES_FILE) -> tuple[list[Config], bool]:
    """(the rows of suite `name` as Configs, whether to add the planner's predictions)."""
    models, suites = load_suites(path)
    if name not in suites:
        print(f"error: unknown suite {name!r}: use one of {', '.join(suites)} (or add it to "
              f"{path.name})", file=sys.stderr)
        raise SystemExit(2)
    configs = []
    for row in _suite_rows(name, suites):
        row = dict(row)
        model = row.pop("model", "llama_1b")
        cfg = Config(**row, model=dict(models[model]))
        if not (cfg.script or cfg.pending or strategy_known(cfg.strategy)):
            print(f"error: row {cfg.name!r} of suite {name!r} has strategy {cfg.strategy!r}, which "
                  f"is neither in bench.STRATEGIES nor a Lightning strategy: fix the name, or mark "
                  f"the row `pending:` until its runner exists", file=sys.stderr)
            raise SystemExit(2)
        configs.append(cfg)
    return configs, bool(suites[name].get("predict", False))


def _suite_rows(name: str, suites: dict[str, dict]) -> list[dict]:
    """A suite's rows: those of the suites it `include`s, in order, then its own."""
    rows: list[dict] = []
    for part in suites[name].get("include", []):
        rows += _suite_rows(part, suites)
    return rows + list(suites[name].get("rows", []))


def strategy_known(name: str) -> bool:
    """Whether a row's strategy has a runner: bench.STRATEGIES or Lightning's own names."""
    from lightning.pytorch.strategies import StrategyRegistry

    return name in STRATEGIES or name == "auto" or name in StrategyRegistry.available_strategies()


# ---------------------------------------------------------------------------- one run
def run_one(cfg: Config) -> Optional[dict[str, Any]]:
    """Train `cfg` for a few steps and measure the steady-state window. With devices > 1 this
    process is rank 0 and Lightning launches the others; only rank 0 returns the result."""
    import lightning as L
    import torch
    from torch.utils.data import DataLoader, Dataset

    import lightning_attn_parallel as lap
    from lightning_attn_parallel.models import ModelConfig

    torch.backends.cuda.matmul.allow_tf32 = True
    gpu = cfg.accelerator == "gpu"

    def synchronize() -> None:
        if gpu:
            torch.cuda.synchronize()

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
                synchronize()
                # after an optimizer step and before this step's forward: parameters, gradient
                # buffers and optimizer states only (the planner's static memory)
                if gpu:
                    self.static = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, module, out, batch, idx) -> None:
            if idx == cfg.steps - 1:
                synchronize()
                self.end = time.perf_counter()

    model_cfg = _model_for(cfg)  # RoPE tables as long as the row's sequence

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

    if cfg.strategy == "plain":  # a Lightning user's own Llama: nothing of the project's
        from plain_llama import PlainLlamaModule

        module: L.LightningModule = PlainLlamaModule(cfg.model, compile=cfg.compile,
                                                     fp8=cfg.plan.get("fp8", "none") == "tensorwise")
    else:
        module = Module(model_cfg, lr=1e-4, warmup_steps=2, total_steps=1000,
                        loss_chunk_tokens=cfg.loss_chunk_tokens, fused_loss=cfg.fused_loss,
                        optimizer=cfg.optimizer)
    builder = STRATEGIES.get(cfg.strategy)
    strategy: Any = builder(cfg) if builder is not None else cfg.strategy  # a Lightning name
    callbacks: list = [Timer()]
    if cfg.profile:
        from kernel_profile import KernelProfile

        callbacks.append(KernelProfile(cfg.warmup, cfg.steps))
    if cfg.callbacks:
        from lightning_attn_parallel.callbacks import default_callbacks

        callbacks += default_callbacks(log_every_n_steps=5, report=False)
    trainer = L.Trainer(accelerator=cfg.accelerator, devices=cfg.devices, strategy=strategy, precision=cfg.precision,
                        max_steps=-(-cfg.steps // cfg.accumulate), accumulate_grad_batches=cfg.accumulate,
                        logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                        limit_val_batches=0)
    loader = DataLoader(RandomTokens(), batch_size=cfg.micro_batch, num_workers=2 if gpu else 0)
    trainer.fit(module, loader)
    if trainer.global_rank != 0:
        return None
    timer = callbacks[0]
    seconds = timer.end - timer.start
    # micro_batch is per data-parallel rank; tensor- and context-parallel ranks share samples
    dp = cfg.devices // (cfg.plan.get("tp", 1) * cfg.plan.get("cp", 1))
    tokens = (cfg.steps - cfg.warmup) * cfg.micro_batch * cfg.seq_len * dp
    tps = tokens / seconds
    device = torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")
    per_gpu = tps / cfg.devices
    result = {"tokens_per_s": tps, "tokens_per_s_per_gpu": per_gpu, **flop_metrics(cfg, per_gpu, device),
              "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if gpu else 0.0,
              "static_gib": timer.static / 2**30,
              "reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if gpu else 0.0,
              "device": torch.cuda.get_device_name(device) if gpu else "cpu",
              # what "-mixed" ran: the plan's choice, or Lightning's autocast for the baselines
              "mixed_precision": getattr(getattr(trainer.strategy, "plan", None), "mixed_precision", "autocast")}
    if cfg.profile:
        result.update(callbacks[-1].summary)
        result.update(kernel_rates(cfg, result))
    logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("throughput/")}
    if logged:
        result["callback_metrics"] = logged
    return result


# ---------------------------------------------------------------------------- strategies
def _attn_hybrid(cfg: Config) -> Any:
    import lightning_attn_parallel as lap

    levers = dict(compile=cfg.compile, activation_checkpointing=cfg.checkpointing,
                  offload_activations=cfg.offload, grouped_gemm=cfg.grouped_gemm)
    plan = lap.ParallelPlan(**{**levers, **cfg.plan})  # the row's plan overrides the levers
    return lap.AttnHybridStrategy(plan=plan)


def _model_parallel(cfg: Config) -> Any:
    """Lightning's ModelParallelStrategy; the module applies fully_shard in configure_model."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    return ModelParallelStrategy()


def _fsdp(cfg: Config) -> Any:
    from lightning.pytorch.strategies import FSDPStrategy

    from lightning_attn_parallel.models.llama import TransformerBlock

    return FSDPStrategy(auto_wrap_policy={TransformerBlock}, sharding_strategy="FULL_SHARD")


def _plain(cfg: Config) -> Any:
    """The plain baseline (benchmarks/plain_llama.py) runs under Lightning's default strategy."""
    return "auto"


# A row's `strategy` names one of these, or is passed to the Trainer as a Lightning name.
# TorchTitan rows run outside Lightning, in TorchTitan's own set-up (_launch_torchtitan).
TORCHTITAN = ("torchtitan", "torchtitan_deepseek_v3")
STRATEGIES = {"attn_hybrid": _attn_hybrid, "model_parallel": _model_parallel, "fsdp": _fsdp,
              "plain": _plain, **dict.fromkeys(TORCHTITAN)}


# ---------------------------------------------------------------------------- planner
# Seconds a row spends before its first step on an 8-GPU host (launch, process group, model
# build, data loader): an assumption for the time budget of a run, not a measurement.
STARTUP_S = 45.0
# The attn_hybrid plan a baseline row is predicted as: what it does to the parameters.
_SHARDED_BASELINES = ("fsdp", "model_parallel", *TORCHTITAN)


def prediction_plan(cfg: Config) -> tuple[Any, str]:
    """(the resolved ParallelPlan the planner is asked about, whether it is the row's own plan or
    the attn_hybrid plan equivalent to a baseline's sharding)."""
    from lightning_attn_parallel.plan import ParallelPlan

    levers = dict(activation_checkpointing=cfg.checkpointing, compile=cfg.compile,
                  grouped_gemm=cfg.grouped_gemm, offload_activations=cfg.offload)
    if cfg.strategy == "attn_hybrid":
        return ParallelPlan(**{**levers, **cfg.plan}).resolve(cfg.devices), "plan"
    degrees = {"dp_replicate": 1, "dp_shard": cfg.devices} if cfg.strategy in _SHARDED_BASELINES else {}
    return ParallelPlan(**{**levers, **degrees, **cfg.plan}).resolve(cfg.devices), "equivalent plan"


def _model_for(cfg: Config):
    from lightning_attn_parallel.models import ModelConfig

    return ModelConfig(**{**cfg.model, "max_seq_len": max(cfg.model.get("max_seq_len", 0), cfg.seq_len)})


def predicted(cfg: Config, device: str) -> dict[str, Any]:
    """The planner's memory and speed for `cfg` on one host of `cfg.devices` cards named `device`;
    for rows declaring `ranks_per_node`, the cost model's flat and hierarchical gradient
    reduction on that host; for search rows, the longest sequence it expects to fit."""
    from lightning_attn_parallel.planning import ClusterSpec, estimate_memory, estimate_time, gpu_spec

    gpu = gpu_spec(device)
    plan, basis = prediction_plan(cfg)
    cluster = ClusterSpec(1, cfg.devices)

    def memory(seq_len: int):
        return estimate_memory(_model_for(replace(cfg, seq_len=seq_len)), plan, cfg.micro_batch,
                               seq_len, cfg.precision, gpu, loss_chunk_tokens=cfg.loss_chunk_tokens)

    mem = memory(cfg.seq_len)
    timing = estimate_time(_model_for(cfg), plan, cluster, gpu, cfg.micro_batch, cfg.seq_len,
                           cfg.precision, loss_chunk_tokens=cfg.loss_chunk_tokens)
    out: dict[str, Any] = {"pred_peak_gib": mem.allocated / 2**30, "pred_static_gib": mem.static / 2**30,
                           "pred_fits": mem.fits, "pred_step_s": timing.step_s,
                           "pred_tokens_per_s": timing.tokens_per_s, "pred_basis": basis,
                           "pred_plan": plan.describe()}
    if cfg.plan.get("ranks_per_node"):
        out.update(_reduction_prediction(cfg, plan, cluster))
    out["pred_row_s"] = STARTUP_S + cfg.steps * timing.step_s
    if cfg.search_max_seq_len:
        seq, longest = cfg.seq_len * 2, cfg.seq_len if mem.fits else None
        while seq <= cfg.search_max_seq_len and longest:
            if not memory(seq).fits:
                break
            longest, seq = seq, seq * 2
            out["pred_row_s"] += STARTUP_S + cfg.steps * estimate_time(
                _model_for(replace(cfg, seq_len=longest)), plan, cluster, gpu, cfg.micro_batch, longest,
                cfg.precision, loss_chunk_tokens=cfg.loss_chunk_tokens).step_s
        out["pred_longest_seq_len"] = longest
    return out


def _reduction_prediction(cfg: Config, plan: Any, host: Any) -> dict[str, float]:
    """Flat against hierarchical all-reduce of one step's gradients in `bucket_mb` buckets, by the
    cost model (collective_cost): the declared nodes lie on one host, so both levels run at the
    host's NVLink speed."""
    import math

    from lightning_attn_parallel.collective_cost import flat_time, hierarchical_time
    from lightning_attn_parallel.planning import parameter_counts
    from lightning_attn_parallel.planning.memory import precision_spec

    per_node = plan.ranks_per_node
    nodes = plan.world_size // per_node
    grad_bytes = parameter_counts(_model_for(cfg)).total * precision_spec(cfg.precision).grad_bytes
    bucket = plan.bucket_mb * 2**20
    sizes = [bucket] * int(grad_bytes // bucket) + ([grad_bytes % bucket] if grad_bytes % bucket else [])
    flat = sum(flat_time(b, plan.world_size, 1, host) for b in sizes)
    hier = sum(hierarchical_time(b, per_node, nodes, host) for b in sizes)
    return {"pred_flat_reduce_s": flat, "pred_hierarchical_reduce_s": hier,
            "pred_hierarchical_over_flat": hier / flat if flat else math.nan}


def _precision_key(cfg: Config) -> tuple[str, str]:
    """(precision, fp8 setting): the dense layers' fp8 recipe, and whether the experts run in fp8."""
    experts = " + fp8 experts" if cfg.plan.get("fp8_experts") else ""
    return cfg.precision, cfg.plan.get("fp8", "none") + experts


def _workload_key(cfg: Config) -> str:
    """What a ratio must hold fixed besides precision: the model, and the tokens a step takes."""
    return json.dumps([cfg.model, cfg.micro_batch, cfg.seq_len, cfg.accumulate, cfg.devices], sort_keys=True)


BASELINES = ("plain", *TORCHTITAN)  # rows the others are compared with, precision by precision


def plain_baseline(cfg: Config, rows: list[tuple[Config, dict]]) -> tuple[Optional[dict], str]:
    """(the result of the baseline row this row compares with, a note when its precision differs).

    A baseline is the plain Lightning user's row or TorchTitan's (`BASELINES`), whichever the
    suite has, on the same model and tokens a step. A row compares with the baseline row of the
    same precision and fp8 setting;
    without one, with the baseline row of the same fp8 setting, and the note names its precision."""
    plain = [(c, r) for c, r in rows if c.strategy in BASELINES and "tokens_per_s" in r
             and _workload_key(c) == _workload_key(cfg)]
    same = [r for c, r in plain if _precision_key(c) == _precision_key(cfg)]
    if same:
        return same[0], ""
    fp8 = [(c, r) for c, r in plain if _precision_key(c)[1] == _precision_key(cfg)[1]]
    if fp8:
        return fp8[0][1], f" (vs {_baseline_name(fp8[0][0])} {fp8[0][0].precision}, another precision)"
    return None, ""


def _baseline_name(cfg: Config) -> str:
    return "plain" if cfg.strategy == "plain" else "TorchTitan"


def table(rows: list[tuple[Config, dict]]) -> str:
    base = next((r for _, r in rows if "tokens_per_s" in r), None)
    baselines = sorted({_baseline_name(c) for c, _ in rows if c.strategy in BASELINES}, reverse=True)
    with_plain = bool(baselines)
    lines = ["| config | tokens/s | tokens/s/GPU | TFLOP/s/GPU | MFU | peak GiB | vs first | scaling |"
             + (f" vs {' or '.join(baselines)}, same precision |" if with_plain else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|" if with_plain else "")]
    for cfg, r in rows:
        if "tokens_per_s" not in r:
            lines.append(f"| {cfg.name} | {r.get('error', 'see the JSON' if 'script' in r else 'failed')} | | | | | | |"
                         + (" |" if with_plain else ""))
            continue
        ratio = r["tokens_per_s"] / base["tokens_per_s"]
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
        eff = f"{100 * r['scaling_efficiency']:.1f}%" if r.get("scaling_efficiency") is not None else ""
        if r.get("longest_seq_len"):
            eff = f"longest {r['longest_seq_len']:,}"
        line = (f"| {cfg.name} | {r['tokens_per_s']:,.0f} | {r.get('tokens_per_s_per_gpu', r['tokens_per_s']):,.0f} | "
                f"{r['tflops_per_gpu']:.0f} | {mfu} | {r['peak_gib']:.1f} | {ratio:.3f}x | {eff} |")
        if with_plain:
            plain, note = plain_baseline(cfg, rows)
            line += f" {r['tokens_per_s'] / plain['tokens_per_s']:.3f}x{note} |" if plain else " |"
        lines.append(line)
    return "\n".join(lines)


# ---------------------------------------------------------------------------- launching rows
def launch(cfg: Config, timeout_s: float) -> dict[str, Any]:
    """Run one row in its own process group (a row that hangs is killed with all its ranks)."""
    if cfg.pending and not strategy_known(cfg.strategy):
        return {"error": f"not available: {cfg.pending}"}
    if cfg.accelerator == "gpu":  # an 8-GPU row on a 4-GPU host is skipped, not failed
        import torch

        if torch.cuda.device_count() < cfg.devices:
            return {"error": f"not run: needs {cfg.devices} GPUs, this host has {torch.cuda.device_count()}"}
    if cfg.script:
        return _launch_script(cfg, timeout_s)
    if cfg.strategy in TORCHTITAN:
        return _launch_torchtitan(cfg, timeout_s)
    return _run([sys.executable, __file__, "x", "--one", json.dumps(asdict(cfg))], timeout_s,
                lambda out: next((json.loads(ln[7:]) for ln in reversed(out.splitlines())
                                  if ln.startswith("RESULT ")), None))


def _launch_script(cfg: Config, timeout_s: float) -> dict[str, Any]:
    """A benchmark script of this folder under torchrun; its --out JSON is the row's result."""
    args = cfg.script_cpu_args if cfg.accelerator == "cpu" else cfg.script_args
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={cfg.devices}", str(Path(__file__).with_name(cfg.script)),
               *map(str, args), "--out", str(out)]
        return _run(cmd, timeout_s, lambda _: _script_result(json.loads(out.read_text())) if out.exists() else None)


def _script_result(data: dict[str, Any]) -> dict[str, Any]:
    """A script's JSON, and the table's figures where the script measured them (a row of the table
    like the Trainer's rows), so a script row is compared in the same table."""
    figures = ("tokens_per_s", "tflops_per_gpu", "mfu", "peak_gib")
    lifted = {k: data[k] for k in figures if k in data} if all(k in data for k in figures) else {}
    return {"script": data, **lifted}


def _launch_torchtitan(cfg: Config, timeout_s: float) -> dict[str, Any]:
    """TorchTitan's Llama or DeepSeek-V3 (benchmarks/torchtitan_baseline.py) under torchrun, with this file's
    FLOP and MFU accounting added to its timing."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={cfg.devices}", str(Path(__file__).with_name("torchtitan_baseline.py")),
               "--row", json.dumps(asdict(cfg)), "--out", str(out)]
        result = _run(cmd, timeout_s, lambda _: json.loads(out.read_text()) if out.exists() else None)
    if "tokens_per_s" in result:
        result.update(flop_metrics(cfg, result["tokens_per_s_per_gpu"]))
        result.update(kernel_rates(cfg, result))
    return result


def flop_metrics(cfg: Config, tokens_per_s_per_gpu: float, device: Any = None) -> dict[str, Any]:
    """TFLOP/s per GPU and MFU of a row, by the project's FLOP count of the row's model shape
    (docs/ARCHITECTURE.md, "MFU"), against the datasheet peak of `device` (default: GPU 0)."""
    import torch

    from lightning_attn_parallel.hardware import device_peak_tflops
    from lightning_attn_parallel.models import ModelConfig, build_model

    with torch.device("meta"):
        flops_per_token = build_model(ModelConfig(**cfg.model)).flops_per_token(cfg.seq_len)
    if device is None:
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    peak = device_peak_tflops(device, cfg.precision)
    return {"flops_per_token": flops_per_token, "tflops_per_gpu": flops_per_token * tokens_per_s_per_gpu / 1e12,
            "mfu": flops_per_token * tokens_per_s_per_gpu / (peak * 1e12) if peak else None}


def kernel_rates(cfg: Config, result: dict[str, Any]) -> dict[str, float]:
    """For a profiled row: the TFLOP/s its matmul and attention kernels reached, from their
    kernel time per micro-batch and the FLOPs they do (matmuls: 6 x active matmul parameters per
    token; attention: half of the MFU convention's term, since a causal kernel skips the masked
    half). Set beside the GEMM ceiling measured at the model's shapes, this is the step's floor."""
    ms = result.get("kernel_ms_per_step") or {}
    if not ms:
        return {}
    import torch

    from lightning_attn_parallel.models import ModelConfig, build_model
    from lightning_attn_parallel.models.flops import active_matmul_params, attention_flops_per_token

    with torch.device("meta"):
        model = build_model(ModelConfig(**cfg.model))
    tokens = cfg.micro_batch * cfg.seq_len
    rates = {}
    if ms.get("matmul"):
        rates["matmul_tflops"] = 6.0 * active_matmul_params(model) * tokens / (ms["matmul"] * 1e9)
    if ms.get("attention"):
        rates["attention_tflops"] = attention_flops_per_token(model.config, cfg.seq_len) / 2 * tokens / (ms["attention"] * 1e9)
    return rates


def _run(cmd: list[str], timeout_s: float, parse) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=env, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the row's ranks share its session
        proc.communicate()
        return {"error": f"timed out after {timeout_s:g} s"}
    result = parse(stdout)
    if result is not None:
        return result
    if "out of memory" in stderr.lower():
        return {"error": "out of memory"}
    # the last exception line (torchrun and Lightning's launcher print their own trailers after it)
    raised = [ln.strip() for ln in stderr.splitlines() if _EXCEPTION.match(ln.strip())]
    return {"error": (raised[-1] if raised else " / ".join(stderr.strip().splitlines()[-3:]))[-300:]}


_EXCEPTION = re.compile(r"^(\[rank\d+\]: )?[\w.]*(Error|Exception|Failure): ")


def run_row(cfg: Config, timeout_s: float) -> dict[str, Any]:
    """One row; a search row doubles its sequence from `seq_len` until a run fails (out of
    memory) or `search_max_seq_len` is passed, and reports its longest trained sequence with
    that run's measurements."""
    if not cfg.search_max_seq_len:
        return launch(cfg, timeout_s)
    attempts, best, seq = [], None, cfg.seq_len
    while seq <= cfg.search_max_seq_len:
        model = {**cfg.model, "max_seq_len": max(cfg.model.get("max_seq_len", 0), seq)}
        result = launch(replace(cfg, seq_len=seq, model=model, search_max_seq_len=None), timeout_s)
        attempts.append({"seq_len": seq, **{k: v for k, v in result.items() if k != "callback_metrics"}})
        print(f"  search {cfg.name}: seq_len {seq}: {result.get('error') or 'trained'}", flush=True)
        if "tokens_per_s" not in result:
            break
        best, seq = {**result, "longest_seq_len": seq}, seq * 2
    return {**(best or {"error": attempts[-1].get("error", "failed"), "longest_seq_len": None}),
            "attempts": attempts}


def add_scaling_efficiency(rows: list[tuple[Config, dict]]) -> None:
    """tokens/s / (devices x the tokens/s of the family's 1-device row), on every measured row of
    a family."""
    base = {c.family: r["tokens_per_s"] for c, r in rows
            if c.family and c.devices == 1 and "tokens_per_s" in r}
    for cfg, r in rows:
        if cfg.family in base and "tokens_per_s" in r:
            r["scaling_efficiency"] = r["tokens_per_s"] / (cfg.devices * base[cfg.family])


# ---------------------------------------------------------------------------- CPU dry run
CPU_DEVICES = 4  # 2 CPU cores run 4 gloo ranks of a tiny model in seconds; 8 take minutes
_DENSE = ("dp_replicate", "dp_shard", "cp", "tp")


def cpu_dry_run_config(cfg: Config, max_devices: int = CPU_DEVICES) -> Config:
    """`cfg` shrunk for gloo on the CPU: at most `max_devices` ranks, the plan's degrees halved
    (largest first) until they fit, the same model family at smoke scale (smoke_scale), short
    sequences, 3 steps in fp32."""
    from lightning_attn_parallel.models import ModelConfig, smoke_scale

    devices = min(cfg.devices, max_devices)
    plan = dict(cfg.plan)

    def product() -> int:
        return max(1, plan.get("dp_replicate", 1)) * plan.get("dp_shard", 1) * plan.get("cp", 1) * plan.get("tp", 1)

    while product() > devices or devices % product():
        key = max((k for k in _DENSE if plan.get(k, 1) > 1), key=lambda k: plan[k])
        plan[key] //= 2
    while devices % plan.get("ep", 1):
        plan["ep"] //= 2
    if plan.get("ranks_per_node"):
        plan["ranks_per_node"] = max(1, min(plan["ranks_per_node"], devices // 2))
    cp = plan.get("cp", 1)
    seq = 64 * cp
    search = 2 * seq if cfg.search_max_seq_len else None
    model = asdict(smoke_scale(ModelConfig(**cfg.model), max_seq_len=search or seq))
    return replace(cfg, accelerator="cpu", devices=devices, plan=plan, model=model, seq_len=seq,
                   micro_batch=min(cfg.micro_batch, 2), steps=3, warmup=1, precision="32-true",
                   compile=False, loss_chunk_tokens=64 if cfg.loss_chunk_tokens else None,
                   offload=False, search_max_seq_len=search)


# ---------------------------------------------------------------------------- predictions
def write_predictions(configs: list[Config], device: str, path: str) -> None:
    """The planner's prediction of every row, before any run: [[config, prediction], ...]."""
    out = []
    for cfg in configs:
        try:
            pred = {} if cfg.script else predicted(cfg, device)
        except Exception as err:  # noqa: BLE001  (a row the planner cannot model is named, not fatal)
            pred = {"prediction_error": f"{type(err).__name__}: {err}"}
        out.append([asdict(cfg), {"device": device, **pred}])
        print(cfg.name, json.dumps(pred), flush=True)
    Path(path).write_text(json.dumps(out, indent=1))
    minutes = sum(p.get("pred_row_s", STARTUP_S) for _, p in out) / 60
    print(f"{len(out)} rows, about {minutes:.1f} minutes on the GPUs (at {STARTUP_S:g} s of start-up a row)")


def compare(pred_path: str, results_path: str) -> str:
    """Per row: measured against predicted memory and tokens/s. The planner's goals (memory within
    10%, speed within 25%) are counted on the attn_hybrid rows, whose plan it was asked about;
    baselines predicted as their equivalent plan are shown beside them."""
    preds = {c["name"]: p for c, p in json.loads(Path(pred_path).read_text())}
    lines = ["| row | basis | peak GiB | predicted | error | tokens/s | predicted | error |",
             "|---|---|---|---|---|---|---|---|"]
    mem_ok = speed_ok = n = 0
    for cfg, r in json.loads(Path(results_path).read_text()):
        p = preds.get(cfg["name"], {})
        if "tokens_per_s" not in r or "pred_tokens_per_s" not in p:
            continue
        mem_err = p["pred_peak_gib"] / r["peak_gib"] - 1 if r.get("peak_gib") else float("nan")
        speed_err = p["pred_tokens_per_s"] / r["tokens_per_s"] - 1
        if p.get("pred_basis", "plan") == "plan":
            n += 1
            mem_ok += abs(mem_err) <= 0.10
            speed_ok += abs(speed_err) <= 0.25
        lines.append(f"| {cfg['name']} | {p.get('pred_basis', 'plan')} | {r.get('peak_gib', 0):.1f} | "
                     f"{p['pred_peak_gib']:.1f} | {100 * mem_err:+.1f}% | {r['tokens_per_s']:,.0f} | "
                     f"{p['pred_tokens_per_s']:,.0f} | {100 * speed_err:+.1f}% |")
    lines.append(f"\n{n} attn_hybrid rows compared: memory within 10% on {mem_ok}, tokens/s within 25% on {speed_ok}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("suite")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--out")
    parser.add_argument("--only", type=int, nargs="*")
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="every row shrunk (tiny model, <= 4 gloo ranks, 3 steps) on the CPU")
    parser.add_argument("--predict-only", metavar="CARD", nargs="?", const="H200",
                        help="write the planner's predictions (to --out) without running")
    parser.add_argument("--compare", nargs=2, metavar=("PREDICTIONS", "RESULTS"))
    parser.add_argument("--row-timeout", type=float, default=600.0, help="seconds per row")
    args = parser.parse_args()
    if args.one:  # child process (and, with devices > 1, each of its ranks): one configuration
        result = run_one(Config(**json.loads(args.one)))
        if result is not None:
            print("RESULT " + json.dumps(result), flush=True)
        return
    if args.compare:
        print(compare(*args.compare))
        return
    configs, predict = suite(args.suite.removeprefix("suite="))
    if args.only:
        configs = [configs[i] for i in args.only]
    if args.predict_only:
        write_predictions(configs, args.predict_only, args.out or os.devnull)
        return
    if args.cpu_dry_run:
        configs, predict = [cpu_dry_run_config(c) for c in configs], False
    rows: list[tuple[Config, dict]] = []
    done: dict[str, dict] = {}  # a dry run shrinks some rows onto the same configuration
    start = time.perf_counter()
    for cfg in configs:
        key = json.dumps({**asdict(cfg), "name": None, "family": None}, sort_keys=True)
        row_start = time.perf_counter()
        result = dict(done[key]) if key in done else run_row(cfg, args.row_timeout)
        result["row_s"] = time.perf_counter() - row_start
        done[key] = result
        if predict and "tokens_per_s" in result:
            try:  # a planner error must not lose the measurement
                result.update(predicted(cfg, result["device"]))
            except Exception as err:  # noqa: BLE001
                result["prediction_error"] = f"{type(err).__name__}: {err}"
        rows.append((cfg, result))
        add_scaling_efficiency(rows)
        print(cfg.name, json.dumps(result), flush=True)
        if args.out:  # after every configuration, so a run cut short keeps what it measured
            Path(args.out).write_text(json.dumps([[asdict(c), r] for c, r in rows], indent=1))
    print(table(rows))
    failed = [c.name for c, r in rows if "tokens_per_s" not in r and "script" not in r]
    print(f"{len(rows) - len(failed)} of {len(rows)} rows ran in {time.perf_counter() - start:.0f} s"
          + (f"; not run: {', '.join(failed)}" if failed else ""))


if __name__ == "__main__":
    main()
