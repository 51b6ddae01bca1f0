#!/usr/bin/env bash
# Creates clients/livekit/.venv with livekit-agents (from PyPI), the serstream-client distribution
# and the serstream-livekit plugin (both editable, from this checkout).
#
# The plugin never shares an environment with the monitor: an agent's environment has no business
# with the monitor's onnxruntime-gpu, and livekit-agents' own dependencies (and its plugins', e.g.
# silero's plain onnxruntime) must not reach ./.venv, which this script never touches. Re-running
# it is cheap: it reinstalls only when clients/livekit/pyproject.toml or clients/python/pyproject.toml
# changed. Network is needed only while it installs.
#   bash scripts/livekit-venv.sh           create or update
#   bash scripts/livekit-venv.sh --force   reinstall the plugin and its dependencies
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd -P)"
venv="$repo/clients/livekit/.venv"
case "$venv" in
  "$repo/.venv"|"$repo/.venv/"*) echo "livekit-venv: refusing to use the main .venv" >&2; exit 2 ;;
esac
PY="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  "$PY" -m venv "$venv"
fi
stamp="$venv/.serstream-livekit-stamp"
wanted="$(cat clients/livekit/pyproject.toml clients/python/pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ "${1:-}" != "--force" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ]; then
  exit 0
fi
"$venv/bin/python" -m pip install -q --upgrade pip >/dev/null
# The client first, from this checkout (it is not taken from a package index), then the plugin,
# which brings livekit-agents from PyPI.
"$venv/bin/python" -m pip install -q -e clients/python -e clients/livekit
if "$venv/bin/python" -m pip show -q onnxruntime-gpu >/dev/null 2>&1; then
  echo "livekit-venv: onnxruntime-gpu ended up in $venv; it belongs to the monitor only" >&2
  exit 1
fi
if "$venv/bin/python" -m pip show -q serstream >/dev/null 2>&1; then
  echo "livekit-venv: the serstream monitor package ended up in $venv; only serstream-client belongs here" >&2
  exit 1
fi
echo "$wanted" > "$stamp"
echo "livekit-venv: ready ($("$venv/bin/python" -c 'import importlib.metadata as m; print("livekit-agents", m.version("livekit-agents"))'))"
