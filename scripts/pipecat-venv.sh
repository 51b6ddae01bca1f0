#!/usr/bin/env bash
# Creates clients/pipecat/.venv with pipecat-ai, the serstream-client distribution and the
# serstream-pipecat plugin (both editable).
#
# pipecat-ai depends on the plain `onnxruntime`, which must never share an
# environment with the monitor's `onnxruntime-gpu`; this venv is therefore
# separate from ./.venv, which this script never touches. Re-running it is
# cheap: it reinstalls only when clients/pipecat/pyproject.toml or clients/python/pyproject.toml changed.
#   bash scripts/pipecat-venv.sh           create or update
#   bash scripts/pipecat-venv.sh --force   reinstall the plugin and its dependencies
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd -P)"
venv="$repo/clients/pipecat/.venv"
case "$venv" in
  "$repo/.venv"|"$repo/.venv/"*) echo "pipecat-venv: refusing to use the main .venv" >&2; exit 2 ;;
esac
PY="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  "$PY" -m venv "$venv"
fi
stamp="$venv/.serstream-pipecat-stamp"
wanted="$(cat clients/pipecat/pyproject.toml clients/python/pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ "${1:-}" != "--force" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ]; then
  exit 0
fi
"$venv/bin/python" -m pip install -q --upgrade pip >/dev/null
# The client first, from this checkout (it is not taken from a package index), then the plugin.
"$venv/bin/python" -m pip install -q -e clients/python -e clients/pipecat
# The guard that gives this venv its reason to exist.
if "$venv/bin/python" -m pip show -q onnxruntime-gpu >/dev/null 2>&1; then
  echo "pipecat-venv: onnxruntime-gpu ended up in $venv; it must not (pipecat-ai needs the plain onnxruntime)" >&2
  exit 1
fi
if "$venv/bin/python" -m pip show -q serstream >/dev/null 2>&1; then
  echo "pipecat-venv: the serstream monitor package ended up in $venv; only serstream-client belongs here" >&2
  exit 1
fi
echo "$wanted" > "$stamp"
echo "pipecat-venv: ready ($("$venv/bin/python" -c 'import importlib.metadata as m; print("pipecat-ai", m.version("pipecat-ai"))'))"
