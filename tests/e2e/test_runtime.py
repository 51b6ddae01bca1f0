"""The runtime as installed: it never loads torch, and model metadata it cannot use is one line.

``serstream`` runs in real subprocesses with the factory model; nothing is mocked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, serstream_command
from tests.e2e.helpers import model_with_metadata

pytestmark = pytest.mark.slow

#: Packages only the training side may load.
TRAINING_ONLY = ("torch", "torchaudio", "training", "librosa", "sklearn", "onnxscript")

_NO_TORCH_SCRIPT = """
import importlib, json, pkgutil, sys
import serstream
from serstream.cli import main
rc = main(sys.argv[1:])
# Every runtime module, including the ones this command did not need.
for info in pkgutil.walk_packages(serstream.__path__, "serstream."):
    importlib.import_module(info.name)
loaded = sorted({name.split(".")[0] for name in sys.modules} & set(%r))
print(json.dumps({"rc": rc, "loaded": loaded}), file=sys.stderr)
"""


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "SERSTREAM_MODEL"}


def test_runtime_never_imports_torch(factory_model: Path, synthetic_wav: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    script = _NO_TORCH_SCRIPT % (TRAINING_ONLY,)
    proc = subprocess.run(
        [sys.executable, "-c", script, "analyze", "--model", str(factory_model), str(synthetic_wav),
         "--output", str(out)],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stderr.strip().splitlines()[-1])
    assert report["rc"] == 0, proc.stderr
    assert report["loaded"] == [], f"the runtime loaded {report['loaded']}"
    # The command did real work: a file summary came out.
    assert any(json.loads(line)["type"] == "file" for line in out.read_text().splitlines())


@pytest.mark.parametrize(
    "key,value,fragment",
    [("sample_rate", "8000", "sample_rate 8000 Hz"), ("labels", json.dumps(["calm"] * 8), "more than once")],
    ids=["sample_rate", "labels"],
)
@pytest.mark.parametrize("command", ["listen", "analyze"])
def test_unusable_model_metadata_is_one_line(
    factory_model: Path, synthetic_wav: Path, tmp_path: Path, free_port: int,
    command: str, key: str, value: str, fragment: str,
) -> None:
    model = model_with_metadata(factory_model, tmp_path / f"{key}.onnx", **{key: value})
    args = ["--model", str(model)]
    if command == "listen":
        args += ["--file", str(synthetic_wav), "--fast", "--exit-when-done", "--port", str(free_port), "--quiet"]
    else:
        args += [str(synthetic_wav), "--output", str(tmp_path / "out.jsonl")]
    proc = subprocess.run(
        [*serstream_command(), command, *args], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("serstream: error: ") and fragment in lines[0] and str(model) in lines[0]
