"""A W&B workspace laid out for this plugin's metrics.

    python -m lightning_attn_parallel.dashboard --entity ENTITY --project PROJECT

Sections: throughput, memory, load balance, communication. Panel keys come from
callbacks.metrics, the same constants the callbacks log, so the panels cannot drift from the
data. Needs the optional `dashboard` extra (the wandb-workspaces package) and, to save, network
access and a W&B login; building the specification needs neither.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Optional, Sequence

from .callbacks import metrics as m

MISSING_PACKAGE = ("the dashboard needs the wandb-workspaces package: "
                   "pip install 'lightning-attn-parallel[dashboard]'")


def _workspace_api() -> tuple[Any, Any]:
    """(wandb_workspaces.workspaces, wandb_workspaces.reports.v2), or a clear ImportError."""
    try:
        import wandb_workspaces.reports.v2 as reports
        import wandb_workspaces.workspaces as workspaces
    except ImportError as error:
        raise ImportError(MISSING_PACKAGE) from error
    return workspaces, reports


def _sections(reports: Any) -> list[tuple[str, list[Any]]]:
    def line(title: str, *keys: str) -> Any:
        return reports.LinePlot(title=title, x=m.STEP, y=list(keys))

    def ranks(title: str, prefix: str) -> Any:
        return reports.LinePlot(title=title, x=m.STEP, metric_regex=m.per_rank_pattern(prefix))

    quantities = m.BALANCE_QUANTITIES
    return [
        ("Training", [
            line("Loss", m.TRAIN_LOSS, m.VAL_LOSS),
            line("Learning rate", m.LEARNING_RATE),
        ]),
        ("Throughput", [
            line("Tokens/s (global)", m.TOKENS_PER_S),
            line("Tokens/s per GPU", m.TOKENS_PER_S_PER_GPU),
            line("Model TFLOP/s per GPU", m.TFLOPS_PER_GPU),
            line("MFU", m.MFU),
            line("Step time (s)", m.STEP_TIME_S),
        ]),
        ("Memory", [
            line("Current memory, max over ranks (GiB)", m.MEMORY_ALLOCATED, m.MEMORY_RESERVED),
            line("Peak memory per window, max over ranks (GiB)",
                 m.MEMORY_PEAK_ALLOCATED, m.MEMORY_PEAK_RESERVED),
            ranks("Peak allocated per rank (GiB)", m.MEMORY_PEAK_ALLOCATED),
        ]),
        ("Load balance", [
            line("Imbalance (max - min) / mean", *(m.imbalance(q) for q in quantities)),
            line("Efficiency min / max", *(m.efficiency(q) for q in quantities)),
            ranks("Busy time per step by rank (s)", m.BALANCE_STEP_TIME),
            ranks("Tokens per step by rank", m.BALANCE_TOKENS),
            ranks("Attention TFLOP per step by rank", m.BALANCE_ATTENTION_TFLOP),
            reports.LinePlot(title="Expert load (MoE)", x=m.STEP, metric_regex=m.moe_pattern()),
        ]),
        ("Communication", [
            line("Gradient communication per step (ms)", m.COMM_TIME_MS, m.COMM_EXPOSED_MS),
            line("Hidden fraction", m.COMM_HIDDEN_FRACTION),
            line("Volume per step (GB)", m.COMM_GBYTES),
        ]),
    ]


def build_workspace_spec(entity: str, project: str, name: str = "Attention-parallel training") -> Any:
    """The workspace (a wandb_workspaces Workspace), built without touching the network."""
    workspaces, reports = _workspace_api()
    return workspaces.Workspace(
        entity=entity, project=project, name=name,
        settings=workspaces.WorkspaceSettings(x_axis=m.STEP),
        sections=[workspaces.Section(name=title, panels=panels, is_open=True)
                  for title, panels in _sections(reports)],
    )


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lightning_attn_parallel.dashboard",
                                     description="Save a W&B workspace for this plugin's metrics.")
    parser.add_argument("--entity", required=True, help="W&B entity (user or team)")
    parser.add_argument("--project", required=True, help="W&B project")
    parser.add_argument("--name", default="Attention-parallel training", help="workspace name")
    args = parser.parse_args(argv)
    try:
        workspace = build_workspace_spec(args.entity, args.project, args.name)
    except ImportError as error:
        parser.exit(2, f"error: {error}\n")
    workspace.save()
    print(f"workspace saved: {workspace.url}")


if __name__ == "__main__":
    main(sys.argv[1:])
