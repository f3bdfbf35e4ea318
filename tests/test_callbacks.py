"""Observability callbacks on real (CPU) Lightning runs, read back from an offline W&B run."""
from __future__ import annotations

import json
import math
import re
import struct
import time
from pathlib import Path
from typing import Any, Optional

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import wandb
from lightning.pytorch.loggers import WandbLogger
from matplotlib import image
from torch.utils.data import DataLoader, Dataset
from wandb.proto import wandb_internal_pb2

from dist_utils import run_distributed
from lightning_attn_parallel.callbacks import (LayerProfiler, LoadBalanceCallback,
                                               ThroughputCallback, default_callbacks,
                                               metrics as m)
from lightning_attn_parallel.callbacks.load_balance import balance_metrics, spread
from lightning_attn_parallel.step import StepBatch
from lightning_attn_parallel.hardware import device_peak_tflops, peak_tflops
from lightning_attn_parallel.callbacks.throughput import throughput_metrics
from lightning_attn_parallel.models import ModelConfig, build_model
from lightning_attn_parallel.models.flops import attention_flops_per_token

TINY = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, ffn_dim=64, max_seq_len=64)
BATCH, SEQ, ACCUMULATE = 2, 16, 2


class RandomTokens(Dataset):
    def __init__(self, samples: int, seq_len: int = SEQ) -> None:
        generator = torch.Generator().manual_seed(0)
        self.tokens = torch.randint(0, TINY.vocab_size, (samples, seq_len + 1), generator=generator)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.tokens[index]
        return {"input_ids": row[:-1], "labels": row[1:]}


class StandInReducer:
    """Plays the strategy's gradient reducer: the same statistics every optimizer step."""

    STATS = {"comm_time_s": 0.004, "exposed_comm_time_s": 0.001, "bytes": 2_000_000_000,
             "collectives": 3}

    def comm_stats(self) -> dict[str, float]:
        return dict(self.STATS)


class TinyLM(L.LightningModule):
    def __init__(self, reducer: Optional[StandInReducer] = None, slow_rank: Optional[int] = None,
                 sleep_s: float = 0.0, config: ModelConfig = TINY, sequence_shards: int = 1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = build_model(config)
        self.reducer = reducer
        self.slow_rank = slow_rank
        self.sleep_s = sleep_s
        self.sequence_shards = sequence_shards
        self.slept: list[tuple[int, float]] = []  # (optimizer step, seconds actually asleep)

    def setup(self, stage: str) -> None:
        if self.reducer is not None:
            self.trainer.strategy.gradient_reducer = self.reducer

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.slow_rank is not None and torch.distributed.get_rank() == self.slow_rank:
            start = time.perf_counter()
            time.sleep(self.sleep_s)
            self.slept.append((self.trainer.global_step, time.perf_counter() - start))
        input_ids, labels = batch["input_ids"], batch["labels"]
        if self.sequence_shards > 1:  # keep one shard of each sequence, as context parallelism does
            keep = input_ids.shape[1] // self.sequence_shards
            self.trainer.strategy.step_batch = StepBatch(input_ids[:, :keep], labels[:, :keep],
                                                         global_seq_len=input_ids.shape[1])
            input_ids, labels = input_ids[:, :keep], labels[:, :keep]
        logits = self.model.logits(input_ids)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def fit_tiny(save_dir: Path, callbacks: list, max_steps: int, log_every_n_steps: int,
             wandb_logger: bool = True, **module_args: Any) -> L.Trainer:
    """Fit TinyLM(**module_args) on random tokens on the CPU for `max_steps` optimizer steps."""
    logger = WandbLogger(offline=True, save_dir=str(save_dir), project="lap-tests") \
        if wandb_logger else False
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps,
                        accumulate_grad_batches=ACCUMULATE, log_every_n_steps=log_every_n_steps,
                        logger=logger, callbacks=callbacks, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(save_dir))
    samples = BATCH * ACCUMULATE * max_steps
    trainer.fit(TinyLM(**module_args), DataLoader(RandomTokens(samples), batch_size=BATCH))
    return trainer


# -- reading an offline run back -------------------------------------------------------------
# The .wandb file is a sequence of 32 KiB blocks after a 7-byte file header; each block holds
# records framed by (crc32c: u32, length: u16, type: u8), type 1 = whole record, 2/3/4 =
# first/middle/last fragment of one split over blocks. Each record is a wandb Record protobuf.
_BLOCK, _FRAME = 32768, 7


def _records(path: Path):
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    position, pending = 7, b""
    while position + _FRAME <= len(data):
        room = _BLOCK - position % _BLOCK
        if room < _FRAME:  # the tail of a block too short for a frame is padding
            position += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position:position + _FRAME])
        position += _FRAME
        if position + length > len(data):
            return  # a record still being written
        chunk = data[position:position + length]
        position += length
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk
            pending = b""


def _item_key(item: Any) -> str:
    return item.key or ".".join(item.nested_key)


def _parse_run(log_file: Path) -> Optional[tuple[list[dict[str, Any]], dict[str, Any]]]:
    """(history, summary), or None while the log has no exit record yet."""
    history, summary = [], {}
    for raw in _records(log_file):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({_item_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            summary.update({_item_key(i): json.loads(i.value_json) for i in record.summary.update})
        elif kind == "exit":
            return history, summary
    return None


def read_offline_run(run_files_dir: str,
                     timeout_s: float = 60.0) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(history rows, final summary) of a finished offline run, from its .wandb file.

    wandb.finish() can return before the service process has written the log out, so this
    waits for the exit record that closes a finished run's log.
    """
    (log_file,) = Path(run_files_dir).parent.glob("*.wandb")
    deadline = time.monotonic() + timeout_s
    while (run := _parse_run(log_file)) is None:
        assert time.monotonic() < deadline, f"{log_file} has no exit record after {timeout_s}s"
        time.sleep(0.2)
    return run


def logged_series(history: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    return [(row[m.STEP], row[key]) for row in history if key in row]


# -- one real run shared by the tests below --------------------------------------------------
PEAK_TFLOPS = 0.05  # a made-up CPU "peak", so that MFU is logged on this machine


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    save_dir = tmp_path_factory.mktemp("wandb")
    callbacks = default_callbacks(peak_tflops=PEAK_TFLOPS, profile_steps=(2, 3))
    trainer = fit_tiny(save_dir, callbacks, max_steps=6, log_every_n_steps=2,
                       reducer=StandInReducer())
    files_dir = trainer.logger.experiment.dir
    progress_bar = dict(trainer.progress_bar_metrics)
    wandb.finish()
    history, summary = read_offline_run(files_dir)
    return {"trainer": trainer, "files_dir": Path(files_dir), "history": history,
            "summary": summary, "progress_bar": progress_bar}


def test_history_holds_every_dashboard_metric(offline_run):
    from lightning_attn_parallel.dashboard import build_workspace_spec

    logged = set().union(*offline_run["history"])
    for section in build_workspace_spec("entity", "project").sections:
        if section.name == "Training":  # CausalLMModule's keys, not this module's (test_dashboard.py)
            continue
        for panel in section.panels:
            missing = set(panel.y) - logged
            assert not missing, f"panel {panel.title!r} names unlogged keys {missing}"
            if panel.metric_regex and "moe" not in panel.metric_regex:  # the model is dense
                assert any(re.match(panel.metric_regex, k) for k in logged), panel.metric_regex


def test_throughput_accounting(offline_run):
    history = offline_run["history"]
    steps = [step for step, _ in logged_series(history, m.TOKENS_PER_S)]
    assert steps == [2, 4, 6]  # one entry per window of log_every_n_steps optimizer steps
    tokens_per_step = BATCH * SEQ * ACCUMULATE  # one rank, no tensor parallelism
    flops_per_token = offline_run["trainer"].lightning_module.model.flops_per_token(SEQ)
    for row in history:
        if m.TOKENS_PER_S not in row:
            continue
        assert row[m.TOKENS_PER_S] * row[m.STEP_TIME_S] == pytest.approx(tokens_per_step)
        assert row[m.TOKENS_PER_S_PER_GPU] == pytest.approx(row[m.TOKENS_PER_S])
        assert row[m.TFLOPS_PER_GPU] == pytest.approx(
            flops_per_token * row[m.TOKENS_PER_S_PER_GPU] / 1e12)
        assert row[m.MFU] == pytest.approx(row[m.TFLOPS_PER_GPU] / PEAK_TFLOPS)
    assert m.PROGRESS_BAR_TOKENS_PER_S in offline_run["progress_bar"]
    assert "train_loss" in offline_run["progress_bar"]


def test_communication_and_memory_values(offline_run):
    history = offline_run["history"]
    stats = StandInReducer.STATS
    for _, value in logged_series(history, m.COMM_TIME_MS):
        assert value == pytest.approx(stats["comm_time_s"] * 1e3)
    for _, value in logged_series(history, m.COMM_HIDDEN_FRACTION):
        assert value == pytest.approx(1 - stats["exposed_comm_time_s"] / stats["comm_time_s"])
    for _, value in logged_series(history, m.COMM_GBYTES):
        assert value == pytest.approx(stats["bytes"] / 1e9)
    for row in history:
        if m.MEMORY_PEAK_ALLOCATED in row:
            assert 0.01 < row[m.MEMORY_ALLOCATED] <= row[m.MEMORY_PEAK_ALLOCATED] < 64
            assert row[m.per_rank(m.MEMORY_PEAK_ALLOCATED, 0)] == row[m.MEMORY_PEAK_ALLOCATED]


def test_wandb_summaries_are_mean_and_max(offline_run):
    history, summary = offline_run["history"], offline_run["summary"]
    tokens = [v for _, v in logged_series(history, m.TOKENS_PER_S)]
    assert summary[m.TOKENS_PER_S]["mean"] == pytest.approx(np.mean(tokens))
    peaks = [v for _, v in logged_series(history, m.MEMORY_PEAK_ALLOCATED)]
    assert summary[m.MEMORY_PEAK_ALLOCATED]["max"] == pytest.approx(max(peaks))


def test_report_plots_and_summary(offline_run):
    report_dir = offline_run["files_dir"] / "report"
    for name in ("throughput.png", "mfu.png", "memory.png", "load_balance.png"):
        path = report_dir / name
        assert path.stat().st_size > 10_000, f"{name} is suspiciously small"
        pixels = (image.imread(path)[..., :3].reshape(-1, 3) * 255).astype(np.uint32)
        assert pixels.std() > 10, f"{name} is nearly one colour"
        colours = np.unique(pixels[:, 0] << 16 | pixels[:, 1] << 8 | pixels[:, 2])
        assert len(colours) > 20, f"{name} has too few colours to hold a plot"
    summary = (report_dir / "summary.md").read_text()
    assert "final train_loss" in summary and m.TOKENS_PER_S in summary
    assert "![throughput](throughput.png)" in summary


def test_profiler_writes_trace_and_layer_table(offline_run):
    profile_dir = offline_run["files_dir"] / "profile"
    table = (profile_dir / "layer_times_rank0.md").read_text()
    rows = {cells[0]: cells[1:] for cells in
            ([c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()
             if line.startswith("| ") and not line.startswith("| layer"))}
    assert set(rows) == {"attention", "mlp", "communication", "other"}
    # steps 2 and 3, ACCUMULATE micro-batches each, one forward range per layer
    assert int(rows["attention"][0]) == int(rows["mlp"][0]) == 2 * ACCUMULATE * TINY.n_layers
    assert float(rows["attention"][1]) > 0 and float(rows["mlp"][1]) > 0
    trace = json.loads((profile_dir / "trace_rank0.json").read_text())
    names = {event.get("name") for event in trace["traceEvents"]}
    assert {"lap/attention", "lap/attention/backward", "lap/mlp", "lap/mlp/backward"} <= names


# -- load balance over two processes ---------------------------------------------------------
SLEEP_S = 0.15
WINDOW = 2


def _imbalanced_fit(rank: int, world_size: int, save_dir: str) -> tuple[list, list]:
    callback = LoadBalanceCallback(log_every_n_steps=WINDOW)
    trainer = fit_tiny(Path(save_dir) / f"rank{rank}", [callback], max_steps=3 * WINDOW,
                       log_every_n_steps=WINDOW, wandb_logger=False, slow_rank=1, sleep_s=SLEEP_S)
    return callback.history, trainer.lightning_module.slept


def test_load_balance_sees_a_slowed_rank(tmp_path):
    """Rank 1 sleeps in every micro-batch, so its busy time per optimizer step exceeds rank 0's
    by the time it spent asleep per step (no gradient sync couples the two processes here, so
    neither waits for the other inside a step). The expected gap is the sleep as measured
    around time.sleep, which includes the wake-up latency a busy machine adds.

    Tolerance: besides the sleep both ranks run identical work, so the logged gap can differ
    from the sleep only by run-to-run jitter of that work: a few milliseconds for this tiny model
    on an idle machine, tens of milliseconds when other processes compete for the two cores.
    25% of the ~300 ms gap covers that. The first window also holds warm-up (lazy
    initialisation, allocator growth) whose length differs between processes, so only its
    exact quantities (tokens, FLOPs) are checked.
    """
    (history, _), (history_1, slept) = run_distributed(_imbalanced_fit, 2, str(tmp_path))
    assert history == history_1  # gathered: both ranks log the same figures
    assert [step for step, _ in history] == [WINDOW, 2 * WINDOW, 3 * WINDOW]
    attention_tflop = BATCH * SEQ * ACCUMULATE * attention_flops_per_token(TINY, SEQ) / 1e12
    for window, (step, row) in enumerate(history):
        fast = row[m.per_rank(m.BALANCE_STEP_TIME, 0)]
        slow = row[m.per_rank(m.BALANCE_STEP_TIME, 1)]
        assert row[m.efficiency(m.BALANCE_STEP_TIME)] == pytest.approx(min(fast, slow) / max(fast, slow))
        for rank in (0, 1):
            assert row[m.per_rank(m.BALANCE_TOKENS, rank)] == BATCH * SEQ * ACCUMULATE
            assert row[m.per_rank(m.BALANCE_ATTENTION_TFLOP, rank)] == pytest.approx(attention_tflop)
        assert row[m.imbalance(m.BALANCE_TOKENS)] == 0
        assert row[m.efficiency(m.BALANCE_ATTENTION_TFLOP)] == 1
        if window == 0:
            continue
        gap = sum(s for at, s in slept if step - WINDOW <= at < step) / WINDOW
        assert gap >= ACCUMULATE * SLEEP_S
        assert slow - fast == pytest.approx(gap, rel=0.25), step
        implied = gap / (fast + gap / 2)  # (max - min) / mean
        assert row[m.imbalance(m.BALANCE_STEP_TIME)] == pytest.approx(implied, rel=0.25), step


def test_moe_expert_load_and_profile(tmp_path):
    config = ModelConfig(family="deepseek", vocab_size=64, d_model=32, n_layers=2, n_heads=2,
                         ffn_dim=64, max_seq_len=64, n_routed_experts=4, moe_top_k=2,
                         moe_ffn_dim=32, n_shared_experts=1, first_k_dense_replace=1)
    balance = LoadBalanceCallback(log_every_n_steps=1)
    profiler = LayerProfiler(profile_steps=(0, 0), run_dir=str(tmp_path))
    fit_tiny(tmp_path, [balance, profiler], max_steps=1, log_every_n_steps=1,
             wandb_logger=False, config=config)
    ((_, row),) = balance.history
    moe_keys = {k for k in row if re.match(m.moe_pattern(), k)}
    assert m.moe("moe/layer1/imbalance") in moe_keys  # layer 0 is dense
    assert not any("layer0" in k for k in moe_keys)
    assert row[m.moe("moe/layer1/imbalance")] >= 1.0  # max / mean load over experts
    table = profiler.table_path.read_text()
    assert "| moe | 2 |" in table and "| mlp | 2 |" in table  # one layer each, 2 micro-batches


def test_counts_the_tokens_the_model_consumes(tmp_path):
    """A strategy may shard the loader's batch inside training_step (context parallelism does):
    tokens are what this rank's model consumed, FLOPs per token use the full sequence length."""
    throughput, balance = ThroughputCallback(log_every_n_steps=1), LoadBalanceCallback(log_every_n_steps=1)
    fit_tiny(tmp_path, [throughput, balance], max_steps=2, log_every_n_steps=1,
             wandb_logger=False, sequence_shards=2)
    model = build_model(TINY)
    local_tokens = BATCH * SEQ * ACCUMULATE / 2
    for (_, speed), (_, spread_row) in zip(throughput.history, balance.history):
        assert speed[m.TOKENS_PER_S] * speed[m.STEP_TIME_S] == pytest.approx(local_tokens)
        assert speed[m.TFLOPS_PER_GPU] == pytest.approx(
            model.flops_per_token(SEQ) * speed[m.TOKENS_PER_S_PER_GPU] / 1e12)
        assert spread_row[m.per_rank(m.BALANCE_TOKENS, 0)] == local_tokens
        assert spread_row[m.per_rank(m.BALANCE_ATTENTION_TFLOP, 0)] == pytest.approx(
            local_tokens * attention_flops_per_token(TINY, SEQ) / 1e12)


# -- pure accounting -------------------------------------------------------------------------
def test_global_throughput_counts_tensor_parallel_tokens_once():
    # 4 ranks = 2 tensor-parallel pairs; each pair shares 1000 tokens per window of 2 s.
    rows = [[1000.0, 1000.0 * 6e9, 2.0]] * 4
    out = throughput_metrics(rows, tp=2, steps=4, peak_tflops=989.0)
    assert out[m.TOKENS_PER_S] == pytest.approx(2000 / 2.0)  # not 4000 / 2.0
    assert out[m.TOKENS_PER_S_PER_GPU] == pytest.approx(250.0)
    assert out[m.TFLOPS_PER_GPU] == pytest.approx(250.0 * 6e9 / 1e12)
    assert out[m.MFU] == pytest.approx(out[m.TFLOPS_PER_GPU] / 989.0)
    assert out[m.STEP_TIME_S] == pytest.approx(0.5)
    # the slowest rank sets the wall time; no peak, no MFU
    slow = throughput_metrics([[10.0, 1.0, 1.0], [10.0, 1.0, 4.0]], tp=1, steps=1, peak_tflops=None)
    assert slow[m.TOKENS_PER_S] == pytest.approx(5.0) and m.MFU not in slow


def test_spread_and_balance_metrics():
    assert spread([1.0, 3.0]) == (pytest.approx(1.0), pytest.approx(1 / 3))
    assert spread([0.0, 0.0]) == (0.0, 1.0)
    out = balance_metrics({m.BALANCE_TOKENS: [2.0, 2.0, 4.0]})
    assert out[m.per_rank(m.BALANCE_TOKENS, 2)] == 4.0
    assert out[m.imbalance(m.BALANCE_TOKENS)] == pytest.approx(2 / (8 / 3))
    assert out[m.efficiency(m.BALANCE_TOKENS)] == pytest.approx(0.5)


@pytest.mark.parametrize("name, precision, matmul, expected", [
    ("NVIDIA H100 80GB HBM3", "bf16-mixed", None, 989.4),
    ("NVIDIA H100 PCIe", "16-mixed", None, 756.0),
    ("NVIDIA H200", "bf16-true", None, 989.4),
    ("NVIDIA A100-SXM4-80GB", "32-true", "high", 156.0),
    ("NVIDIA A100-SXM4-80GB", "32-true", "highest", 19.5),
    ("NVIDIA GeForce RTX 4090", "bf16-mixed", None, None),
    ("NVIDIA H100 80GB HBM3", "64-true", None, None),
])
def test_peak_table(name, precision, matmul, expected):
    peak = peak_tflops(name, precision, matmul)
    assert peak == expected or (expected is not None and math.isclose(peak, expected))


@pytest.mark.parametrize("name", ["NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA A100-SXM4-80GB"])
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-true", "32-true"])
def test_peak_table_agrees_with_lightning(monkeypatch, name, precision):
    """Where Lightning's table has the dense figure of a card, ours is the same number."""
    from lightning.fabric.utilities.throughput import get_available_flops

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    dtype = {"bf16": torch.bfloat16, "16": torch.float16, "32": torch.float32}[precision.split("-")[0]]
    monkeypatch.setattr("lightning.fabric.accelerators.cuda._is_ampere_or_later", lambda: True)
    assert peak_tflops(name, precision) == pytest.approx(get_available_flops(torch.device("cuda", 0), dtype) / 1e12)


def test_peak_of_a_card_only_lightning_knows(monkeypatch):
    """A card missing from the table takes Lightning's figure; a CPU has none."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 4090")
    assert device_peak_tflops(torch.device("cuda", 0), "bf16-mixed") == pytest.approx(82.6)
    assert device_peak_tflops(torch.device("cpu"), "bf16-mixed") is None


def test_no_mfu_without_a_known_peak(tmp_path):
    callback = ThroughputCallback(log_every_n_steps=1)
    fit_tiny(tmp_path, [callback], max_steps=1, log_every_n_steps=1, wandb_logger=False)
    ((_, row),) = callback.history
    assert m.TOKENS_PER_S in row and m.MFU not in row


def test_default_callbacks_composition():
    names = [type(c).__name__ for c in default_callbacks()]
    assert names == ["ThroughputCallback", "MemoryCallback", "LoadBalanceCallback",
                     "CommunicationCallback", "WandbMetricSummaries", "RunReport"]
    assert "LayerProfiler" in [type(c).__name__ for c in default_callbacks(profile_steps=[1, 2])]
    with pytest.raises(ValueError, match="profile_steps"):
        default_callbacks(profile_steps=[3, 1])
