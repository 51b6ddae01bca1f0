"""Lint and types are part of the test command: ``ruff check`` and three ``mypy`` runs.

The rule set and the strictness live in pyproject.toml (``[tool.ruff]``,
``[tool.mypy]``); this file runs the tools as subprocesses from the
repository root and fails with their output. ``mypy --strict`` covers the
pure cores, the codec registry and the event model (server side and the
client distribution); plain ``mypy`` covers the rest of ``serstream/``, and
``training/`` where the training dependencies (torch, ...) are installed.
mypy's cache goes to the system temp folder, never into the repository.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CLIENT_SRC = ROOT / "clients" / "python" / "src"

#: What must pass ``mypy --strict`` (the rest of serstream/ gets plain ``mypy``).
STRICT_TARGETS = (
    "serstream/core",
    "serstream/rtp",
    "serstream/codecs.py",
    "serstream/events.py",
    "clients/python/src/serstream_client",
)

#: The typed libraries that mypy follows from training/ (training/pyproject.toml's dependencies): without
#: them installed it reports their imports as missing, so the check is skipped instead.
TRAINING_TYPED_DEPENDENCIES = ("torch", "onnx", "librosa", "matplotlib")


def _require(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (it comes with the `test` extra: pip install -e '.[test]')")


def _run(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    # this checkout's serstream and serstream_client, whatever is installed in the environment
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(CLIENT_SRC), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("MYPYPATH", None)
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _mypy(*args: str) -> subprocess.CompletedProcess[str]:
    _require("mypy")
    cache = Path(tempfile.gettempdir()) / f"serstream-mypy-cache-{os.getuid() if hasattr(os, 'getuid') else 0}"
    return _run("mypy", "--cache-dir", str(cache), "--no-error-summary", "--hide-error-context", *args)


def _assert_clean(proc: subprocess.CompletedProcess[str], what: str) -> None:
    assert proc.returncode == 0, f"{what} found problems (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}"


def test_ruff_finds_nothing() -> None:
    _require("ruff")
    proc = _run("ruff", "check", "--no-cache", "--output-format", "concise")
    _assert_clean(proc, "ruff check")


def test_ruff_checks_every_python_folder() -> None:
    """The rule set covers what pyproject.toml says; a folder silently left out would pass trivially."""
    _require("ruff")
    proc = _run("ruff", "check", "--no-cache", "--show-files")
    _assert_clean(proc, "ruff check --show-files")
    listed = proc.stdout
    for folder in ("serstream", "training", "tests", "benchmarks", "clients"):
        assert f"{ROOT / folder}{os.sep}" in listed, f"ruff does not check {folder}/"


def test_mypy_strict_on_the_cores_and_the_event_model() -> None:
    _assert_clean(_mypy("--strict", *STRICT_TARGETS), "mypy --strict " + " ".join(STRICT_TARGETS))


def test_mypy_on_the_whole_package() -> None:
    _assert_clean(_mypy("serstream"), "mypy serstream")


def test_mypy_on_the_training_code() -> None:
    missing = [m for m in TRAINING_TYPED_DEPENDENCIES if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (the training dependencies: pip install -e training)")
    _assert_clean(_mypy("training"), "mypy training")
