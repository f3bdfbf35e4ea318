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


# -- import rules ------------------------------------------------------------------------------
PACKAGE = ROOT / "lightning_attn_parallel"
FOUNDATION = ("plan", "pipeline_plan", "hardware", "collective_cost", "step")
GLUE = ("strategy", "fabric", "hybrid_base", "lightning_workarounds", "lightning_checkpoints", "processes",
        "module", "cli", "config", "train")
EXTERNAL = ("torch", "lightning")  # names of other packages (the Lightning framework itself: "lightning")
# layer -> what it must not import (package modules, torch.distributed, or the Lightning framework)
FORBIDDEN = {
    "models": ("parallel", "planning", "callbacks", "mesh", "checkpoint", *GLUE, "torch.distributed",
               "lightning"),
    "parallel": ("planning", "callbacks", *GLUE),
    "planning": ("parallel", "callbacks", "mesh", "checkpoint", *GLUE, "torch.distributed", "lightning"),
    "callbacks": ("parallel", "planning", *GLUE),
    "foundation": ("models", "parallel", "planning", "callbacks", "mesh", "checkpoint", *GLUE,
                   "torch.distributed"),
    # the LightningModule never touches parallelism: the strategy lays out its batches and clips
    "module": ("parallel", "strategy", "mesh", "checkpoint", "torch.distributed"),
}


def _layer(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if len(parts) > 1:
        return parts[0]
    return "foundation" if parts[0] in FOUNDATION else parts[0]


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) of every import in `path`, lazy ones inside functions included;
    package modules as "lightning_attn_parallel.x.y"."""
    import ast

    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
    return found


def _violations(path: Path, forbidden: tuple[str, ...]) -> list[str]:
    out = []
    for line, target in _imports(path):
        for name in forbidden:
            full = name if name.split(".")[0] in EXTERNAL else f"lightning_attn_parallel.{name}"
            if target == full or target.startswith(full + "."):
                out.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    return out


def test_layers_import_only_what_they_may():
    """docs/ARCHITECTURE.md's rules: models know nothing of parallelism (no torch.distributed,
    no parallel/, strategy or module), parallel/ never imports the strategy or the module, and
    so on down the table."""
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        forbidden = FORBIDDEN.get(_layer(path))
        if forbidden:
            violations += sorted(set(_violations(path, forbidden)))
    assert not violations, "\n".join(violations)


def test_the_import_rules_see_lazy_and_relative_imports(tmp_path):
    """The checker itself: a lazy relative import of torch.distributed or of parallel/ is found."""
    fake = PACKAGE / "models" / "_probe.py"
    source = ("def f():\n    import torch.distributed as dist\n"
              "    from ..parallel.apply import parallelize\n    from ..step import StepBatch\n")
    try:
        fake.write_text(source)
        found = _violations(fake, FORBIDDEN["models"])
    finally:
        fake.unlink()
    assert any("torch.distributed" in v for v in found)
    assert any("lightning_attn_parallel.parallel.apply" in v for v in found)
    assert not any("step" in v for v in found)
