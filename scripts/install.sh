#!/usr/bin/env bash
# Installs serstream into ./.venv: Debian packages it needs (where missing), then the package.
#   bash scripts/install.sh            runtime only (the monitor)
#   bash scripts/install.sh --dev      also the training package and the test tools
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-}"
if [ "$mode" = "--dev" ]; then
  bash scripts/install-system-deps.sh --test
else
  bash scripts/install-system-deps.sh
fi
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
if [ "$mode" = "--dev" ]; then
  # The training code is its own distribution (training/pyproject.toml); torch is pinned there
  # to the CPU wheel, since a bare `torch` would pull a CUDA build.
  # The client distribution (clients/python, `serstream-client`) comes from this checkout, first.
  .venv/bin/python -m pip install -q -e ./clients/python -e ".[test]" -e ./training
else
  .venv/bin/python -m pip install -q -e ./clients/python -e .
fi
