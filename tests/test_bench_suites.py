"""The benchmark suites as data: every row of benchmarks/suites.yaml builds a valid plan for its
device count and model (and so does its CPU dry-run shrink), so a typo fails here rather than
on a GPU machine; and the runner's arithmetic (scaling efficiency, shrinking, comparison)."""
from __future__ import annotations

import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from lightning_attn_parallel.models import ModelConfig
from lightning_attn_parallel.plan import ParallelPlan

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
try:
    import bench
finally:
    sys.path.pop(0)

PREDICTIONS = ROOT / "benchmarks" / "results" / "multi_gpu_8_predictions_h200.json"


def _all_rows() -> list:
    _, suites = bench.load_suites()
    return [pytest.param(cfg, id=f"{name}-{i}") for name in suites
            for i, cfg in enumerate(bench.suite(name)[0])]


def _check_row(cfg: bench.Config) -> None:
    """The plan the row runs resolves on its devices and fits its model's heads and experts."""
    assert cfg.devices >= 1 and cfg.warmup < cfg.steps, cfg.name
    assert cfg.script or cfg.pending or bench.strategy_known(cfg.strategy), cfg.name
    if cfg.script:
        assert (ROOT / "benchmarks" / cfg.script).is_file(), cfg.name
        return
    model = bench._model_for(cfg)
    plan, _ = bench.prediction_plan(cfg)  # ParallelPlan(**row.plan).resolve(devices)
    assert plan.world_size == cfg.devices, cfg.name
    plan.check_model(model)
    assert model.n_kv_heads % plan.tp == 0 or plan.tp % model.n_kv_heads == 0, cfg.name
    multiple = 2 * plan.cp if plan.cp > 1 and plan.cp_load_balance else 1
    assert cfg.seq_len % multiple == 0, cfg.name
    if plan.ranks_per_node:
        assert cfg.devices % plan.ranks_per_node == 0, cfg.name
    if cfg.search_max_seq_len:
        assert cfg.search_max_seq_len >= cfg.seq_len, cfg.name


@pytest.mark.parametrize("cfg", _all_rows())
def test_every_row_builds_a_valid_plan(cfg):
    _check_row(cfg)
    _check_row(bench.cpu_dry_run_config(cfg))


def test_multi_gpu_suites_cover_the_proof():
    """multi_gpu_8 is the union of the runs; names are unique (the comparison matches by name);
    every family has its 1-GPU row in the same run; every parallelism and kernel is there."""
    configs, predict = bench.suite("multi_gpu_8")
    assert predict
    names = [c.name for c in configs]
    assert len(names) == len(set(names))
    _, suites = bench.load_suites()
    for run in suites["multi_gpu_8"]["include"]:  # each run computes its own scaling efficiencies
        rows, _ = bench.suite(run)
        assert {c.family for c in rows if c.family} == {c.family for c in rows if c.family and c.devices == 1}
    families = {c.family for c in configs if c.family}
    assert {"attn_hybrid", "lightning_ddp", "lightning_fsdp", "lightning_model_parallel",
            "torchtitan"} <= families
    plans = [c.plan for c in configs]
    for degree in ("tp", "cp", "ep"):
        assert {p.get(degree, 1) for p in plans} >= {2, 4, 8}, degree
    assert {p.get("cp_kernel") for p in plans if p.get("cp", 1) > 1} == {"allgather", "ring", "ulysses"}
    assert max(c.search_max_seq_len or 0 for c in configs) >= 2**20


def test_committed_predictions_are_of_the_current_rows():
    """The predictions were made of exactly these rows (re-run --predict-only after editing one),
    and every row the planner can model is predicted to fit an H200 (a search row: at its
    first length)."""
    configs, _ = bench.suite("multi_gpu_8")
    recorded = json.loads(PREDICTIONS.read_text())
    # A Config field added after the predictions were made counts as unchanged at its default.
    defaults = asdict(bench.Config(name=""))
    assert [{**defaults, **c} for c, _ in recorded] == [asdict(c) for c in configs]
    for cfg, pred in recorded:
        if cfg["script"]:
            continue
        assert pred["pred_tokens_per_s"] > 0, cfg["name"]
        assert pred["pred_fits"], cfg["name"]


def test_cpu_dry_run_halves_the_largest_degrees_until_the_plan_fits():
    cfg = bench.Config(name="x", devices=8, plan={"dp_replicate": 2, "dp_shard": 4, "ep": 8,
                                                  "ranks_per_node": 4},
                       model=asdict(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4,
                                                n_kv_heads=2, ffn_dim=64)))
    small = bench.cpu_dry_run_config(cfg, max_devices=4)
    assert (small.devices, small.accelerator, small.precision) == (4, "cpu", "32-true")
    assert small.plan == {"dp_replicate": 2, "dp_shard": 2, "ep": 4, "ranks_per_node": 2}
    ParallelPlan(**small.plan).resolve(small.devices)
    cp = bench.cpu_dry_run_config(replace(cfg, plan={"cp": 8, "tp": 2}), max_devices=4)
    assert cp.plan == {"cp": 2, "tp": 2} and cp.seq_len % 4 == 0


def test_scaling_efficiency_is_against_the_family_one_device_row():
    rows = [(bench.Config(name="a1", family="a"), {"tokens_per_s": 100.0}),
            (bench.Config(name="a8", family="a", devices=8), {"tokens_per_s": 760.0}),
            (bench.Config(name="b8", family="b", devices=8), {"tokens_per_s": 700.0}),
            (bench.Config(name="a4", family="a", devices=4), {"error": "out of memory"})]
    bench.add_scaling_efficiency(rows)
    assert rows[0][1]["scaling_efficiency"] == 1.0
    assert rows[1][1]["scaling_efficiency"] == pytest.approx(0.95)
    assert "scaling_efficiency" not in rows[2][1] and "scaling_efficiency" not in rows[3][1]


def test_rows_compare_with_the_plain_row_of_their_own_precision():
    """Each row's ratio is against the plain user's row of the same precision and fp8 setting;
    a row with none of its precision names the precision it is compared with."""
    mixed = bench.Config(name="plain mixed", strategy="plain")
    true = bench.Config(name="plain true", strategy="plain", precision="bf16-true")
    fp8 = bench.Config(name="plain fp8", strategy="plain", precision="bf16-true", plan={"fp8": "tensorwise"})
    masters = bench.Config(name="masters", plan={"mixed_precision": "master_weights"})
    masters_fp8 = bench.Config(name="masters fp8", plan={"fp8": "tensorwise", "mixed_precision": "master_weights"})
    result = {"tflops_per_gpu": 1.0, "peak_gib": 1.0}
    rows = [(mixed, {**result, "tokens_per_s": 100.0}), (true, {**result, "tokens_per_s": 110.0}),
            (fp8, {**result, "tokens_per_s": 125.0}), (masters, {**result, "tokens_per_s": 106.0}),
            (masters_fp8, {**result, "tokens_per_s": 125.0})]
    assert bench.plain_baseline(masters, rows) == (rows[0][1], "")
    assert bench.plain_baseline(bench.Config(name="t", precision="bf16-true"), rows)[0] is rows[1][1]
    assert bench.plain_baseline(masters_fp8, rows) == (rows[2][1], " (vs plain bf16-true, another precision)")
    lines = bench.table(rows).splitlines()
    assert lines[0].endswith("vs plain, same precision |")
    assert lines[5].endswith("| 1.060x |") and lines[6].endswith("1.000x (vs plain bf16-true, another precision) |")


def test_moe_rows_compare_with_torchtitan_of_their_own_precision():
    """Without a plain row, TorchTitan's row of the same precision is the baseline: autocast
    against autocast (or master weights), bf16 weights against bf16 weights."""
    titan = bench.Config(name="titan autocast", strategy="torchtitan_deepseek_v3")
    titan_bf16 = bench.Config(name="titan bf16", strategy="torchtitan_deepseek_v3", precision="bf16-true")
    masters = bench.Config(name="masters")
    true = bench.Config(name="true", precision="bf16-true")
    result = {"tflops_per_gpu": 1.0, "peak_gib": 1.0}
    rows = [(titan, {**result, "tokens_per_s": 100.0}), (titan_bf16, {**result, "tokens_per_s": 120.0}),
            (masters, {**result, "tokens_per_s": 125.0}), (true, {**result, "tokens_per_s": 150.0})]
    assert bench.plain_baseline(masters, rows) == (rows[0][1], "")
    assert bench.plain_baseline(true, rows) == (rows[1][1], "")
    lines = bench.table(rows).splitlines()
    assert lines[0].endswith("vs TorchTitan, same precision |")
    assert lines[4].endswith("| 1.250x |") and lines[5].endswith("| 1.250x |")
    only_autocast = [rows[0], rows[3]]
    assert bench.plain_baseline(true, only_autocast) == (rows[0][1], " (vs TorchTitan bf16-mixed, another precision)")
    larger = bench.Config(name="masters mb 8", micro_batch=16)  # another workload: no ratio
    assert bench.plain_baseline(larger, rows) == (None, "")


def test_fp8_expert_rows_compare_with_torchtitan_fp8_experts():
    """Experts in fp8 are another precision: such a row's baseline is TorchTitan's row with fp8
    experts, and a bf16 row keeps TorchTitan's bf16 row."""
    titan = bench.Config(name="titan", strategy="torchtitan_deepseek_v3", precision="bf16-true")
    titan_fp8 = bench.Config(name="titan fp8 experts", strategy="torchtitan_deepseek_v3", precision="bf16-true",
                             plan={"fp8_experts": True})
    ours = bench.Config(name="ours", precision="bf16-true")
    ours_fp8 = bench.Config(name="ours fp8 experts", precision="bf16-true", plan={"fp8_experts": True})
    result = {"tflops_per_gpu": 1.0, "peak_gib": 1.0}
    rows = [(titan, {**result, "tokens_per_s": 100.0}), (titan_fp8, {**result, "tokens_per_s": 110.0})]
    assert bench.plain_baseline(ours, rows) == (rows[0][1], "")
    assert bench.plain_baseline(ours_fp8, rows) == (rows[1][1], "")


def test_pending_row_reports_not_available_without_launching():
    cfg = bench.Config(name="t", strategy="no_such_runner", pending="a runner")
    assert bench.launch(cfg, timeout_s=1) == {"error": "not available: a runner"}


def test_compare_reports_errors_per_row(tmp_path):
    cfg = asdict(bench.Config(name="r"))
    base = asdict(bench.Config(name="baseline", strategy="ddp"))
    (tmp_path / "p.json").write_text(json.dumps([
        [cfg, {"pred_peak_gib": 10.5, "pred_tokens_per_s": 130.0, "pred_basis": "plan"}],
        [base, {"pred_peak_gib": 10.0, "pred_tokens_per_s": 100.0, "pred_basis": "equivalent plan"}]]))
    (tmp_path / "r.json").write_text(json.dumps([[cfg, {"peak_gib": 10.0, "tokens_per_s": 100.0}],
                                                 [base, {"peak_gib": 10.0, "tokens_per_s": 100.0}]]))
    text = bench.compare(str(tmp_path / "p.json"), str(tmp_path / "r.json"))
    assert "+5.0%" in text and "+30.0%" in text and "| baseline | equivalent plan |" in text
    assert "1 attn_hybrid rows compared: memory within 10% on 1, tokens/s within 25% on 0" in text


def test_a_failed_row_reports_its_exception_not_the_launcher_trailer():
    trailer = "Traceback ...\\nValueError: bad row\\n=====\\n  error_file: <N/A>\\n  traceback : see above\\n"
    code = f"import sys; sys.stderr.write('{trailer}'); sys.exit(1)"
    result = bench._run([sys.executable, "-c", code], 60, lambda _: None)
    assert result == {"error": "ValueError: bad row"}


def test_each_multi_gpu_run_is_predicted_to_fit_one_10_minute_command():
    """By the committed predictions (step times plus bench.STARTUP_S a row)."""
    seconds = {c["name"]: p.get("pred_row_s", bench.STARTUP_S)
               for c, p in json.loads(PREDICTIONS.read_text())}
    _, suites = bench.load_suites()
    for run in suites["multi_gpu_8"]["include"]:
        rows, _ = bench.suite(run)
        assert sum(seconds[c.name] for c in rows) <= 600, run


def test_profiled_rows_report_the_rates_their_matmul_and_attention_kernels_reached():
    """The achieved TFLOP/s of a profiled row's matmuls (6 x active matmul parameters per token)
    and causal attention (half the MFU convention's attention term), from their kernel time."""
    from lightning_attn_parallel.models import ModelConfig, build_model
    from lightning_attn_parallel.models.flops import active_matmul_params

    model = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=16)
    cfg = bench.Config(name="p", micro_batch=2, seq_len=16, model=model, profile=True)
    rates = bench.kernel_rates(cfg, {"kernel_ms_per_step": {"matmul": 2.0, "attention": 1.0}})
    n = active_matmul_params(build_model(ModelConfig(**model)))
    assert rates["matmul_tflops"] == pytest.approx(6 * n * 32 / 2e9)
    assert rates["attention_tflops"] == pytest.approx(6 * 2 * 4 * 16 * 16 / 2 * 32 / 1e9)
    assert bench.kernel_rates(cfg, {}) == {}
