"""The W&B workspace: panels name exactly what the callbacks log, built without the network."""
from __future__ import annotations

import re
import sys

import pytest
import wandb

from lightning_attn_parallel import dashboard
from lightning_attn_parallel.callbacks import default_callbacks, metrics as m
from test_callbacks import StandInReducer, fit_tiny, read_offline_run

OUR_PREFIXES = ("throughput/", "memory/", "balance/", "comm/")


def _panel_keys(sections) -> tuple[set[str], list[str]]:
    """(metric keys named by panels, regular expressions of per-rank / per-layer panels)."""
    keys, patterns = set(), []
    for section in sections:
        for panel in section.panels:
            keys.update(panel.y)
            if panel.metric_regex:
                patterns.append(panel.metric_regex)
    return keys, patterns


def test_panel_keys_equal_logged_keys(tmp_path):
    trainer = fit_tiny(tmp_path, default_callbacks(peak_tflops=1.0, report=False), max_steps=2,
                       log_every_n_steps=1, reducer=StandInReducer())
    files_dir = trainer.logger.experiment.dir
    wandb.finish()
    history, _ = read_offline_run(files_dir)
    logged = {k for row in history for k in row if k.startswith(OUR_PREFIXES)}

    sections = dashboard.build_workspace_spec("entity", "project").sections
    keys, patterns = _panel_keys([s for s in sections if s.name != "Training"])  # the module's: below
    per_rank = {k for k in logged if any(re.match(p, k) for p in patterns)}
    assert keys == logged - per_rank
    assert per_rank == {m.per_rank(prefix, 0) for prefix in
                        (m.MEMORY_PEAK_ALLOCATED, *m.BALANCE_QUANTITIES)}
    # every pattern but the MoE one (the model is dense) matches something that was logged
    unmatched = [p for p in patterns if not any(re.match(p, k) for k in logged)]
    assert unmatched == [m.moe_pattern()]
    assert not any(re.match(p, k) for p in patterns for k in keys)  # no panel shows a key twice


def test_workspace_layout():
    workspace = dashboard.build_workspace_spec("my-team", "my-project", name="runs")
    assert (workspace.entity, workspace.project, workspace.name) == ("my-team", "my-project", "runs")
    assert [s.name for s in workspace.sections] == ["Training", "Throughput", "Memory", "Load balance",
                                                   "Communication"]
    sections = {s.name: _panel_keys([s])[0] for s in workspace.sections}
    assert all(k.startswith("throughput/") for k in sections["Throughput"])
    assert all(k.startswith("memory/") for k in sections["Memory"])
    assert all(k.startswith("balance/") for k in sections["Load balance"])
    assert sections["Communication"] == {m.COMM_TIME_MS, m.COMM_EXPOSED_MS,
                                         m.COMM_HIDDEN_FRACTION, m.COMM_GBYTES}
    assert all(panel.x == m.STEP for s in workspace.sections for panel in s.panels)


def test_training_panels_name_what_the_module_logs(tmp_path):
    """The Training section plots exactly the loss and learning-rate keys CausalLMModule logs."""
    from lightning_attn_parallel import CausalLMModule
    from lightning_utils import FixedTokens, loader, quiet_trainer
    from test_planner import TINY

    training = [s for s in dashboard.build_workspace_spec("e", "p").sections if s.name == "Training"]
    keys, patterns = _panel_keys(training)
    trainer = quiet_trainer(max_steps=2, limit_val_batches=1, val_check_interval=2,
                            default_root_dir=str(tmp_path))
    data = loader(FixedTokens(n=8, seq_len=8, vocab=TINY.vocab_size), 2)
    trainer.fit(CausalLMModule(TINY), data, data)
    assert not patterns
    assert keys == {m.TRAIN_LOSS, m.VAL_LOSS, m.LEARNING_RATE}
    assert keys <= set(trainer.logged_metrics)


def test_cli_explains_a_missing_package(monkeypatch, capsys):
    for name in [n for n in sys.modules if n.startswith("wandb_workspaces")] + ["wandb_workspaces"]:
        monkeypatch.setitem(sys.modules, name, None)  # makes `import wandb_workspaces...` fail
    with pytest.raises(SystemExit) as exit_info:
        dashboard.main(["--entity", "e", "--project", "p"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "wandb-workspaces" in err and "lightning-attn-parallel[dashboard]" in err
