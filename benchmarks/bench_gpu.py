"""The GPU path in one run: provider, inference per window at batch 1 to 1024, and what that carries.

    .venv/bin/python benchmarks/bench_gpu.py                       # on a machine with an NVIDIA GPU
    .venv/bin/python benchmarks/bench_gpu.py --device cpu --quick  # a dry run of the script anywhere

Prints (and with ``--json PATH`` writes) three things:

* **the provider** ONNX Runtime gave the model (``CUDAExecutionProvider`` or
  why not), the GPU's name and driver from ``nvidia-smi`` when present;
* **inference** on 3 s windows of speech-like audio at batch 1, 2, 4, ...,
  1024: median milliseconds per batch and per window, windows per second,
  and the GPU memory in use after each size (``nvidia-smi``);
* **what the inference tier alone carries**: the best windows per second
  divided by the windows a speaking stream asks for per second
  (``--windows-per-stream``, default 1.82: measured at 90 sustained RTP
  streams on CPU, ``benchmarks/bench_network.py``, 2463 estimates in 15 s).
  That is an upper bound for one node: the per-stream pipelines (resample,
  VAD, windows) run on the node's CPU cores, one ``--workers`` process per
  core; measure them with ``benchmarks/bench_network.py --workers auto``
  on the same node and take the smaller of the two.

Each batch size is timed after two warm-up calls (the first calls allocate
and, on CUDA, pick kernels); batches that fail (out of GPU memory) are
reported as such and end the sweep, one line, no traceback.

* **live shapes** (``--live-calls N``): a fixed shape is the easy case. A
  live monitor's batches change shape on nearly every call (windows of
  0.5-8 s, batches of 1-64), and anything the provider does once per new
  shape is paid on every call. This times N such calls (after 5 warm-up
  calls of other shapes): median and p95 ms per call, windows per second.
  ``--cudnn-search`` sets the CUDA provider's cuDNN algorithm search
  (default: the monitor's, ``CUDA_PROVIDER_OPTIONS`` in
  serstream/inference/session.py).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from serstream.bench import speech_like  # noqa: E402 - after the sys.path line above
from serstream.contract import SAMPLE_RATE  # noqa: E402
from serstream.errors import one_line  # noqa: E402

#: Windows per second a speaking stream asks for (partials every 0.5 s of speech plus finals), measured on CPU.
WINDOWS_PER_STREAM = 1.82


def nvidia_smi(query: str) -> list[str]:
    """``nvidia-smi --query-gpu=QUERY`` lines, or [] when there is no nvidia-smi or it fails."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def sweep(model: Any, sizes: list[int], repeats: int) -> list[dict[str, Any]]:
    """Median time per batch of 3 s windows at each size; stops at the first size that fails."""
    window = speech_like(4.0, seed=7)[: 3 * SAMPLE_RATE]
    rows: list[dict[str, Any]] = []
    for size in sizes:
        audio = np.ascontiguousarray(np.tile(window, (size, 1)))
        lengths = np.full(size, window.size, np.int64)
        try:
            for _ in range(2):
                model.infer(audio, lengths)
            times = []
            for _ in range(repeats if size <= 64 else max(3, repeats // 3)):
                started = time.perf_counter()
                model.infer(audio, lengths)
                times.append(time.perf_counter() - started)
        except Exception as exc:  # noqa: BLE001 - out of memory is a result here, not a crash
            rows.append({"batch": size, "error": one_line(exc, limit=200)})
            break
        batch_ms = statistics.median(times) * 1000.0
        used = nvidia_smi("memory.used")
        rows.append({
            "batch": size,
            "batch_ms": round(batch_ms, 4),
            "window_ms": round(batch_ms / size, 4),
            "windows_per_s": round(size / (batch_ms / 1000.0), 1),
            "gpu_memory_used_mib": int(used[0]) if used else None,
        })
        print(f"  batch {size:5d}: {batch_ms:9.2f} ms/batch {batch_ms / size:8.3f} ms/window "
              f"{size / (batch_ms / 1000.0):10.1f} windows/s"
              + (f"  GPU memory {used[0]} MiB" if used else ""), flush=True)
    return rows


def live_shapes(model: Any, calls: int, seed: int = 11) -> dict[str, Any]:
    """Time ``calls`` batches whose size (1-64) and window lengths (0.5-8 s) change every call."""
    rng = np.random.default_rng(seed)
    speech = speech_like(9.0, seed=5)
    times: list[float] = []
    windows = 0
    for call in range(calls + 5):
        batch = int(rng.integers(1, 65))
        longest = int(rng.integers(SAMPLE_RATE // 2, 8 * SAMPLE_RATE + 1))
        lengths = rng.integers(max(longest // 2, 1), longest + 1, size=batch).astype(np.int64)
        lengths[0] = longest
        audio = np.zeros((batch, longest), np.float32)
        for row, length in enumerate(lengths):
            audio[row, :length] = speech[:length]
        started = time.perf_counter()
        model.infer(audio, lengths)
        if call >= 5:  # the first calls allocate; every later one still brings a new shape
            times.append(time.perf_counter() - started)
            windows += batch
    ms = np.array(times) * 1000.0
    row = {"calls": calls, "median_ms": round(float(np.median(ms)), 3),
           "p95_ms": round(float(np.percentile(ms, 95)), 3),
           "windows_per_s": round(windows / float(np.sum(times)), 1)}
    print(f"  live shapes, {calls} calls: median {row['median_ms']:.2f} ms/call, "
          f"p95 {row['p95_ms']:.2f} ms, {row['windows_per_s']:.0f} windows/s", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="cuda",
                        help="where ONNX Runtime runs the model (default cuda: the point of this script)")
    parser.add_argument("--model", default=None, help="ONNX model (default: the shipped one)")
    parser.add_argument("--max-batch", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--windows-per-stream", type=float, default=WINDOWS_PER_STREAM)
    parser.add_argument("--quick", action="store_true", help="batches up to 32, 3 repeats (a dry run)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the figures as JSON")
    parser.add_argument("--live-calls", type=int, default=0, metavar="N",
                        help="also time N calls whose batch size and window lengths change every call (0: skip)")
    parser.add_argument("--cudnn-search", choices=("exhaustive", "heuristic", "default"), default=None,
                        help="the CUDA provider's cuDNN algorithm search (default: the monitor's own setting)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the fixed-shape sweep")
    args = parser.parse_args(argv)
    if args.live_calls < 0:
        parser.error(f"--live-calls must be 0 (skip) or more, got {args.live_calls}")

    from serstream.inference.session import CUDA_PROVIDER_OPTIONS, EmotionModel, describe_device
    from serstream.models import resolve_model_path

    max_batch = 32 if args.quick else args.max_batch
    repeats = 3 if args.quick else args.repeats
    sizes = [1 << i for i in range(0, 11) if (1 << i) <= max_batch]
    try:
        cuda_options = dict(CUDA_PROVIDER_OPTIONS)
        if args.cudnn_search:
            cuda_options["cudnn_conv_algo_search"] = args.cudnn_search.upper()
        model = EmotionModel.load(resolve_model_path(args.model), device=args.device, cuda_options=cuda_options)
    except Exception as exc:  # noqa: BLE001 - one line for a missing model, CUDA or driver
        print(f"bench_gpu: {one_line(exc, limit=None)}", file=sys.stderr)
        return 1
    gpus = nvidia_smi("name,driver_version,memory.total")
    provider = describe_device(model)
    search = cuda_options["cudnn_conv_algo_search"] if model.device == "cuda" else "-"
    print(f"model {model.info.version} on {provider}; cuDNN algorithm search {search}")
    print(f"GPU: {'; '.join(gpus) if gpus else 'none seen by nvidia-smi'}")
    live = live_shapes(model, args.live_calls) if args.live_calls else None
    rows = []
    if not args.no_sweep:
        print("inference, 3 s windows of speech-like audio:")
        rows = sweep(model, sizes, repeats)
    ok = [row for row in rows if "windows_per_s" in row]
    best = max(ok, key=lambda row: row["windows_per_s"]) if ok else None
    carried = int(best["windows_per_s"] / args.windows_per_stream) if best else 0
    if best:
        print(f"best: {best['windows_per_s']:.0f} windows/s at batch {best['batch']}: the inference tier alone "
              f"carries about {carried} speaking streams ({args.windows_per_stream} windows/s each); the "
              "pipelines' share is measured by benchmarks/bench_network.py --workers auto on this node")
    report = {"model": model.info.version, "provider": provider, "cudnn_conv_algo_search": search, "gpus": gpus,
              "live_shapes": live, "sweep": rows,
              "windows_per_stream": args.windows_per_stream, "inference_streams_upper_bound": carried}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
