#!/usr/bin/env bash
# Create .venv (if missing) and install the project with its test tools into it.
# torch is pinned to the CPU build these machines carry only when no torch is installed yet;
# a GPU machine keeps the torch it has (use `--system-site-packages` via LAP_SYSTEM_SITE=1).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  if [ "${LAP_SYSTEM_SITE:-0}" = "1" ]; then
    python3 -m venv --system-site-packages .venv
  else
    python3 -m venv .venv
  fi
fi
PY=.venv/bin/python
"$PY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -e ".[dev]"
"$PY" -c "import torch, lightning, lightning_attn_parallel; print(f'ready: torch {torch.__version__}, lightning {lightning.__version__}')"
