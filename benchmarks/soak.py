"""Soak: N real-time speech streams through ``serstream listen`` for an hour, with a connected subscriber.

    .venv/bin/python benchmarks/soak.py                          # 50 streams, 60 minutes
    .venv/bin/python benchmarks/soak.py --streams 10 --minutes 3 # a short run

What runs: one ``serstream listen`` subprocess replaying N WAV files in real
time (``--file ... --loop``), each stream its own file, so the audio enters
through the real file source and the real monitor (nothing is injected behind
it). The speech is espeak-ng sentences with pauses (conversational density:
about 60 % speech), each stream's copy rotated to its own offset so the
streams do not speak in lockstep; without espeak-ng and sox, the speech-like
synthetic audio of tests/audio.py. This process holds one ``/events``
subscriber (no stream filter) for the whole run.

Every ``--interval-s`` (30 s) it samples the monitor process (resident memory,
open files, threads, from /proc) and what the subscriber saw in the interval:
events, the p50/p95 of the emotion events' ``latency_ms`` (the monitor's own
measure: audio in to event out) and of the delivery lag (receive wall time
minus the event's ``ts``), audio samples dropped (the monitor's ``stats``
counter), and event ids missing (holes in the bus-wide ``id`` sequence plus
what ``gap`` events report). It prints one table row per sample, then a
summary: memory growth after warm-up (%), audio dropped, events lost to the
subscriber. ``--json-out`` writes the same figures as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SENTENCES = (
    "Good morning, I would like to check on my order please.",
    "It was supposed to arrive last Tuesday and it still has not come.",
    "Could you tell me where it is right now?",
    "This is the third time I have called about it this week!",
    "Thank you, that is really helpful, I appreciate it.",
    "Fine, I will wait for the email then.",
)

#: The columns of the table, in order; each is a field of :class:`Sample`.
COLUMNS = ("t_s", "rss_mb", "fds", "threads", "events", "lat_p50_ms", "lat_p95_ms", "lag_p95_ms",
           "audio_dropped", "ids_missing")


@dataclass
class Sample:
    t_s: float
    rss_mb: float
    fds: int
    threads: int
    events: int
    lat_p50_ms: float
    lat_p95_ms: float
    lag_p95_ms: float
    audio_dropped: int
    ids_missing: int


@dataclass
class Subscriber:
    """What the /events subscriber counted; the sampler reads and resets the interval lists."""

    received: int = 0
    last_id: int = 0
    ids_missing: int = 0
    gap_events: int = 0
    gap_lost: int = 0
    audio_dropped: int = 0
    events_dropped_by_monitor: int = 0
    streams_seen: set[str] = field(default_factory=set)
    interval_events: int = 0
    latencies: list[float] = field(default_factory=list)
    lags: list[float] = field(default_factory=list)
    connected: bool = False
    reconnects: int = 0


# ------------------------------------------------------------------ audio


def _speech(work: Path, use_espeak: bool) -> tuple[Any, int]:
    import numpy as np
    import soundfile as sf

    if use_espeak and shutil.which("espeak-ng") and shutil.which("sox"):
        from tests.audio import espeak_sentences

        path = espeak_sentences(work / "speech.wav", SENTENCES, pause_s=1.2)
        audio, rate = sf.read(str(path), dtype="float32")
        return np.asarray(audio, dtype=np.float32), int(rate)
    from tests.audio import SAMPLE_RATE, speech_with_pauses

    pattern = tuple((0.8 + 0.3 * (i % 3), 1.5 + 0.4 * (i % 4)) for i in range(10))
    return speech_with_pauses(pattern).astype(np.float32), SAMPLE_RATE


def make_stream_files(work: Path, streams: int, use_espeak: bool) -> list[Path]:
    """One WAV per stream: the same speech rotated to a different offset."""
    import numpy as np
    import soundfile as sf

    audio, rate = _speech(work, use_espeak)
    files = []
    for i in range(streams):
        shift = int(len(audio) * i / max(1, streams))
        path = work / f"s{i + 1:03d}.wav"
        sf.write(str(path), np.roll(audio, -shift), rate, subtype="PCM_16")
        files.append(path)
    return files


# ------------------------------------------------------------------ process figures


def proc_figures(pid: int) -> tuple[float, int, int]:
    """Resident memory (MiB), open file descriptors and threads of ``pid``, from /proc."""
    rss_kb = 0
    threads = 0
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                rss_kb = int(line.split()[1])
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return rss_kb / 1024.0, fds, threads


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100.0 * (len(ordered) - 1))))]


# ------------------------------------------------------------------ the run


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def account(sub: Subscriber, event: dict[str, Any], received_at: float) -> None:
    """Count one event: ids (holes are events lost to this subscriber), gaps, latency, stats."""
    sub.received += 1
    sub.interval_events += 1
    kind = event.get("type")
    if kind == "gap":
        sub.gap_events += 1
        sub.gap_lost += int(event.get("lost", 0))
        return
    event_id = event.get("id")
    if isinstance(event_id, int):
        if sub.last_id and event_id > sub.last_id + 1:
            sub.ids_missing += event_id - sub.last_id - 1
        sub.last_id = max(sub.last_id, event_id)
    if isinstance(event.get("ts"), (int, float)):
        sub.lags.append(max(0.0, (received_at - float(event["ts"])) * 1000.0))
    if kind == "emotion":
        sub.latencies.append(float(event.get("latency_ms", 0.0)))
        sub.streams_seen.add(str(event.get("stream")))
    elif kind == "stats":
        drops = event.get("drops") or {}
        sub.audio_dropped = int(drops.get("audio_samples", 0))
        sub.events_dropped_by_monitor = int(drops.get("events_dropped", 0))


async def subscribe(url: str, sub: Subscriber, stop: asyncio.Event) -> None:
    """Hold one /events connection; after a loss, resume with ?since= (counted as a reconnect)."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    while not stop.is_set():
        target = url + (f"?since={sub.last_id}" if sub.last_id else "")
        try:
            async with connect(target, max_size=None, compression=None, open_timeout=5) as ws:
                sub.connected = True
                async for message in ws:
                    account(sub, json.loads(message), time.time())
                    if stop.is_set():
                        break
        except (TimeoutError, OSError, ConnectionClosed):
            pass
        if sub.connected and not stop.is_set():
            sub.reconnects += 1
        await asyncio.sleep(0.2)


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="serstream-soak-"))
    files = make_stream_files(work, args.streams, use_espeak=not args.synthetic)
    port = free_port()
    model = args.model
    if model is None:
        shipped = REPO / "models" / "serstream-default.onnx"
        if shipped.is_file():
            model = str(shipped)
        else:
            from tests.modelfactory import build_test_model

            model = str(build_test_model(work / "factory.onnx"))
    command = [sys.executable, "-m", "serstream", "listen", "--model", model, "--port", str(port), "--loop",
               "--quiet", *[arg for f in files for arg in ("--file", str(f))]]
    if args.threads:
        command += ["--threads", str(args.threads)]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log = open(work / "monitor.log", "w+", encoding="utf-8")
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log)
    sub = Subscriber()
    samples: list[Sample] = []
    stop = asyncio.Event()
    started = time.monotonic()
    try:
        reader = asyncio.create_task(subscribe(f"ws://127.0.0.1:{port}/events", sub, stop))
        deadline = time.monotonic() + 60
        while not sub.connected:
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise SystemExit(f"soak: the monitor did not start: {log.read().strip()[-500:]}")
            await asyncio.sleep(0.1)
        started = time.monotonic()
        end = started + args.minutes * 60.0
        print(f"soak: {args.streams} streams, {args.minutes:g} min, sample every {args.interval_s:g} s, "
              f"model {model}, monitor pid {proc.pid}", file=sys.stderr, flush=True)
        print("  ".join(f"{c:>13}" for c in COLUMNS), flush=True)
        next_sample = started + args.interval_s
        while True:
            now = time.monotonic()
            if proc.poll() is not None:
                raise SystemExit(f"soak: the monitor exited early (code {proc.returncode})")
            if now >= next_sample or now >= end:
                rss, fds, threads = proc_figures(proc.pid)
                sample = Sample(
                    t_s=round(now - started, 1), rss_mb=round(rss, 1), fds=fds, threads=threads,
                    events=sub.interval_events,
                    lat_p50_ms=round(percentile(sub.latencies, 50), 1),
                    lat_p95_ms=round(percentile(sub.latencies, 95), 1),
                    lag_p95_ms=round(percentile(sub.lags, 95), 1),
                    audio_dropped=sub.audio_dropped, ids_missing=sub.ids_missing + sub.gap_lost,
                )
                sub.interval_events = 0
                sub.latencies.clear()
                sub.lags.clear()
                samples.append(sample)
                print("  ".join(f"{getattr(sample, c):>13}" for c in COLUMNS), flush=True)
                next_sample += args.interval_s
                if now >= end:
                    break
            await asyncio.sleep(min(0.2, max(0.0, min(next_sample, end) - time.monotonic())))
        stop.set()
        reader.cancel()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
        shutil.rmtree(work, ignore_errors=True)
    return summarise(args, samples, sub)


def summarise(args: argparse.Namespace, samples: list[Sample], sub: Subscriber) -> dict[str, Any]:
    warm = [s for s in samples if s.t_s >= args.warmup_s] or samples[-1:]
    base = warm[0].rss_mb if warm else 0.0
    growth = ((warm[-1].rss_mb - base) / base * 100.0) if warm and base else 0.0
    summary = {
        "streams": args.streams,
        "minutes": args.minutes,
        "warmup_s": args.warmup_s,
        "rss_after_warmup_mb": base,
        "rss_end_mb": samples[-1].rss_mb if samples else 0.0,
        "memory_growth_after_warmup_pct": round(growth, 2),
        "audio_dropped": sub.audio_dropped,
        "events_received": sub.received,
        "events_lost": sub.ids_missing + sub.gap_lost,
        "gap_events": sub.gap_events,
        "reconnects": sub.reconnects,
        "events_dropped_by_monitor": sub.events_dropped_by_monitor,
        "streams_with_estimates": len(sub.streams_seen),
        "latency_p95_ms_max": max((s.lat_p95_ms for s in samples), default=0.0),
        "latency_p50_ms_median": statistics.median([s.lat_p50_ms for s in samples]) if samples else 0.0,
    }
    return {"summary": summary, "samples": [asdict(s) for s in samples], "columns": list(COLUMNS)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=50, help="real-time streams (default 50)")
    parser.add_argument("--minutes", type=float, default=60.0, help="duration (default 60)")
    parser.add_argument("--interval-s", type=float, default=30.0, help="seconds between samples (default 30)")
    parser.add_argument("--warmup-s", type=float, default=None,
                        help="memory growth is measured from the first sample at or after this "
                        "(default: 10 %% of the run, at least one interval)")
    parser.add_argument("--model", default=None, help="ONNX model (default: the shipped model)")
    parser.add_argument("--threads", type=int, default=None, help="inference threads of the monitor")
    parser.add_argument("--synthetic", action="store_true", help="synthetic speech-like audio instead of espeak-ng")
    parser.add_argument("--json-out", metavar="PATH", help="also write the samples and summary as JSON")
    args = parser.parse_args(argv)
    if args.streams < 1 or not args.minutes > 0 or not args.interval_s > 0:
        parser.error("--streams, --minutes and --interval-s must be positive")
    if args.warmup_s is None:
        args.warmup_s = max(args.interval_s, args.minutes * 6.0)
    result = asyncio.run(soak(args))
    s = result["summary"]
    print(f"\nsummary: {s['streams']} streams, {s['minutes']:g} min; memory {s['rss_after_warmup_mb']} MiB after "
          f"warm-up -> {s['rss_end_mb']} MiB at the end ({s['memory_growth_after_warmup_pct']:+.2f} %); "
          f"audio dropped {s['audio_dropped']} samples; events lost to the subscriber {s['events_lost']} "
          f"({s['events_received']} received, {s['gap_events']} gap events, {s['reconnects']} reconnects); "
          f"events dropped by the monitor {s['events_dropped_by_monitor']}; "
          f"{s['streams_with_estimates']} streams gave estimates; latency p50 {s['latency_p50_ms_median']} ms "
          f"(median of samples), worst p95 {s['latency_p95_ms_max']} ms", flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
