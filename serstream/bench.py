"""``serstream bench``: inference speed, end-of-speech latency, stream capacity and memory.

What it measures, all with the model it is given:

* **inference**: milliseconds per batch of 3 s windows at batch 1, 8, 32 and
  64 (median over repeats), and per window (batch time / batch size);
* **latency**: end of speech (after the VAD hangover) to the final event, and
  the partial events' latency, at low load (a few real-time streams);
* **capacity**: real-time 16 kHz streams fed by one feeder thread in 20 ms
  blocks from pre-rendered speech-like audio with pauses, ramped up step by
  step; a step is *sustained* when no audio was dropped and the p95 event
  latency stayed under 250 ms (the ramp stops at the first step that is not);
* **memory**: resident set size (VmRSS) idle with the model loaded, and the
  peak under load.

The audio is synthetic (harmonic voiced sound with a syllable envelope, which
webrtcvad takes for speech), so the benchmark needs no files and no tools.
"""

from __future__ import annotations

import gc
import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from serstream.contract import SAMPLE_RATE
from serstream.inference.worker import InferenceBackend
from serstream.monitor import Monitor, MonitorConfig

__all__ = [
    "BenchSettings",
    "InferenceFigure",
    "StepFigure",
    "BenchReport",
    "speech_like",
    "rss_mb",
    "time_inference",
    "measure_latency",
    "run_step",
    "run_bench",
    "run_cli",
]

#: The capacity criterion of the issue: p95 event latency below this, and no audio dropped.
P95_LIMIT_MS = 250.0
BLOCK_MS = 20


@dataclass(frozen=True)
class BenchSettings:
    """How long and how hard to push."""

    batch_sizes: tuple[int, ...] = (1, 8, 32, 64)
    inference_repeats: int = 15
    window_s: float = 3.0
    latency_streams: int = 4
    latency_seconds: float = 20.0
    ramp: tuple[int, ...] = (50, 100, 200, 300, 400)
    step_seconds: float = 20.0

    @classmethod
    def quick(cls) -> BenchSettings:
        return cls(inference_repeats=4, latency_streams=2, latency_seconds=8.0, ramp=(10, 25, 50),
                   step_seconds=6.0)


@dataclass
class InferenceFigure:
    batch: int
    batch_ms: float
    per_window_ms: float


@dataclass
class StepFigure:
    streams: int
    seconds: float
    sustained: bool
    audio_dropped: int
    windows: int
    windows_per_s: float
    p50_ms: float | None
    p95_ms: float | None
    final_p95_ms: float | None
    partials_superseded: int
    # Partials unsent partials_max_age_s after queueing (monitor overload rule); finals never expire.
    partials_expired: int
    finals_dropped: int
    mean_batch: float
    feeder_lag_ms: float
    cpu_percent: float
    rss_mb: float
    why: str = ""


@dataclass
class BenchReport:
    model: str
    device: str
    cpu_count: int
    inference: list[InferenceFigure] = field(default_factory=list)
    final_latency_ms: dict[str, float | None] = field(default_factory=dict)
    partial_latency_ms: dict[str, float | None] = field(default_factory=dict)
    steps: list[StepFigure] = field(default_factory=list)
    max_sustained_streams: int = 0
    rss_idle_mb: float = 0.0
    rss_load_mb: float = 0.0


def speech_like(seconds: float, seed: int = 0, rate: int = SAMPLE_RATE) -> np.ndarray:
    """Voiced bursts (1.2-3 s) separated by pauses (0.5-1.2 s): float32 mono, peak about 0.3."""
    rng = np.random.default_rng(seed)
    total = int(seconds * rate)
    out = np.zeros(total, np.float32)
    pos = int(rng.uniform(0.2, 0.8) * rate)
    while pos < total:
        length = int(rng.uniform(1.2, 3.0) * rate)
        n = min(length, total - pos)
        t = np.arange(n) / rate
        f0 = rng.uniform(100, 220)
        pitch = f0 * (1 + 0.08 * np.sin(2 * np.pi * rng.uniform(2, 4) * t))
        phase = 2 * np.pi * np.cumsum(pitch) / rate
        voiced = sum(np.sin(k * phase) / k for k in range(1, 16))
        envelope = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(3, 5) * t - np.pi / 2) ** 2
        burst = voiced * envelope
        burst *= 0.3 / (np.abs(burst).max() or 1.0)
        out[pos:pos + n] = burst
        pos += n + int(rng.uniform(0.5, 1.2) * rate)
    out += (0.003 * rng.standard_normal(total)).astype(np.float32)
    return out


def rss_mb() -> float:
    """Resident set size of this process (VmRSS), MB; 0 where /proc is not there."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


def _cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def time_inference(model: InferenceBackend, settings: BenchSettings) -> list[InferenceFigure]:
    """Median batch time of ``window_s`` windows at each batch size."""
    window = speech_like(settings.window_s + 1.0, seed=7)[: int(settings.window_s * SAMPLE_RATE)]
    figures: list[InferenceFigure] = []
    for batch in settings.batch_sizes:
        audio = np.tile(window, (batch, 1))
        lengths = np.full(batch, window.size, np.int64)
        for _ in range(2):  # warm-up: first runs allocate
            model.infer(audio, lengths)
        times = []
        for _ in range(settings.inference_repeats):
            started = time.perf_counter()
            model.infer(audio, lengths)
            times.append(time.perf_counter() - started)
        median_ms = float(np.median(times)) * 1000.0
        figures.append(InferenceFigure(batch, median_ms, median_ms / batch))
    return figures


class _Latencies:
    """Sink that keeps the latency of every emotion event (light: runs on the monitor's threads)."""

    def __init__(self) -> None:
        self.partial: list[float] = []
        self.final: list[float] = []

    def __call__(self, event: dict[str, Any]) -> None:
        if event["type"] == "emotion":
            (self.final if event["kind"] == "final" else self.partial).append(event["latency_ms"])


def _percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def run_step(model: InferenceBackend, streams: int, seconds: float, audio: np.ndarray) -> StepFigure:
    """Feed ``streams`` real-time streams for ``seconds`` and report how the monitor kept up."""
    sink = _Latencies()
    monitor = Monitor(model, MonitorConfig(max_streams=max(streams, 1), stats_interval_s=3600), sink)
    monitor.start()
    handles = [
        monitor.open_stream(f"bench-{i}", source="file", codec="pcm_f32", sample_rate=SAMPLE_RATE, channels=1)
        for i in range(streams)
    ]
    block = SAMPLE_RATE * BLOCK_MS // 1000
    offsets = [(i * 7919 * 3) % (audio.size - block) for i in range(streams)]
    # Twice the audio so a block never wraps; each stream starts somewhere else in it.
    looped = np.concatenate([audio, audio])
    n_blocks = int(seconds * 1000 / BLOCK_MS)
    peak_rss = rss_mb()
    max_lag = 0.0
    cpu0, wall0 = _cpu_seconds(), time.monotonic()
    started = time.monotonic()
    for k in range(n_blocks):
        due = started + (k + 1) * BLOCK_MS / 1000.0
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:
            max_lag = max(max_lag, -delay)
        for handle, offset in zip(handles, offsets):
            start = (offset + k * block) % audio.size
            handle.push(looped[start:start + block])
        if k % 50 == 0:
            peak_rss = max(peak_rss, rss_mb())
    for handle in handles:
        handle.close()
    monitor.wait_idle(timeout=60)
    cpu = _cpu_seconds() - cpu0
    wall = time.monotonic() - wall0
    stats = monitor.stats()
    monitor.stop()
    latencies = sink.partial + sink.final
    p95 = _percentile(latencies, 95)
    dropped = int(stats["drops"]["audio_samples"])
    why = []
    if dropped:
        why.append(f"{dropped} samples dropped")
    if p95 is None or p95 >= P95_LIMIT_MS:
        why.append("no estimates" if p95 is None else f"p95 {p95:.0f} ms >= {P95_LIMIT_MS:.0f} ms")
    if max_lag * 1000 > P95_LIMIT_MS:
        why.append(f"feeder fell {max_lag * 1000:.0f} ms behind real time")
    return StepFigure(
        streams=streams, seconds=seconds, sustained=not why, audio_dropped=dropped,
        windows=len(latencies), windows_per_s=len(latencies) / max(seconds, 1e-9),
        p50_ms=_percentile(latencies, 50), p95_ms=p95, final_p95_ms=_percentile(sink.final, 95),
        partials_superseded=int(stats["drops"]["partials_superseded"]),
        partials_expired=int(stats["drops"]["partials_expired"]),
        finals_dropped=int(stats["drops"]["finals_dropped"]), mean_batch=float(stats["batches"]["mean_size"]),
        feeder_lag_ms=max_lag * 1000.0, cpu_percent=100.0 * cpu / max(wall, 1e-9), rss_mb=peak_rss,
        why="; ".join(why),
    )


def measure_latency(model: InferenceBackend, settings: BenchSettings, audio: np.ndarray) -> tuple[dict, dict]:
    """End-of-speech to final event, and partial latency, with a few real-time streams."""
    sink = _Latencies()
    monitor = Monitor(model, MonitorConfig(stats_interval_s=3600), sink)
    monitor.start()
    handles = [
        monitor.open_stream(f"lat-{i}", source="file", codec="pcm_f32", sample_rate=SAMPLE_RATE, channels=1)
        for i in range(settings.latency_streams)
    ]
    block = SAMPLE_RATE * BLOCK_MS // 1000
    started = time.monotonic()
    n_blocks = int(settings.latency_seconds * 1000 / BLOCK_MS)
    for k in range(n_blocks):
        delay = started + (k + 1) * BLOCK_MS / 1000.0 - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        for i, handle in enumerate(handles):
            # Streams a quarter second apart: their ends of speech do not coincide.
            start = (k * block + i * SAMPLE_RATE // 4) % (audio.size - block)
            handle.push(audio[start:start + block])
    for handle in handles:
        handle.close()
    monitor.wait_idle(timeout=30)
    monitor.stop()

    def summary(values: list[float]) -> dict[str, float | None]:
        return {"p50": _percentile(values, 50), "p95": _percentile(values, 95), "count": float(len(values))}

    return summary(sink.final), summary(sink.partial)


def run_bench(
    model: InferenceBackend,
    settings: BenchSettings,
    max_streams: int | None = None,
    progress: Any = None,
) -> BenchReport:
    """Every measurement in turn; ``progress(text)`` hears what is running."""
    say = progress or (lambda text: None)
    gc.collect()
    report = BenchReport(
        model=str(getattr(model.info, "version", "?")), device=str(getattr(model, "device", "cpu")),
        cpu_count=os.cpu_count() or 1,
    )
    # Idle: the model loaded and a monitor running with no streams.
    idle = Monitor(model, MonitorConfig())
    idle.start()
    time.sleep(0.5)
    report.rss_idle_mb = rss_mb()
    idle.stop()

    audio = speech_like(60.0, seed=1)
    say(f"end-of-speech latency, {settings.latency_streams} streams for {settings.latency_seconds:g} s")
    report.final_latency_ms, report.partial_latency_ms = measure_latency(model, settings, audio)
    ramp = [n for n in settings.ramp if max_streams is None or n <= max_streams]
    peak = report.rss_idle_mb
    for n in ramp:
        say(f"capacity: {n} real-time streams for {settings.step_seconds:g} s")
        step = run_step(model, n, settings.step_seconds, audio)
        report.steps.append(step)
        peak = max(peak, step.rss_mb)
        if not step.sustained:
            break
        report.max_sustained_streams = n
        gc.collect()
    report.rss_load_mb = peak
    # Last: batch 64 grows ONNX Runtime's arena beyond what the monitor (batches of 32) uses.
    say("inference per batch size")
    report.inference = time_inference(model, settings)
    return report


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_report(report: BenchReport) -> str:
    """The figures as a plain-text table."""
    lines = [
        f"model {report.model} on {report.device}, {report.cpu_count} CPU cores",
        "",
        "inference (3 s windows)     batch   ms/batch   ms/window",
    ]
    for fig in report.inference:
        lines.append(f"{'':28}{fig.batch:>5}   {fig.batch_ms:>8.2f}   {fig.per_window_ms:>9.2f}")
    f, p = report.final_latency_ms, report.partial_latency_ms
    lines += [
        "",
        f"end of speech -> final event   p50 {_fmt(f.get('p50'))} ms   p95 {_fmt(f.get('p95'))} ms"
        f"   ({int(f.get('count') or 0)} finals)",
        f"partial estimates              p50 {_fmt(p.get('p50'))} ms   p95 {_fmt(p.get('p95'))} ms"
        f"   ({int(p.get('count') or 0)} partials)",
        "",
        "real-time 16 kHz streams   sustained  dropped  est/s   p50 ms  p95 ms  final p95  superseded  "
        "expired  batch  cpu%  RSS MB",
    ]
    for s in report.steps:
        lines.append(
            f"{s.streams:>26}   {'yes' if s.sustained else 'NO ':<9} {s.audio_dropped:>7}  {s.windows_per_s:>5.0f}   "
            f"{_fmt(s.p50_ms):>6}  {_fmt(s.p95_ms):>6}  {_fmt(s.final_p95_ms):>9}  {s.partials_superseded:>10}  "
            f"{s.partials_expired:>7}  {s.mean_batch:>5.1f}  {s.cpu_percent:>4.0f}  {s.rss_mb:>6.0f}"
            + (f"   ({s.why})" if s.why else "")
        )
    lines += [
        "",
        f"most concurrent real-time streams sustained: {report.max_sustained_streams}"
        + ("" if not report.steps or not report.steps[-1].sustained else " (the highest step tried)"),
        f"resident memory: idle {report.rss_idle_mb:.0f} MB with the model loaded, "
        f"{report.rss_load_mb:.0f} MB peak under load",
    ]
    return "\n".join(lines)


def run_cli(model: InferenceBackend, quick: bool = False, max_streams: int | None = None,
            as_json: bool = False) -> int:
    """``serstream bench``: run and print; progress on stderr."""
    import sys

    settings = BenchSettings.quick() if quick else BenchSettings()
    if max_streams is not None and max_streams < 1:
        raise ValueError("--max-streams must be >= 1")
    report = run_bench(model, settings, max_streams,
                       progress=lambda text: print(f"serstream bench: {text}", file=sys.stderr, flush=True))
    if as_json:
        print(json.dumps(asdict(report), indent=2))
    else:
        print(format_report(report))
    return 0
