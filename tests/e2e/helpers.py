"""Running ``serstream`` in the background and collecting what it says."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import onnx

from tests.conftest import REPO, serstream_command

__all__ = ["Background", "model_with_metadata"]


def model_with_metadata(source: Path, target: Path, **changes: str) -> Path:
    """Copy the ONNX model ``source`` to ``target`` with some ``metadata_props`` values replaced.

    The graph is untouched, so the session still accepts the model: only what
    the monitor reads from the metadata changes.
    """
    model = onnx.load(str(source))
    missing = set(changes) - {prop.key for prop in model.metadata_props}
    assert not missing, f"{source} has no metadata keys {sorted(missing)}"
    for prop in model.metadata_props:
        if prop.key in changes:
            prop.value = changes[prop.key]
    target.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(target))
    return target


class Background:
    """A ``serstream`` subprocess whose stdout (JSON lines) and stderr lines are collected by threads."""

    def __init__(self, args: Sequence[str], env: dict[str, str] | None = None) -> None:
        environment = dict(os.environ if env is None else env)
        environment.pop("SERSTREAM_MODEL", None)
        environment["PYTHONUNBUFFERED"] = "1"
        self.proc = subprocess.Popen(
            [*serstream_command(), *args], cwd=REPO, env=environment, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, self.stdout), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, self.stderr), daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _pump(self, pipe: Any, into: list[str]) -> None:
        for line in pipe:
            with self._lock:
                into.append(line.rstrip("\n"))

    def json_events(self) -> list[dict[str, Any]]:
        with self._lock:
            lines = list(self.stdout)
        return [json.loads(line) for line in lines if line.startswith("{")]

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.proc.poll() is not None:
                raise AssertionError(f"serstream exited ({self.proc.returncode}) waiting for {what}:\n"
                                     + "\n".join(self.stderr[-20:]))
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; stderr:\n" + "\n".join(self.stderr[-20:]))
            time.sleep(0.05)

    def stderr_has(self, fragment: str) -> bool:
        with self._lock:
            return any(fragment in line for line in self.stderr)

    def finish(self, timeout: float = 30) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        for thread in self._threads:
            thread.join(timeout=5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


