"""A command-line run reads and checks its config before torch and Lightning load, and importing
the package still registers the strategy name, whichever comes first."""
from __future__ import annotations

import subprocess
import sys

import pytest


def _python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip()


def test_the_config_checks_load_neither_torch_nor_lightning():
    loaded = _python("import sys; import lightning_attn_parallel.train, lightning_attn_parallel.preflight; "
                     "print(sorted(m for m in ('torch', 'lightning') if m in sys.modules))")
    assert loaded == "[]"


@pytest.mark.parametrize("order", ["import lightning_attn_parallel; import lightning",
                                   "import lightning; import lightning_attn_parallel",
                                   # a submodule that imports Lightning itself, first
                                   "import lightning_attn_parallel.strategy",
                                   "import lightning_attn_parallel.fabric"])
def test_the_strategy_name_registers_in_either_order(order):
    """Both front-ends' registries know the name, whatever was imported first."""
    assert _python(f"{order}\nfrom lightning.pytorch.strategies import StrategyRegistry\n"
                   "from lightning.fabric.strategies import STRATEGY_REGISTRY\n"
                   "print('attn_hybrid' in StrategyRegistry, 'attn_hybrid' in STRATEGY_REGISTRY)") == "True True"
