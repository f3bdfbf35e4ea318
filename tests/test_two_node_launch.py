"""A real two-node launch on one machine: two launcher processes, NODE_RANK 0 and 1."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from dist_utils import assert_close, free_port
from lightning_utils import FixedTokens, UserModule, loader, params_of, quiet_trainer

SCRIPT = Path(__file__).parent / "scripts" / "two_node_train.py"


def test_two_launchers_train_like_one_process(tmp_path):
    port = free_port()
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    env.pop("LOCAL_RANK", None)
    launchers = [subprocess.Popen([sys.executable, str(SCRIPT), str(tmp_path)],
                                  env=dict(env, NODE_RANK=str(node)), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
                 for node in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in launchers]
    for p, log in zip(launchers, logs):
        assert p.returncode == 0, log[-3000:]

    torch.manual_seed(0)
    reference = UserModule()
    quiet_trainer(devices=1, max_steps=3, accumulate_grad_batches=2).fit(reference, loader(FixedTokens(), 8))
    expected = params_of(reference)
    for rank in range(4):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["node_rank"] == rank // 2
        assert result["hierarchical"] >= 2, "the reducer did not take the hierarchical path"
        for key, value in expected.items():
            assert_close(result["params"][key], value, name=f"rank{rank} {key}")
