"""Where the CPU time goes: a py-spy profile of a benchmark step, summed by pipeline stage.

    py-spy record -r 50 --threads --subprocesses --format raw -o prof.txt -- \\
        .venv/bin/python benchmarks/bench_network.py --rtp-steps 100 --ws-steps 0
    .venv/bin/python benchmarks/profile_shares.py prof.txt

py-spy (without ``--idle``) samples only threads that are on a CPU, so a
stage's samples / rate is its CPU time. Each sample is counted once, under
the first stage below that one of its frames names (so the inference
thread's result handling is not counted as inference, and the pipeline
thread's resampling is not counted as the pipeline loop). Samples of the
benchmark's sender process and of its main thread (the harness: imports,
waiting, collecting figures) are reported on their own lines, not as
serstream's cost.
"""

from __future__ import annotations

import collections
import re
import sys

#: (stage, frame substrings): the first stage one of whose substrings a frame of the stack contains wins.
STAGES: list[tuple[str, tuple[str, ...]]] = [
    ("inference (ONNX Runtime)", ("Session.run",)),
    ("resampling", ("StreamResampler.process", "StreamResampler.flush")),
    ("VAD (webrtcvad and its framing)", ("VadSegmenter.push",)),
    ("windows (scheduler, order gate, batch former)", ("WindowScheduler.", "BatchFormer.", "StreamEstimator.admit",
                                                      "StreamEstimator.ready", "Monitor._release", "Monitor._dispatch",
                                                      "Monitor._submit")),
    ("results to event dicts (estimator, smoother, speaker state)", ("Monitor._on_result",)),
    ("event encoding and delivery (JSON, WebSocket sends)", ("json", "EventBus", "websockets", "_broadcast")),
    ("RTP receive, decode, jitter buffer", ("RtpSource._run",)),
    ("sanitising, levels, rings", ("clean_in_place", "float_to_pcm16", "AudioRing", "StreamPipeline.push")),
    # A thread woken hundreds of times a second (every push wakes the pipeline) spends CPU in the wait itself.
    ("thread wake-ups (Event/Condition waits)", ("Event.wait", "Condition.wait")),
    ("WebSocket server loop (ingest frames in, handshakes; asyncio)", ("asyncio",)),
]
SENDER = "benchmark sender process (not serstream)"
HARNESS = "benchmark harness main thread (not serstream)"
OTHER = "other monitor Python (thread loops, locks, stats, sockets)"


def owner_of(frames: list[str]) -> str:
    """The thread a stack belongs to; with --subprocesses the first frame names the process."""
    if frames[0].startswith("process") and len(frames) > 1:
        owner = frames[1]
        return SENDER if owner.startswith("process") else owner
    return frames[0]


def shares(lines: list[str]) -> collections.Counter[str]:
    by_stage: collections.Counter[str] = collections.Counter()
    for line in lines:
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")
        n = int(count)
        owner = owner_of(frames)
        if owner == SENDER:
            by_stage[SENDER] += n
        elif "MainThread" in owner or re.fullmatch(r"thread \(\d+\)", owner):
            by_stage[HARNESS] += n
        else:
            for stage, keys in STAGES:
                if any(key in frame for frame in frames[1:] for key in keys):
                    by_stage[stage] += n
                    break
            else:
                by_stage[OTHER] += n
    return by_stage


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    rate = float(argv[1]) if len(argv) > 1 else 50.0
    with open(argv[0]) as handle:
        counted = shares(handle.readlines())
    ours = {k: v for k, v in counted.items() if k not in (SENDER, HARNESS)}
    total = sum(ours.values())
    print(f"serstream: {total / rate:.1f} CPU-seconds in {argv[0]} (py-spy at {rate:g} Hz)")
    for stage, n in sorted(ours.items(), key=lambda kv: -kv[1]):
        print(f"  {100.0 * n / max(total, 1):5.1f} %  {n / rate:6.1f} s  {stage}")
    for stage in (SENDER, HARNESS):
        print(f"  (not counted: {counted.get(stage, 0) / rate:.1f} s  {stage})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
