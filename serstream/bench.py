"""``serstream bench``: inference speed, end-of-speech latency, stream capacity and memory.

What it measures, all with the model it is given:

* **inference**: milliseconds per batch of 3 s windows at batch 1, 8, 32 and
  64 (median over repeats), and per window (batch time / batch size);
* **latency**: end of speech (after the VAD hangover) to the final event, and
  the partial events' latency, at low load (a few real-time streams);
* **capacity**: real-time 16 kHz streams entering through the real file
  source (one :class:`~serstream.sources.file.FileSource` per stream, in real
  time, looping, as ``serstream listen --file X --loop`` runs it), ramped up
  step by step. Each step is judged by :mod:`serstream.core.capacity`, the
  one definition every benchmark uses: *sustained (every partial)* when no
  audio was dropped, no partial expired, partial p95 < 250 ms and final p95 <
  500 ms; *with partials thinned* when the same holds but partials may be
  thinned. The ramp stops at the first step that fails even the thinned
  reading;
* **memory**: resident set size (VmRSS) idle with the model loaded, and the
  peak under load.

The audio is synthetic speech-like sound at conversational density
(:func:`speech_like`: utterances of 1-8 s, about 75 % voiced, harmonic voiced
sound with a syllable envelope that webrtcvad takes for speech), written to a
temporary folder as 16 kHz WAV files for the file sources (and removed after
the run), so the benchmark needs no recordings and no tools.
"""

from __future__ import annotations

import gc
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import soundfile as sf

from serstream.contract import SAMPLE_RATE
from serstream.core.capacity import (
    FINAL_P95_LIMIT_MS,
    PARTIAL_P95_LIMIT_MS,
    StepOutcome,
    Verdict,
    capacity,
    judge,
)
from serstream.inference.session import describe_device
from serstream.inference.worker import InferenceBackend
from serstream.monitor import Monitor, MonitorConfig
from serstream.sources.file import FileSource

__all__ = [
    "BenchSettings",
    "InferenceFigure",
    "StepFigure",
    "BenchReport",
    "speech_like",
    "write_load_files",
    "rss_mb",
    "time_inference",
    "measure_latency",
    "run_step",
    "run_bench",
    "run_cli",
]

#: Kept for callers of the old name: the partial p95 limit of the capacity rule.
P95_LIMIT_MS = PARTIAL_P95_LIMIT_MS
BLOCK_MS = 20
#: Distinct speech files the streams share (stream i replays file i % LOAD_FILES).
LOAD_FILES = 16
#: Seconds of audio in each (the sources loop them).
LOAD_FILE_SECONDS = 40.0
#: The sources of a step start spread over this many seconds, so streams on one file do not speak in unison.
START_SPREAD_S = 2.0


@dataclass(frozen=True)
class BenchSettings:
    """How long and how hard to push."""

    batch_sizes: tuple[int, ...] = (1, 8, 32, 64)
    inference_repeats: int = 15
    window_s: float = 3.0
    latency_streams: int = 4
    latency_seconds: float = 20.0
    ramp: tuple[int, ...] = (25, 50, 75, 100, 125, 150, 200, 300, 400)
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
    #: Sustained with every partial (the capacity rule); ``thinned``: with partials thinned.
    sustained: bool
    thinned: bool
    audio_dropped: int
    partials: int
    finals: int
    windows_per_s: float
    p50_ms: float | None
    #: p95 of the partials' audio-to-event latency, and of end-of-speech-to-final.
    p95_ms: float | None
    final_p95_ms: float | None
    partials_superseded: int
    # Partials unsent partials_max_age_s after queueing (monitor overload rule); finals never expire.
    partials_expired: int
    partials_dropped: int
    finals_dropped: int
    mean_batch: float
    #: How far the slowest file source fell behind real time at the end of the step.
    source_lag_ms: float
    cpu_percent: float
    rss_mb: float
    why: str = ""
    why_thinned: str = ""

    @property
    def windows(self) -> int:
        return self.partials + self.finals


@dataclass
class BenchReport:
    model: str
    device: str
    cpu_count: int
    inference: list[InferenceFigure] = field(default_factory=list)
    final_latency_ms: dict[str, float | None] = field(default_factory=dict)
    partial_latency_ms: dict[str, float | None] = field(default_factory=dict)
    steps: list[StepFigure] = field(default_factory=list)
    #: Most streams sustained with every partial (the capacity figure), and with partials thinned.
    max_sustained_streams: int = 0
    max_thinned_streams: int = 0
    rss_idle_mb: float = 0.0
    rss_load_mb: float = 0.0
    #: ``cpu (CPUExecutionProvider; CUDA not used: ...)``: the execution provider the model got.
    provider: str = ""


def speech_like(seconds: float, seed: int = 0, rate: int = SAMPLE_RATE) -> np.ndarray:
    """Conversational density: utterances of 1-8 s between pauses of 0.8-2.2 s (about 75 % voiced).

    float32 mono, peak about 0.3, a faint noise floor. Each utterance is
    harmonic voiced sound (its own pitch, with vibrato) under a 3-5 Hz syllable
    envelope that never falls silent, so the VAD keeps it as one segment; the
    pauses are longer than the VAD hangover (0.4 s), so each one ends a segment.
    """
    rng = np.random.default_rng(seed)
    total = int(seconds * rate)
    out = np.zeros(total, np.float32)
    pos = int(rng.uniform(0.2, 0.8) * rate)
    while pos < total:
        length = int(rng.uniform(1.0, 8.0) * rate)
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
        pos += n + int(rng.uniform(0.8, 2.2) * rate)
    out += (0.003 * rng.standard_normal(total)).astype(np.float32)
    return out


def write_load_files(folder: Path, count: int = LOAD_FILES, seconds: float = LOAD_FILE_SECONDS) -> list[Path]:
    """``count`` distinct speech-like 16 kHz PCM16 WAV files in ``folder`` for the file sources."""
    paths = []
    for i in range(count):
        path = Path(folder) / f"load-{i:02d}.wav"
        sf.write(str(path), speech_like(seconds, seed=100 + i), SAMPLE_RATE, subtype="PCM_16")
        paths.append(path)
    return paths


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
    """Sink that keeps the latency of every emotion event from ``since`` on (light: runs on monitor threads)."""

    def __init__(self) -> None:
        self.partial: list[float] = []
        self.final: list[float] = []
        self.since = float("inf")

    def __call__(self, event: dict[str, Any]) -> None:
        if event["type"] == "emotion" and time.monotonic() >= self.since:
            (self.final if event["kind"] == "final" else self.partial).append(event["latency_ms"])


def _percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def _run_load(
    model: InferenceBackend, streams: int, seconds: float, files: Sequence[Path]
) -> tuple[StepFigure, _Latencies]:
    """``streams`` file sources replaying ``files`` in real time for ``seconds`` (after all have started)."""
    if streams < 1 or not files:
        raise ValueError("a load step needs at least one stream and one file")
    sink = _Latencies()
    monitor = Monitor(model, MonitorConfig(max_streams=max(streams, 1), stats_interval_s=3600), sink)
    monitor.start()
    sources: list[FileSource] = []
    started_at: list[float] = []
    cpu0, wall0 = _cpu_seconds(), time.monotonic()
    peak_rss = rss_mb()
    try:
        spread = START_SPREAD_S if streams > 1 else 0.0
        for i in range(streams):
            delay = wall0 + i * spread / streams - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            source = FileSource(monitor, files[i % len(files)], realtime=True, loop=True, stream_id=f"bench-{i}")
            started_at.append(time.monotonic())
            source.start()
            sources.append(source)
        # The step's figures start once every stream is on (the start spread is a lighter load).
        sink.since = time.monotonic()
        end = sink.since + seconds
        while (left := end - time.monotonic()) > 0:
            time.sleep(min(0.5, left))
            peak_rss = max(peak_rss, rss_mb())
        now = time.monotonic()
        # A real-time source has pushed what has elapsed, less the block it is capturing.
        lag_s = max(
            (now - t0) - source.frames_pushed / source.sample_rate - BLOCK_MS / 1000.0
            for source, t0 in zip(sources, started_at)
        )
    finally:
        for source in sources:
            source.stop()
    monitor.wait_idle(timeout=60)
    cpu = _cpu_seconds() - cpu0
    wall = time.monotonic() - wall0
    stats = monitor.stats()
    monitor.stop()
    drops = stats["drops"]
    outcome = StepOutcome(
        streams=streams,
        audio_dropped=int(drops["audio_samples"]),
        partials_expired=int(drops["partials_expired"]),
        partials_dropped=int(drops["partials_dropped"]),
        finals_dropped=int(drops["finals_dropped"]),
        partials_superseded=int(drops["partials_superseded"]),
        partials=len(sink.partial),
        finals=len(sink.final),
        partial_p95_ms=_percentile(sink.partial, 95),
        final_p95_ms=_percentile(sink.final, 95),
        losses={"stream_failures": int(drops["stream_failures"]),
                "inference_failures": int(drops["inference_failures"])},
        source_lag_ms=max(0.0, lag_s) * 1000.0,
    )
    verdict = judge(outcome)
    figure = StepFigure(
        streams=streams, seconds=seconds, sustained=verdict.sustained, thinned=verdict.thinned,
        audio_dropped=outcome.audio_dropped, partials=outcome.partials, finals=outcome.finals,
        windows_per_s=(outcome.partials + outcome.finals) / max(seconds, 1e-9),
        p50_ms=_percentile(sink.partial, 50), p95_ms=outcome.partial_p95_ms, final_p95_ms=outcome.final_p95_ms,
        partials_superseded=outcome.partials_superseded, partials_expired=outcome.partials_expired,
        partials_dropped=outcome.partials_dropped, finals_dropped=outcome.finals_dropped,
        mean_batch=float(stats["batches"]["mean_size"]), source_lag_ms=outcome.source_lag_ms,
        cpu_percent=100.0 * cpu / max(wall, 1e-9), rss_mb=peak_rss,
        why="; ".join(verdict.why), why_thinned="; ".join(verdict.why_thinned),
    )
    return figure, sink


def run_step(model: InferenceBackend, streams: int, seconds: float, files: Sequence[Path]) -> StepFigure:
    """Feed ``streams`` real-time file sources for ``seconds`` and judge the step (core/capacity.py)."""
    return _run_load(model, streams, seconds, files)[0]


def measure_latency(
    model: InferenceBackend, settings: BenchSettings, files: Sequence[Path]
) -> tuple[dict[str, float | None], dict[str, float | None]]:
    """End-of-speech to final event, and partial latency, with a few real-time file sources."""
    _, sink = _run_load(model, settings.latency_streams, settings.latency_seconds, files)

    def summary(values: list[float]) -> dict[str, float | None]:
        return {"p50": _percentile(values, 50), "p95": _percentile(values, 95), "count": float(len(values))}

    return summary(sink.final), summary(sink.partial)


def _verdict(step: StepFigure) -> Verdict:
    return Verdict(step.streams, step.sustained, step.thinned, (), ())


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
        cpu_count=os.cpu_count() or 1, provider=describe_device(model),
    )
    # Idle: the model loaded and a monitor running with no streams.
    idle = Monitor(model, MonitorConfig())
    idle.start()
    time.sleep(0.5)
    report.rss_idle_mb = rss_mb()
    idle.stop()

    with tempfile.TemporaryDirectory(prefix="serstream-bench-") as folder:
        files = write_load_files(Path(folder))
        say(f"end-of-speech latency, {settings.latency_streams} streams for {settings.latency_seconds:g} s")
        report.final_latency_ms, report.partial_latency_ms = measure_latency(model, settings, files)
        ramp = [n for n in settings.ramp if max_streams is None or n <= max_streams]
        peak = report.rss_idle_mb
        for n in ramp:
            say(f"capacity: {n} real-time file streams for {settings.step_seconds:g} s")
            step = run_step(model, n, settings.step_seconds, files)
            report.steps.append(step)
            peak = max(peak, step.rss_mb)
            if not step.thinned:
                break
            gc.collect()
    figures = capacity([_verdict(step) for step in report.steps])
    report.max_sustained_streams = figures.every_partial
    report.max_thinned_streams = figures.partials_thinned
    report.rss_load_mb = peak
    # Last: batch 64 grows ONNX Runtime's arena beyond what the monitor (batches of 32) uses.
    say("inference per batch size")
    report.inference = time_inference(model, settings)
    return report


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _yes(flag: bool) -> str:
    return "yes" if flag else "NO"


def format_report(report: BenchReport) -> str:
    """The figures as a plain-text table."""
    lines = [
        f"model {report.model} on {report.provider or report.device}, {report.cpu_count} CPU cores",
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
        f"capacity rule (serstream/core/capacity.py): no audio dropped, partial p95 < {PARTIAL_P95_LIMIT_MS:.0f} ms, "
        f"final p95 < {FINAL_P95_LIMIT_MS:.0f} ms;",
        "  'every partial' also: no partial expired or dropped; 'thinned': partials may be thinned",
        "",
        "real-time 16 kHz streams  every    thinned  dropped  est/s   p50 ms  p95 ms  final p95  superseded  "
        "expired  batch  cpu%  RSS MB",
    ]
    for s in report.steps:
        why = s.why or s.why_thinned
        lines.append(
            f"{s.streams:>24}  {_yes(s.sustained):<7}  {_yes(s.thinned):<7}  {s.audio_dropped:>7}  "
            f"{s.windows_per_s:>5.0f}   {_fmt(s.p50_ms):>6}  {_fmt(s.p95_ms):>6}  {_fmt(s.final_p95_ms):>9}  "
            f"{s.partials_superseded:>10}  {s.partials_expired:>7}  {s.mean_batch:>5.1f}  {s.cpu_percent:>4.0f}  "
            f"{s.rss_mb:>6.0f}" + (f"   ({why})" if why else "")
        )
    last_ok = bool(report.steps) and report.steps[-1].sustained
    last_thinned = bool(report.steps) and report.steps[-1].thinned
    lines += [
        "",
        f"sustained (every partial): {report.max_sustained_streams} streams"
        + (" (the highest step tried)" if last_ok else ""),
        f"with partials thinned:     {report.max_thinned_streams} streams"
        + (" (the highest step tried)" if last_thinned else ""),
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
