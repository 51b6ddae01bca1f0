#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what it needs, then runs pytest.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k vad`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --dev
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@" tests
