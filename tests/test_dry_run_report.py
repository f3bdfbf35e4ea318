"""The dry run's table stays aligned whatever the plan names, explains its abbreviations, and
says how to run the plan it selects."""
from __future__ import annotations

import re

import pytest

from test_cli import compose_config

from lightning_attn_parallel.cli import run
from lightning_attn_parallel.plan import ParallelPlan
from lightning_attn_parallel.planning.dry_run import plan_code, plan_overrides


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    import contextlib
    import io

    cfg = compose_config(["+recipe=deepseek_67b", "dry_run=true", "trainer.num_nodes=16", "trainer.devices=8"],
                         run_dir=str(tmp_path_factory.mktemp("dry") / "run"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        run(cfg)
    return out.getvalue()


def _table(report: str) -> list[str]:
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("plan "))
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("  (GiB"))
    return lines[start:end]


def test_columns_line_up_with_long_plan_names(report):
    table = _table(report)
    assert max(len(line.split("  ")[1]) for line in table[1:]) > 36, "the case needs a long plan name"
    assert len({len(line) for line in table}) == 1, "\n".join(table)
    fits = table[0].index("fits") + len("fits")
    for line in table[1:]:
        assert line[fits - 3:fits] in ("yes", " NO"), line


def test_every_abbreviation_in_the_table_is_explained(report):
    table = "\n".join(_table(report))
    for abbreviation in re.findall(r"\+sp|acc=\w+|\(\w+\)|block/\d", table):
        key = "/" if "/" in abbreviation else re.sub(r"\(\w+\)", "(ring)", abbreviation)
        assert f"  {key}: " in report, abbreviation


def test_the_selected_plan_comes_with_its_overrides_and_the_requested_ones_slowness(report):
    assert "Run the selected plan with:" in report and "strategy.plan.dp_shard=64" in report
    assert "ParallelPlan(dp_replicate=1, dp_shard=64, tp=2" in report
    assert re.search(r"The requested plan .* is predicted 2\.\dx slower", report.replace("\n  ", " "))
    assert re.search(r"Memory: .*\(5\.6% free\) is within the planner's largest memory error", report)


def test_overrides_rebuild_the_plan_from_the_requested_one():
    requested = ParallelPlan(tp=8, dp_shard=8, activation_checkpointing="block", compile="block")
    selected = ParallelPlan(dp_replicate=1, dp_shard=64, tp=2, sequence_parallel=True, compile="block")
    values = dict(o.removeprefix("strategy.plan.").split("=") for o in plan_overrides(selected, requested))
    assert values == {"dp_replicate": "1", "dp_shard": "64", "cp": "1", "tp": "2", "ep": "1",
                      "sequence_parallel": "true", "activation_checkpointing": "none"}
    assert eval(plan_code(selected), {"ParallelPlan": ParallelPlan}) == selected
