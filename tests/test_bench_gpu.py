"""benchmarks/bench_gpu.py, the prepared GPU run: it must work when a GPU machine is lent, so it runs here on CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.modelfactory import build_test_model

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "bench_gpu.py"


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_test_model(tmp_path_factory.mktemp("gpu") / "factory.onnx")


def test_dry_run_on_cpu_sweeps_batches_and_writes_the_figures(model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--model", str(model_path), "--max-batch", "4",
         "--repeats", "2", "--json", str(out)],
        capture_output=True, text=True, timeout=240, cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert [row["batch"] for row in report["sweep"]] == [1, 2, 4]
    for row in report["sweep"]:
        assert row["batch_ms"] > 0
        assert row["window_ms"] == pytest.approx(row["batch_ms"] / row["batch"], rel=1e-3, abs=1e-4)
    assert report["provider"].startswith("cpu")
    best = max(row["windows_per_s"] for row in report["sweep"])
    assert report["inference_streams_upper_bound"] == int(best / report["windows_per_stream"])
    assert "best:" in done.stdout


def test_asking_for_cuda_without_a_gpu_is_one_line(model_path: Path) -> None:
    from serstream.inference.session import cuda_usable

    if cuda_usable():
        pytest.skip("this machine has a usable CUDA GPU")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cuda", "--model", str(model_path), "--quick"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bench_gpu: ") and "Traceback" not in done.stderr


def test_live_shapes_time_calls_whose_shape_changes_every_call(model_path: Path, tmp_path: Path) -> None:
    """--live-calls: what a live monitor's batches cost (the fixed-shape sweep hid the CUDA search cost)."""
    out = tmp_path / "live.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--model", str(model_path), "--live-calls", "4",
         "--no-sweep", "--cudnn-search", "default", "--json", str(out)],
        capture_output=True, text=True, timeout=240, cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    live = report["live_shapes"]
    assert live["calls"] == 4 and 0 < live["median_ms"] <= live["p95_ms"] and live["windows_per_s"] > 0
    assert report["sweep"] == [] and report["cudnn_conv_algo_search"] == "-"  # on CPU no cuDNN search applies
    assert "live shapes, 4 calls" in done.stdout
