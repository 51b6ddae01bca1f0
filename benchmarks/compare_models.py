"""Interleaved A/B timing of two ONNX models on one 3 s window, batch 1, one thread.

    .venv/bin/python benchmarks/compare_models.py OLD.onnx NEW.onnx [--rounds 60]

Rounds alternate between the models (5 runs each), so drift in the machine's
speed (other processes, CPU clock) lands on both; the figure to quote is the
ratio of the medians. Prints both medians and minima in ms per window.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from serstream.bench import speech_like
from serstream.inference.session import EmotionModel


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs=2, type=Path, metavar="MODEL")
    parser.add_argument("--rounds", type=int, default=60)
    args = parser.parse_args(argv)
    for path in args.models:
        if not path.is_file():
            print(f"compare_models: error: {path} not found", file=sys.stderr)
            return 2
    models = [EmotionModel.load(path, device="cpu", threads=1) for path in args.models]
    window = speech_like(4.0, seed=7)[:48_000][None, :]
    lengths = np.array([window.shape[1]], np.int64)
    for model in models:  # warm-up: the first runs allocate
        for _ in range(3):
            model.infer(window, lengths)
    times: list[list[float]] = [[] for _ in models]
    for _ in range(args.rounds):
        for model, out in zip(models, times):
            started = time.perf_counter()
            for _ in range(5):
                model.infer(window, lengths)
            out.append((time.perf_counter() - started) / 5 * 1000.0)
    for path, model, out in zip(args.models, models, times):
        print(f"{path} (v{model.info.version}): median {np.median(out):.2f} ms, min {np.min(out):.2f} ms")
    print(f"ratio of medians (second / first): {np.median(times[1]) / np.median(times[0]):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
