"""The package's structural rules (docs/ARCHITECTURE.md): the benchmark suites are valid data."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_benchmark_suites_are_rows_of_known_fields():
    """Every row of benchmarks/suites.yaml builds a bench.Config with a known model and strategy."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench
    finally:
        sys.path.pop(0)
    from lightning_attn_parallel.models import ModelConfig

    models, suites = bench.load_suites()
    assert {"strategies", "multi_gpu", "planner_fit"} <= set(suites)
    for name in suites:
        configs, _ = bench.suite(name)
        assert configs, name
        for cfg in configs:
            ModelConfig(**cfg.model)
            assert bench.strategy_known(cfg.strategy) or cfg.pending or cfg.script, cfg.name
