#!/usr/bin/env bash
# Create .venv (if missing) and install the project with its test tools into it.
# torch is pinned to the CPU build these machines carry only when no torch is installed yet;
# a GPU machine keeps the torch it has (use `--system-site-packages` via LAP_SYSTEM_SITE=1).
set -euo pipefail
cd "$(dirname "$0")/.."
step() { echo "setup: $*" >&2; }
if [ ! -x .venv/bin/python ]; then
  step "creating .venv"
  if [ "${LAP_SYSTEM_SITE:-0}" = "1" ]; then
    python3 -m venv --system-site-packages .venv
  else
    python3 -m venv .venv
  fi
fi
PY=.venv/bin/python
step "upgrading pip"
"$PY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  step "installing torch 2.13 (CPU build; the largest download)"
  "$PY" -m pip install -q "torch==2.13.0"
fi
step "installing the project and its test tools (Lightning, Hydra, transformers, ...; about a minute)"
# setuptools warns about editable installs in general (folders named like the package): nothing to act on
PYTHONWARNINGS="ignore:Editable installation" "$PY" -m pip install -q -e ".[dev]"
step "checking the imports"
"$PY" -c "import torch, lightning, lightning_attn_parallel; print(f'ready: torch {torch.__version__}, lightning {lightning.__version__}')"
