"""Offline analysis of audio files: as fast as the machine allows, JSON lines out.

No threads and no clocks in the loop: the same pure pieces as the live
monitor, a :class:`~serstream.core.pipeline.StreamPipeline` per file (clean,
resample, VAD, scheduler) and a :class:`~serstream.core.estimator.StreamEstimator`
per stream (order gate, smoother, speaker state, ``seq``), and the windows go
through :meth:`EmotionModel.infer` in batches. Each *stream* is an ordered list of files: files of one stream are
analysed in order, so the smoother and the speaker state (the model's state
inputs) carry from one file to the next, the way the monitor would hear one
speaker over several recordings. Different streams are independent, so their
windows share batches.

A model with state inputs gets, with each window, the speaker state after
the finals of the earlier utterances, exactly as the monitor's order gate
gives it live; so one stream contributes one *group* per batch: the partial
windows of an utterance and its final (which all see the same state), and its
next group forms once their results are in. Streams are interleaved to fill
the batch.

Output per stream: one ``emotion`` event per final (and per partial with
``partials=True``), with ``t0``/``t1`` in seconds from the start of its file
and an extra ``file`` field; one ``file`` summary per file (the
segment-duration-weighted mean of its finals' probabilities and
arousal/valence/dominance). A file with no speech gets ``label: null``,
``probs: null`` and ``segments: 0``. Files are opened by
:func:`serstream.audiofile.open_audio` (libsndfile, else FFmpeg: M4A/AAC,
Opus, MP4 ...) and read in blocks. A file that cannot be read gets an
``error`` event (``decode_error``) and the run goes on; so does a file whose
audio the model fails on (``inference_error``: a failing batch is rerun one
stream at a time, so only the files the model fails on are lost).

Two-party calls (``split_channels``): a stream whose files have two or more
channels becomes one stream per channel, ``FILE:left`` and ``FILE:right``
(roles from :mod:`serstream.core.parties`), each reading its own channel of
the same files; their ``emotion`` events carry ``call`` (the unsplit stream's
name) and ``role``. Each party counts time from the start of the file, so one
instant has one ``t0`` in both. Mono files stay one stream.
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from serstream import events
from serstream.audiofile import AudioReader, open_audio
from serstream.contract import SAMPLE_RATE, ModelInfo
from serstream.core.audio import to_mono
from serstream.core.estimator import Released, StreamEstimator
from serstream.core.parties import plan_parties, take_channel
from serstream.core.pipeline import SpeechEnded, StreamPipeline, WindowReady
from serstream.core.scheduler import SchedulerConfig, Window
from serstream.core.smoother import SmootherConfig
from serstream.core.stream_ids import MAX_SUFFIX, allocate
from serstream.core.vad import VadConfig
from serstream.errors import AnalyzeError, SourceError
from serstream.inference.worker import InferenceBackend
from serstream.monitor import check_model_info, scheduler_config_for

__all__ = [
    "AnalyzeConfig",
    "AnalyzeError",
    "StreamSpec",
    "AnalyzeSummary",
    "streams_from_args",
    "split_channels",
    "read_stream_csv",
    "analyze",
]

#: Seconds of audio read from a file at a time (bounded memory for long files).
_READ_BLOCK_S = 2.0


@dataclass(frozen=True)
class AnalyzeConfig:
    """What to analyse and how. ``scheduler=None``: window sizes from the model's metadata."""

    vad: VadConfig = field(default_factory=VadConfig)
    scheduler: SchedulerConfig | None = None
    hop_s: float = 0.5
    smoother: SmootherConfig = field(default_factory=SmootherConfig)
    partials: bool = False
    max_batch: int = 32


@dataclass(frozen=True)
class StreamSpec:
    """One stream: its id and its files, analysed in this order.

    ``channel`` (0-based) makes the stream one party of a call: only that
    channel of each file is analysed, and its events carry ``call``/``role``.
    None: every channel, mixed to mono.
    """

    stream: str
    files: tuple[Path, ...]
    channel: int | None = None
    call: str | None = None
    role: str | None = None


def _channels_of(path: Path) -> int | None:
    """The file's channel count, or None when it cannot be read (its error comes when it is analysed)."""
    try:
        reader = open_audio(path)
    except Exception:  # noqa: BLE001 - unreadable here means unreadable later, reported there
        return None
    try:
        return int(reader.channels)
    finally:
        reader.close()


def split_channels(
    specs: Sequence[StreamSpec], roles: str | Sequence[str] | None = None
) -> tuple[list[StreamSpec], list[StreamSpec]]:
    """Each stream whose files all have the same two or more channels becomes its parties' streams.

    Returns (the streams to analyse, the streams left whole: mono, mixed
    channel counts or unreadable). ValueError (one line) when ``roles`` do
    not fit a file's channels.
    """
    out: list[StreamSpec] = []
    whole: list[StreamSpec] = []
    for spec in specs:
        counts = {_channels_of(path) for path in spec.files}
        channels = counts.pop() if len(counts) == 1 else None
        if channels is None or channels < 2 or spec.channel is not None:
            out.append(spec)
            whole.append(spec)
            continue
        try:
            split = plan_parties(spec.stream, channels, roles)
        except ValueError as exc:
            raise ValueError(f"{spec.files[0]}: {exc}") from None
        out.extend(StreamSpec(p.stream, spec.files, p.channel, split.call, p.role) for p in split.parties)
    return out, whole


@dataclass
class AnalyzeSummary:
    """Totals of a run."""

    files: int = 0
    failed: list[str] = field(default_factory=list)
    segments: int = 0
    windows: int = 0
    batches: int = 0
    seconds: float = 0.0


def streams_from_args(files: Sequence[str | Path], csv_path: str | Path | None = None) -> list[StreamSpec]:
    """Each FILE argument is its own stream; the CSV's rows group files into streams."""
    specs: list[StreamSpec] = []
    seen: set[str] = set()
    if csv_path is not None:
        for spec in read_stream_csv(csv_path):
            specs.append(spec)
            seen.add(spec.stream)
    for name in files:
        # The same file twice: NAME, NAME-2, ... (the one rule of core/stream_ids.py).
        stream = allocate(str(name), seen)
        if stream is None:
            raise AnalyzeError(f"{name} is given more than {MAX_SUFFIX} times")
        seen.add(stream)
        specs.append(StreamSpec(stream, (Path(name),)))
    return specs


def read_stream_csv(path: str | Path) -> list[StreamSpec]:
    """Read ``file,stream`` rows (a header naming both columns); relative paths are from the CSV's folder."""
    csv_file = Path(path)
    try:
        text = csv_file.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise AnalyzeError(f"cannot read CSV {csv_file}: {exc.strerror if isinstance(exc, OSError) else exc}") from None
    reader = csv.DictReader(text.splitlines())
    fields = [f.strip().lower() for f in (reader.fieldnames or [])]
    if "file" not in fields or "stream" not in fields:
        raise AnalyzeError(f"CSV {csv_file} needs a header with the columns 'file' and 'stream'")
    order: list[str] = []
    files: dict[str, list[Path]] = {}
    for line, row in enumerate(reader, start=2):
        norm = {str(k).strip().lower(): (v or "").strip() for k, v in row.items() if k is not None}
        name, stream = norm.get("file", ""), norm.get("stream", "")
        if not name or not stream:
            raise AnalyzeError(f"CSV {csv_file} line {line}: empty 'file' or 'stream'")
        file_path = Path(name)
        if not file_path.is_absolute():
            file_path = csv_file.parent / file_path
        if stream not in files:
            files[stream] = []
            order.append(stream)
        files[stream].append(file_path)
    if not order:
        raise AnalyzeError(f"CSV {csv_file} lists no files")
    return [StreamSpec(s, tuple(files[s])) for s in order]


@dataclass
class _Group:
    """Windows of one stream that see the same state: an utterance's partials and its final."""

    job: _StreamJob
    file: Path
    #: Released by the stream's estimator: each window with the speaker state it runs with.
    windows: list[Released[None]]
    #: Segment duration (s) of the final, for the file summary's weights.
    final_duration: float = 0.0


@dataclass
class _FileDone:
    file: Path
    duration_s: float


@dataclass
class _FileFailed:
    file: Path
    message: str


class _StreamJob:
    """Reads one stream's files in order and yields groups, file ends and failures."""

    def __init__(self, spec: StreamSpec, info: ModelInfo, config: AnalyzeConfig, scheduler: SchedulerConfig) -> None:
        self.spec = spec
        self.config = config
        self.scheduler_config = scheduler
        self.estimator: StreamEstimator[None] = StreamEstimator(
            spec.stream, info, config.smoother, call=spec.call, role=spec.role)
        #: Why the current file's windows failed in the model (first message), if they did.
        self.file_error: str | None = None
        self.utterances = 0  # utterances of earlier files, so numbering continues in the stream
        self.time_offset = 0.0  # stream time of the current file's start (for the smoother)
        # Per-file summary accumulators.
        self.weights: list[float] = []
        self.probs: list[np.ndarray] = []
        self.avds: list[np.ndarray] = []
        self._items = self._run()

    def next_item(self) -> _Group | _FileDone | _FileFailed | None:
        return next(self._items, None)

    def _run(self) -> Iterator[_Group | _FileDone | _FileFailed]:
        for path in self.spec.files:
            self.weights, self.probs, self.avds = [], [], []
            self.file_error = None
            try:
                # libsndfile, else FFmpeg (serstream/audiofile.py); a missing file is a SourceError too.
                handle = open_audio(path)
            except SourceError as exc:
                yield _FileFailed(path, str(exc))
                continue
            try:
                yield from self._file(path, handle)
            except SourceError as exc:  # a file corrupt past its header: the reader's one line
                yield _FileFailed(path, str(exc))
            except Exception as exc:  # noqa: BLE001 - anything else that breaks reading it is this file's alone
                yield _FileFailed(path, f"cannot read audio file {path}: {_reason(exc)}")
            finally:
                handle.close()

    def _file(self, path: Path, handle: AudioReader) -> Iterator[_Group | _FileDone]:
        rate = handle.sample_rate
        pipeline = StreamPipeline(rate, self.config.vad, self.scheduler_config)
        block = max(1, int(_READ_BLOCK_S * rate))
        estimator = self.estimator
        duration = 0.0  # of the latest segment to end
        pending: list[Released[None]] = []

        def feed(items: list[Any]) -> Iterator[_Group]:
            nonlocal duration, pending
            for item in items:
                if isinstance(item, SpeechEnded):
                    duration = item.duration
                elif isinstance(item, WindowReady) and (item.window.final or self.config.partials):
                    # The caller asks for the next group only once this stream's previous group
                    # has its results, so the gate is open: each window is released as it comes,
                    # with the state after the earlier utterances' finals, as live.
                    estimator.admit(item.window, None)
                    pending.extend(estimator.ready())
                    if item.window.final:
                        group, pending = _Group(self, path, pending, final_duration=duration), []
                        yield group

        index = 0
        while True:
            data = handle.read(block)
            if data.shape[0] == 0:
                break
            channel = self.spec.channel
            mono = to_mono(data) if channel is None else take_channel(data, channel)
            yield from feed(pipeline.push(index, mono, 0.0))
            index += mono.size
        yield from feed(pipeline.finish(0.0))
        if pending:
            # Partials of a segment too short for a final still go out when asked for.
            yield _Group(self, path, pending)
        samples16 = pipeline.out_next
        duration_s = handle.frames / rate if handle.frames > 0 else samples16 / SAMPLE_RATE
        yield _FileDone(path, duration_s)
        self.utterances += pipeline.utterances
        self.time_offset += max(duration_s, samples16 / SAMPLE_RATE)


def analyze(
    model: InferenceBackend,
    streams: Sequence[StreamSpec],
    emit: Callable[[dict[str, Any]], None],
    config: AnalyzeConfig | None = None,
    on_file_done: Callable[[Path, str | None], None] | None = None,
) -> AnalyzeSummary:
    """Analyse every stream; ``emit`` gets each event dict. ``on_file_done(path, error)`` for progress."""
    cfg = config or AnalyzeConfig()
    info = model.info
    # The same metadata checks and window sizes as the live monitor (MonitorError: one line).
    check_model_info(info, getattr(model, "path", None))
    scheduler = cfg.scheduler or scheduler_config_for(info, cfg.hop_s)
    summary = AnalyzeSummary()
    started = time.perf_counter()
    waiting = [_StreamJob(spec, info, cfg, scheduler) for spec in streams]
    active: list[_StreamJob] = []
    # Enough streams in flight to fill a batch with one group each.
    width = max(1, cfg.max_batch)
    while waiting or active:
        while waiting and len(active) < width:
            active.append(waiting.pop(0))
        groups: list[_Group] = []
        rows = 0
        for job in list(active):
            # A stream gives at most one group per batch: its next group depends on this one's state.
            while True:
                item = job.next_item()
                if item is None:
                    active.remove(job)
                    break
                if isinstance(item, _FileFailed):
                    summary.files += 1
                    summary.failed.append(str(item.file))
                    emit(events.error_event(job.spec.stream, code="decode_error", message=item.message,
                                            count=1, ts=time.time()))
                    if on_file_done:
                        on_file_done(item.file, item.message)
                    continue
                if isinstance(item, _FileDone) and job.file_error is not None:
                    # Some of its windows failed in the model: a summary would silently leave them out.
                    message = f"{item.file}: model failed on its audio: {job.file_error}"
                    summary.files += 1
                    summary.failed.append(str(item.file))
                    emit(events.error_event(job.spec.stream, code="inference_error", message=message,
                                            count=1, ts=time.time()))
                    if on_file_done:
                        on_file_done(item.file, message)
                    continue
                if isinstance(item, _FileDone):
                    summary.files += 1
                    emit(_file_summary(job, item, info))
                    if on_file_done:
                        on_file_done(item.file, None)
                    continue
                if not item.windows:
                    continue
                groups.append(item)
                rows += len(item.windows)
                break
            if rows >= cfg.max_batch:
                break
        if groups:
            _run_isolated(model, groups, info, emit, summary)
    summary.seconds = time.perf_counter() - started
    return summary


def _run_isolated(
    model: InferenceBackend,
    groups: list[_Group],
    info: ModelInfo,
    emit: Callable[[dict[str, Any]], None],
    summary: AnalyzeSummary,
) -> None:
    """Run the groups in one batch; when the model fails on it, each group alone.

    A model that fails on one file's audio (non-finite outputs, a run error)
    then fails that file only: the others in the batch still get their results.
    """
    windows = [w for g in groups for w in g.windows]
    owners = [g for g in groups for _ in g.windows]
    try:
        output = _infer(model, windows, info)
    except (RuntimeError, ValueError) as exc:  # InferenceError is a RuntimeError
        if len(groups) == 1:
            job = groups[0].job
            if job.file_error is None:
                job.file_error = _reason(exc)
            for released in groups[0].windows:
                job.estimator.lost(released.window)
            return
        for group in groups:
            _run_isolated(model, [group], info, emit, summary)
        return
    _emit_results(output, windows, owners, info, emit, summary)


def _infer(model: InferenceBackend, windows: list[Released[None]], info: ModelInfo) -> Any:
    """One padded batch through the model, each row with the state its window was released with."""
    lengths = np.array([r.window.audio.size for r in windows], np.int64)
    audio = np.zeros((len(windows), int(lengths.max())), np.float32)
    for row, released in enumerate(windows):
        audio[row, : released.window.audio.size] = released.window.audio
    state: dict[str, list[np.ndarray | None]] = {
        spec.name: [r.state.get(spec.name) for r in windows] for spec in info.state_inputs
    }
    return model.infer(audio, lengths, state or None)


def _emit_results(
    output: Any,
    windows: list[Released[None]],
    owners: list[_Group],
    info: ModelInfo,
    emit: Callable[[dict[str, Any]], None],
    summary: AnalyzeSummary,
) -> None:
    summary.batches += 1
    summary.windows += len(windows)
    names = [spec.name for spec in info.state_inputs]
    for row, (released, group) in enumerate(zip(windows, owners, strict=True)):
        job = group.job
        window: Window = released.window
        if window.final:
            summary.segments += 1
            job.weights.append(max(group.final_duration, (window.end - window.start) / SAMPLE_RATE))
            job.probs.append(np.asarray(output.probs[row], np.float64))
            job.avds.append(np.asarray(output.avd[row], np.float64))
        updates = {n: output.state_updates[n][row] for n in names if n in output.state_updates} if names else None
        event = job.estimator.result(
            window, output.probs[row], output.avd[row], gender=output.gender_probs[row],
            state_updates=updates, latency_ms=0.0, ts=time.time(),
            clock_offset_s=job.time_offset, utterance_offset=job.utterances,
        )
        event["file"] = str(group.file)
        emit(event)


def _file_summary(job: _StreamJob, done: _FileDone, info: ModelInfo) -> dict[str, Any]:
    if not job.weights:
        return events.file_event_no_speech(job.spec.stream, file=str(done.file), duration_s=done.duration_s,
                                           ts=time.time())
    weights = np.asarray(job.weights, np.float64)
    weights = weights / weights.sum()
    probs = (np.stack(job.probs) * weights[:, None]).sum(axis=0)
    avd = (np.stack(job.avds) * weights[:, None]).sum(axis=0)
    return events.file_event(
        job.spec.stream, file=str(done.file), labels=info.labels, probs=probs, avd=avd,
        segments=len(job.weights), duration_s=done.duration_s, ts=time.time(),
    )


def _reason(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
