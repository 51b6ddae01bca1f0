"""The monitor: the streams registry and the threads that carry audio to emotion events.

Threading model::

    audio threads (PortAudio callback, file replay, network) --push--> per-stream AudioRing
    one pipeline thread:  ring -> StreamPipeline (clean, StreamResampler, VadSegmenter,
                          WindowScheduler) -> StreamEstimator.admit/ready -> BatchFormer
    one inference thread: InferenceWorker -> EmotionModel -> StreamEstimator.result -> sink

The per-stream logic is pure and shared with the offline ``analyze``:
:class:`~serstream.core.pipeline.StreamPipeline` (audio in, speech events and
windows out, with the native-to-16 kHz clock, gaps and arrival marks) and
:class:`~serstream.core.estimator.StreamEstimator` (results in, events out:
smoother, speaker state, ``seq``, and the order gate that fixes the speaker
state each window runs with by stream order, not by timing). This module
keeps the threads, the stream registry, the locks and the counters.

``StreamHandle.push`` (called on an audio thread) only takes a mono view of
the block, copies it into the stream's ring under a short lock and wakes the
pipeline thread; NaN/inf samples are replaced and counted by the pipeline
when it drains the ring. The pipeline thread owns each stream's pipeline and
the batch former; the estimator is shared with the inference thread under the
stream's ``est_lock``. Batches are *pulled*: the pipeline hands the worker a
batch only when the worker's queue is empty, so while the model is busy the
batch former's supersede rule (a newer partial of a stream replaces its
waiting one) is the back-pressure, and stale partials are never run. Every
request the batch former drops comes back to its stream's estimator, so a
closing stream waits only on windows that will still get a result.

Every event goes through ``sink(event)``, called from the pipeline and the
inference threads under one lock (events arrive in order). The server's sink
is ``EventBus.publish_threadsafe`` (serialise here, deliver on the event
loop); the CLI's console is another. A failing sink or a failing stream is counted and reported; it
never stops the other streams.
"""

from __future__ import annotations

import enum
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from serstream import events
from serstream.contract import SAMPLE_RATE, ModelInfo
from serstream.core.audio import pcm16_to_float, to_mono
from serstream.core.batcher import Batch, BatchFormer, Request
from serstream.core.estimator import Released, StreamEstimator
from serstream.core.pipeline import PipelineItem, SpeechBegan, SpeechEnded, StreamPipeline
from serstream.core.resample import validate_rate
from serstream.core.ringbuffer import AudioRing
from serstream.core.scheduler import SchedulerConfig
from serstream.core.smoother import SmootherConfig
from serstream.core.stats import Counters, LatencyTracker, RateMeter
from serstream.core.stream_ids import MAX_SUFFIX, allocate
from serstream.core.vad import VadConfig
from serstream.errors import MonitorError, SourceError, StreamIdTaken, one_line
from serstream.inference.session import InferenceOutput
from serstream.inference.worker import InferenceBackend, InferenceWorker
from serstream.metrics import MonitorMetrics

__all__ = [
    "MonitorError",
    "SourceError",
    "StreamIdTaken",
    "MonitorConfig",
    "Monitor",
    "Lifecycle",
    "StreamHandle",
    "scheduler_config_for",
    "check_model_info",
    "validate_stream_params",
]

Sink = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class MonitorConfig:
    """Monitor settings. ``scheduler=None`` takes the window sizes from the model's metadata."""

    vad: VadConfig = field(default_factory=VadConfig)
    scheduler: SchedulerConfig | None = None
    #: Partial estimate every ``hop_s`` of speech (used when ``scheduler`` is None).
    hop_s: float = 0.5
    smoother: SmootherConfig = field(default_factory=SmootherConfig)
    #: Seconds of native-rate audio each stream's ring holds before overwriting.
    ring_seconds: float = 10.0
    #: Windows per batch; None: 32 on CUDA, 8 on CPU. On CPU a window costs the same
    #: at any batch size (4.6-5.7 ms, `serstream bench`), so big batches only add
    #: waiting: with 8, 100 streams kept p95 under 250 ms where 32 gave 444 ms.
    max_batch: int | None = None
    #: How long a final / a partial may wait for more rows before its batch closes.
    final_wait_s: float = 0.002
    partial_wait_s: float = 0.020
    #: Windows waiting for a batch, all streams together (past it partials are dropped, counted).
    max_pending: int = 4096
    #: A partial not yet sent this long after it was queued is dropped (counted in
    #: ``drops.partials_expired``): under overload it keeps latency bounded instead
    #: of growing with the stream count. None: partials wait as long as it takes.
    #: 0.2 s: a partial sent later would arrive past the 250 ms latency target anyway
    #: (it also waited for its drain and waits for its batch); 0.1 s, the value before,
    #: threw away partials that would have been on time: at 70 RTP streams on 2 cores
    #: 10 of 1905 expired with the partials' p95 at 142 ms (benchmarks/bench_network.py).
    partial_max_age_s: float | None = 0.2
    #: Batches queued at the worker besides the ones running (more only adds latency).
    worker_queue: int = 1
    #: Batches the model runs at once, each on a thread of its own; None: automatic
    #: (:func:`default_inference_concurrency`).
    inference_concurrency: int | None = None
    stats_interval_s: float = 5.0
    max_streams: int = 1024
    #: Seconds a closing stream waits for its last estimates before it is closed anyway.
    close_timeout_s: float = 2.0
    #: Least time between two drains of the rings; None: automatic (grows with the stream count).
    coalesce_s: float | None = None
    #: Keep each stream's recent RMS level for :meth:`Monitor.levels` (the CLI's meter).
    track_levels: bool = False

    def __post_init__(self) -> None:
        if self.ring_seconds <= 0:
            raise ValueError(f"ring_seconds must be > 0, got {self.ring_seconds}")
        if self.max_streams < 1:
            raise ValueError(f"max_streams must be >= 1, got {self.max_streams}")
        if self.stats_interval_s <= 0:
            raise ValueError(f"stats_interval_s must be > 0, got {self.stats_interval_s}")
        if self.worker_queue < 1:
            raise ValueError(f"worker_queue must be >= 1, got {self.worker_queue}")
        if self.inference_concurrency is not None and self.inference_concurrency < 1:
            raise ValueError(f"inference_concurrency must be >= 1, got {self.inference_concurrency}")
        if self.vad.sample_rate != SAMPLE_RATE:
            raise ValueError(f"the VAD runs at the model rate {SAMPLE_RATE} Hz, got {self.vad.sample_rate}")


def default_inference_concurrency(device: str) -> int:
    """Batches run at once when the config does not say: 2 on CPU, 1 on a GPU.

    On CPU the pipeline and socket threads hold the GIL for much of the time, so
    one inference thread idles between batches while its next batch is formed;
    a second one, each running a batch on ONNX Runtime's (thread-safe) session,
    lifted the windows delivered at 100 RTP streams on 2 cores from 2061 to
    2344 in 15 s (benchmarks/bench_network.py --rtp-steps 100). A GPU runs one
    batch's kernels at a time: there bigger batches are the lever.
    """
    return 2 if device == "cpu" else 1


def check_model_info(info: ModelInfo, where: object = None) -> None:
    """Raise MonitorError (one line) when the model's metadata cannot drive this pipeline.

    The session checks the tensors; this checks what the monitor and
    ``analyze`` take from the metadata: the pipeline resamples every source to
    the contract's rate, so a model declaring another rate would silently get
    the wrong audio; labels key the probabilities and the smoother, so they
    must be distinct; window lengths and the temperature must be finite and
    positive. ``where`` (the model path, say) prefixes the message.
    """
    prefix = f"{where}: " if where is not None else ""
    if int(info.sample_rate) != SAMPLE_RATE:
        raise MonitorError(
            f"{prefix}model metadata says sample_rate {info.sample_rate} Hz; the monitor feeds "
            f"models {SAMPLE_RATE} Hz audio (the model contract)"
        )
    labels = tuple(info.labels)
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise MonitorError(f"{prefix}model metadata lists the labels {duplicates} more than once")
    for name in ("window_s", "min_window_s", "max_window_s", "temperature"):
        value = float(getattr(info, name))
        if not (math.isfinite(value) and value > 0):
            raise MonitorError(f"{prefix}model metadata {name} must be a finite number > 0, got {value}")


def scheduler_config_for(info: ModelInfo, hop_s: float = 0.5) -> SchedulerConfig:
    """Window sizes from the model's metadata (window, min and max window)."""
    window = float(info.window_s)
    return SchedulerConfig(
        sample_rate=int(info.sample_rate),
        window_s=window,
        hop_s=float(hop_s),
        min_window_s=min(float(info.min_window_s), window),
        max_window_s=max(float(info.max_window_s), window),
    )


def validate_stream_params(
    stream_id: str, *, source: str, sample_rate: int, channels: int,
    call: str | None = None, role: str | None = None,
) -> tuple[int, int]:
    """(rate, channels) of a stream about to open, or MonitorError (one line) on a bad parameter.

    One function so that every front door (this monitor, the ``--workers``
    pool in the main process) refuses the same things with the same words.
    """
    try:
        rate = validate_rate(sample_rate)
    except ValueError as exc:
        raise MonitorError(f"stream {stream_id!r}: {exc}") from None
    if source not in events.STREAM_SOURCES:
        raise MonitorError(f"stream {stream_id!r}: unknown source {source!r}")
    if isinstance(channels, bool) or not isinstance(channels, (int, np.integer)) or channels < 1:
        raise MonitorError(f"stream {stream_id!r}: channels must be an integer >= 1, got {channels!r}")
    if not stream_id or len(stream_id) > 200:
        raise MonitorError("stream id must be 1 to 200 characters")
    for name, tag in (("call", call), ("role", role)):
        if tag is not None and (not isinstance(tag, str) or not 1 <= len(tag) <= 200 or not tag.isprintable()):
            raise MonitorError(f"stream {stream_id!r}: {name} must be 1 to 200 printable characters")
    return rate, int(channels)


class Lifecycle(enum.Enum):
    """Where a stream is in its life; only ever moves down this list (FAILED may skip steps)."""

    OPEN = "open"  # takes audio
    CLOSING = "closing"  # close asked: its remaining audio is still to be processed
    DRAINING = "draining"  # audio flushed: waiting for its last estimates (at most close_timeout_s)
    CLOSED = "closed"  # removed from the registry, its closed event sent
    FAILED = "failed"  # removed after an error


_ENDED = (Lifecycle.CLOSED, Lifecycle.FAILED)


@dataclass
class _WindowContext:
    """What a request carries through the batch to its result."""

    stream: _MonitorStream
    pushed_at: float  # monotonic time the audio that completed the window was pushed
    state: Mapping[str, np.ndarray | None]  # the speaker state the window runs with (fixed at release)


class _MonitorStream:
    """One stream: its ring and lifecycle (shared), its pipeline and its estimator.

    Fields are grouped by the thread that owns them; ``lock`` guards the ring,
    the marks and lifecycle moves, ``est_lock`` the estimator (the pipeline
    thread admits and releases windows, the inference thread folds results in).
    """

    def __init__(
        self,
        monitor: Monitor,
        stream_id: str,
        source: str,
        codec: str,
        sample_rate: int,
        channels: int,
        detail: str | None,
        ring_samples: int,
        call: str | None = None,
        role: str | None = None,
    ) -> None:
        self.id = stream_id
        self.source = source
        self.codec = codec
        self.rate = sample_rate
        self.channels = channels
        self.detail = detail
        self.call = call
        self.role = role
        self.opened_at = time.monotonic()
        cfg = monitor.config

        # Shared between the pushing thread and the pipeline thread (under `lock`).
        self.lock = threading.Lock()
        self.ring = AudioRing(ring_samples)
        # (native index one past the pushed block, monotonic push time); appended by pushers
        # with the block, taken by the pipeline thread with the audio it reads.
        self.marks: deque[tuple[int, float]] = deque()
        self.queued_for_wake = False
        self.overflow_notes = 0
        # (error code, one-line message) set by any thread; the pipeline thread fails the stream.
        self.trouble: tuple[str, str] | None = None
        self.lifecycle = Lifecycle.OPEN
        self.close_reason: str | None = None
        self.space = threading.Event()
        self.space_wanted = False

        # Pipeline thread only.
        self.pipeline = StreamPipeline(sample_rate, cfg.vad, monitor.scheduler_config,
                                       track_level=cfg.track_levels)
        self.reported: dict[str, int] = {}  # error code -> count when first reported
        self.seen_bad = 0
        self.seen_overflow_notes = 0
        self.ring_dropped_seen = 0
        self.flushed_at = 0.0

        # Both threads, under `est_lock`.
        self.est_lock = threading.Lock()
        # One window in flight: with two inference threads (or remote replicas) results of a
        # stream's windows could otherwise come back, and go out, in the wrong order.
        self.estimator: StreamEstimator[float] = StreamEstimator(
            stream_id, monitor.info, cfg.smoother, call=call, role=role, one_in_flight=True)

    @property
    def ended(self) -> bool:
        return self.lifecycle in _ENDED

    def move(self, to: Lifecycle, only_from: tuple[Lifecycle, ...] | None = None) -> bool:
        """Change the lifecycle under the lock (``only_from``: only from those states); True if moved."""
        with self.lock:
            if self.lifecycle in _ENDED or (only_from is not None and self.lifecycle not in only_from):
                return False
            self.lifecycle = to
            return True


class StreamHandle:
    """What a source holds: push audio, report trouble, close. Safe to call from any thread."""

    def __init__(self, monitor: Monitor, stream: _MonitorStream) -> None:
        self._monitor = monitor
        self._stream = stream

    @property
    def stream_id(self) -> str:
        return self._stream.id

    @property
    def sample_rate(self) -> int:
        return self._stream.rate

    @property
    def closed(self) -> bool:
        """True once ``close`` was called or the monitor closed the stream (failure, stop)."""
        return self._stream.lifecycle is not Lifecycle.OPEN

    @property
    def free_space(self) -> int:
        """Native-rate samples the ring can take now without overwriting unread audio."""
        st = self._stream
        return st.ring.capacity - st.ring.available

    @property
    def capacity(self) -> int:
        return self._stream.ring.capacity

    def push(self, block: np.ndarray, at: float | None = None) -> None:
        """Hand one block of native-rate audio to the monitor; never blocks on anything slow.

        ``block`` is ``[frames]`` or ``[frames, channels]``, float (any width)
        or int16. The block is copied; the caller may reuse its buffer.
        ``at``: when the block arrived (``time.monotonic()``, default now); a
        ``--workers`` process passes the main process's arrival time, so
        latency counts the hop between the processes.
        """
        st = self._stream
        if st.lifecycle is not Lifecycle.OPEN:
            return
        try:
            mono = _mono_view(block)
        except (ValueError, TypeError) as exc:
            st.trouble = ("bad_samples", f"unusable audio block: {one_line(exc, limit=None)}")
            self._monitor._mark(st)
            return
        now = time.monotonic() if at is None else at
        # The ring copies (and casts to float32); NaN/inf are replaced and counted by the
        # pipeline thread, once per drained stretch rather than once per block.
        with st.lock:
            st.ring.write(mono)
            st.marks.append((st.ring.written, now))
        self._monitor._mark(st)

    def note_overflow(self, count: int = 1) -> None:
        """The source lost audio before it reached us (e.g. a PortAudio input overflow)."""
        self._stream.overflow_notes += count

    def fail(self, message: str, code: str = "source_error") -> None:
        """Report a source failure on this stream (an ``error`` event with ``code``); it is closed."""
        st = self._stream
        st.trouble = (code, message)
        self._monitor._mark(st)

    def wait_for_space(self, samples: int, timeout: float | None = None) -> bool:
        """Block until ``samples`` fit in the ring without overwriting (replay at full speed)."""
        st = self._stream
        needed = min(int(samples), st.ring.capacity)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            st.space.clear()
            st.space_wanted = True
            if st.ring.capacity - st.ring.available >= needed:
                return True
            if st.ended:
                return False
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            st.space.wait(0.05 if remaining is None else min(0.05, remaining))

    def close(self, reason: str | None = None) -> None:
        """End the stream: its remaining audio is processed, an open segment gets its final."""
        st = self._stream
        if st.lifecycle is not Lifecycle.OPEN:
            return
        st.close_reason = reason
        if st.move(Lifecycle.CLOSING, only_from=(Lifecycle.OPEN,)):
            self._monitor._mark(st)


class Monitor:
    """Runs every stream's pipeline and the shared inference worker.

    ``model_or_backend`` is an :class:`~serstream.inference.session.EmotionModel`
    or any :class:`~serstream.inference.worker.InferenceBackend` (it must have
    ``info`` and ``device``).
    """

    def __init__(
        self,
        model_or_backend: InferenceBackend,
        config: MonitorConfig | None = None,
        sink: Sink | None = None,
    ) -> None:
        self.backend = model_or_backend
        self.info: ModelInfo = model_or_backend.info
        self.device: str = str(getattr(model_or_backend, "device", "cpu"))
        self.config = config or MonitorConfig()
        check_model_info(self.info, getattr(model_or_backend, "path", None))
        try:
            self.scheduler_config = self.config.scheduler or scheduler_config_for(self.info, self.config.hop_s)
        except ValueError as exc:
            raise MonitorError(one_line(exc, limit=None)) from None
        self._sink: Sink = sink or (lambda event: None)
        self._sink_lock = threading.Lock()
        self._streams: dict[str, _MonitorStream] = {}
        self._registry_lock = threading.Lock()
        self._dirty: deque[_MonitorStream] = deque()
        # Streams whose held windows a result has cleared (inference thread appends, pipeline pops).
        self._releasable: deque[_MonitorStream] = deque()
        # Streams closing or failed (pipeline thread only): checked each tick until removed.
        self._closing: set[_MonitorStream] = set()
        self._wake = threading.Event()
        self._result_wake = threading.Event()
        self._batcher = BatchFormer(
            max_batch=self.config.max_batch or (32 if self.device == "cuda" else 8),
            max_pending=self.config.max_pending,
            final_wait_s=self.config.final_wait_s,
            partial_wait_s=self.config.partial_wait_s,
            partial_max_age_s=self.config.partial_max_age_s,
        )
        #: Prometheus instruments (own registry; serstream/metrics.py): histograms observed here and
        #: in the worker, counters and gauges mirrored from stats() on each stats tick and scrape.
        self.metrics = MonitorMetrics()
        self.metrics.set_device(self.device, str(getattr(model_or_backend, "provider", "") or self.device))
        self._worker = InferenceWorker(
            self.backend,
            self._on_result,
            max_queue=self.config.worker_queue,
            state_for=self._state_for if self.info.state_inputs else None,
            observe=self.metrics.observe_batch,
            concurrency=self.config.inference_concurrency or default_inference_concurrency(self.device),
        )
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._drain_on_stop = True
        self._started_at = time.monotonic()
        # Counters: the pipeline thread writes `_pipe`, the inference thread `_infer`;
        # stats() only reads. Latency and rates are shared, so they take `_stats_lock`.
        self._pipe = Counters(
            streams_opened=0, streams_closed=0, streams_failed=0,
            source_overflows=0, batches_sent=0, batches_refused=0,
            windows_sent=0, pipeline_errors=0,
        )
        self._infer = Counters(
            results=0, inference_failures=0, windows_failed=0, events_emitted=0,
            result_errors=0,
        )
        self._sink_failures = 0
        self._stats_lock = threading.Lock()
        self._latency = LatencyTracker(4096)
        self._final_latency = LatencyTracker(4096)
        self._rate = RateMeter(window_s=10.0)
        self._batch_sizes: deque[int] = deque(maxlen=1024)
        self._removed_audio_drops = 0
        self._removed_bad = 0
        self._removed_samples = 0
        self._removed_superseded = 0
        self._bus_drops: Callable[[], int] | None = None
        self._stats_providers: list[Callable[[], Mapping[str, int]]] = []
        self._next_stats = 0.0
        self._next_drain = 0.0

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the inference worker and the pipeline thread."""
        if self._thread is not None:
            raise MonitorError("monitor already started")
        self._started_at = time.monotonic()
        self._next_stats = self._started_at + self.config.stats_interval_s
        self._worker.start()
        self._thread = threading.Thread(target=self._run, name="serstream-pipeline", daemon=True)
        self._thread.start()

    def stop(self, drain: bool = True, timeout: float = 10.0) -> None:
        """Stop. ``drain``: close every stream first so open segments get their final estimates."""
        if self._thread is None:
            return
        self._drain_on_stop = drain
        with self._registry_lock:
            self._stopping = True  # under the lock: no stream opens after this
            streams = list(self._streams.values())
        for st in streams:
            if st.lifecycle is Lifecycle.OPEN:
                st.close_reason = st.close_reason or "monitor stopped"
                if st.move(Lifecycle.CLOSING, only_from=(Lifecycle.OPEN,)):
                    self._mark(st)
        self._wake.set()
        self._thread.join(timeout)
        self._worker.stop(drain=drain, timeout=timeout)
        self._thread = None

    def set_bus_drop_counter(self, counter: Callable[[], int]) -> None:
        """Where ``stats`` reads the events dropped for slow clients (the server's bus)."""
        self._bus_drops = counter

    def add_stats_provider(self, provider: Callable[[], Mapping[str, int]]) -> None:
        """Merge ``provider()`` (cause -> count) into ``stats()["drops"]`` (sources' own counters)."""
        self._stats_providers.append(provider)

    def emit(self, event: dict[str, Any]) -> None:
        """Send an event to the sink from any thread (sources report their own errors this way)."""
        self._emit(event)

    @property
    def sink(self) -> Sink:
        """The sink as sources should call it: serialised with the monitor's own events."""
        return self._emit

    # ------------------------------------------------------------------ streams

    def open_stream(
        self,
        stream_id: str,
        *,
        source: str,
        codec: str,
        sample_rate: int,
        channels: int,
        detail: str | None = None,
        unique: bool = False,
        call: str | None = None,
        role: str | None = None,
        params: Mapping[str, str] | None = None,
    ) -> StreamHandle:
        """Register a stream and emit its ``stream`` open event; MonitorError on bad parameters.

        ``call``/``role`` make the stream one party of a call (both carried on
        its ``stream`` and ``emotion`` events; e.g. ``role`` "inbound" of the
        Twilio call ``call``); ``params`` are the source's per-stream
        parameters, shown on the open event (e.g. Twilio ``customParameters``).

        ``unique=False``: ``stream_id`` exactly, :class:`StreamIdTaken` if it is
        open. ``unique=True``: ``stream_id`` or the first free ``stream_id-N``
        (N = 2..100, the rule of :mod:`serstream.core.stream_ids`), chosen under
        the registry lock; the handle's ``stream_id`` says which.
        """
        rate, channels = validate_stream_params(stream_id, source=source, sample_rate=sample_rate,
                                                channels=channels, call=call, role=role)
        ring = max(1, int(math.ceil(self.config.ring_seconds * rate)))
        with self._registry_lock:
            if self._stopping:
                raise MonitorError("monitor is stopping")
            if unique:
                chosen = allocate(stream_id, self._streams)
                if chosen is None:
                    raise StreamIdTaken(f"stream id {stream_id!r} and its suffixes -2 to -{MAX_SUFFIX} are all open")
                if len(chosen) > 200:
                    raise MonitorError("stream id must be 1 to 200 characters")
                stream_id = chosen
            elif stream_id in self._streams:
                raise StreamIdTaken(f"stream {stream_id!r} is already open")
            if len(self._streams) >= self.config.max_streams:
                raise MonitorError(f"too many streams (max {self.config.max_streams})")
            st = _MonitorStream(self, stream_id, source, codec, rate, channels, detail, ring, call, role)
            self._streams[stream_id] = st
            self._pipe.inc("streams_opened")
        self._emit(
            events.stream_opened(
                stream_id, source=source, codec=codec, sample_rate=rate, channels=channels,
                ts=time.time(), detail=detail, call=call, role=role, params=params,
            )
        )
        return StreamHandle(self, st)

    @property
    def stream_ids(self) -> list[str]:
        with self._registry_lock:
            return list(self._streams)

    def _mark(self, st: _MonitorStream) -> None:
        # Called from audio threads: two attribute checks, a deque append and an Event.set at most.
        if not st.queued_for_wake:
            st.queued_for_wake = True
            self._dirty.append(st)
        if not self._wake.is_set():
            self._wake.set()

    # ------------------------------------------------------------------ idle / stats / health

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until all pushed audio is processed and every result emitted; True if so."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._idle():
                # Confirm over a second look: a result callback may have just woken the pipeline.
                time.sleep(0.005)
                if self._idle():
                    return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.005)

    def _idle(self) -> bool:
        if self._dirty or self._wake.is_set() or self._releasable:
            return False
        with self._registry_lock:
            streams = list(self._streams.values())
        for st in streams:
            if st.ring.available or not st.estimator.idle or st.lifecycle is not Lifecycle.OPEN:
                return False
        return self._batcher.pending == 0 and self._worker.idle

    def stats(self) -> dict[str, Any]:
        """The counters of a ``stats`` event, as a plain dict (also for /metrics)."""
        now = time.monotonic()
        with self._registry_lock:
            streams = list(self._streams.values())
        worker = self._worker.stats()
        audio_dropped = self._removed_audio_drops + sum(st.ring.dropped for st in streams)
        audio_in = self._removed_samples + sum(st.pipeline.samples_in for st in streams)
        bad = self._removed_bad + sum(st.pipeline.bad_samples for st in streams)
        # Partials replaced while waiting: in the batch former, or held by their stream's order gate.
        superseded = self._removed_superseded + sum(st.estimator.superseded for st in streams)
        batcher = self._batcher.counters
        with self._stats_lock:
            pct = self._latency.percentiles((50, 95, 99))
            final_pct = self._final_latency.percentiles((50, 95, 99))
            rate = self._rate.rate(now)
            sizes = list(self._batch_sizes)
            latency_count = self._latency.count
            final_count = self._final_latency.count
        drops = {
            "audio_samples": audio_dropped,
            "source_overflows": self._pipe.get("source_overflows", 0),
            "partials_superseded": batcher.get("partials_superseded", 0) + superseded,
            "partials_dropped": batcher.get("partials_dropped", 0),
            "partials_expired": batcher.get("partials_expired", 0),
            "finals_dropped": batcher.get("finals_dropped", 0),
            "windows_refused": worker.dropped_windows,
            "bad_samples": bad,
            "events_dropped": self._bus_drops() if self._bus_drops else 0,
            "sink_failures": self._sink_failures,
            "inference_failures": worker.failures,
            "stream_failures": self._pipe.get("streams_failed", 0),
        }
        for provider in self._stats_providers:
            try:
                extra = provider()
            except Exception:  # noqa: BLE001 - a source's counter bug must not break /metrics
                self._pipe.inc("stats_provider_failures")
                continue
            for key, value in extra.items():
                drops[str(key)] = drops.get(str(key), 0) + int(value)
        return {
            "uptime_s": now - self._started_at,
            "streams": len(streams),
            "windows_per_s": rate,
            "batches": {
                "count": worker.batches,
                "mean_size": (sum(sizes) / len(sizes)) if sizes else 0.0,
                "max_size": max(sizes, default=0),
            },
            "queues": {
                "batcher_pending": self._batcher.pending,
                "worker_queue": worker.queue_depth,
                "ring_samples": sum(st.ring.available for st in streams),
            },
            "drops": drops,
            "latency_ms": {
                "p50": _ms(pct[50]), "p95": _ms(pct[95]), "p99": _ms(pct[99]), "count": latency_count,
            },
            "final_latency_ms": {
                "p50": _ms(final_pct[50]), "p95": _ms(final_pct[95]), "p99": _ms(final_pct[99]),
                "count": final_count,
            },
            "inference_ms": {"p50": worker.infer_ms_p50, "p95": worker.infer_ms_p95},
            "device": self.device,
            "model": self.info.version,
            "windows": worker.windows,
            "audio_samples": audio_in,
            "events": self._infer.get("events_emitted", 0),
        }

    def stats_event(self) -> dict[str, Any]:
        """The ``stats`` event for now (its snapshot is mirrored into :attr:`metrics` too)."""
        s = self.stats()
        self.metrics.update(s, self.counters())
        return events.stats_event(
            uptime_s=s["uptime_s"], streams=s["streams"], windows_per_s=s["windows_per_s"],
            batches=s["batches"], queues=s["queues"], drops=s["drops"], latency_ms=s["latency_ms"],
            device=s["device"] if s["device"] in ("cpu", "cuda") else "cpu", ts=time.time(),
        )

    def counters(self) -> dict[str, int]:
        """The monitor's and its worker's own counters (``/metrics`` exports each as ``serstream_NAME_total``)."""
        worker = self._worker.stats()
        return {
            **self._pipe.snapshot(), **self._infer.snapshot(),
            "worker_batches_submitted": worker.submitted, "worker_batches_dropped": worker.dropped_batches,
            "worker_batches_split": worker.batches_split, "worker_callback_failures": worker.callback_failures,
            "worker_observe_failures": worker.observe_failures, "sink_failures": self._sink_failures,
        }

    def levels(self) -> dict[str, float]:
        """Each stream's RMS level of its latest audio (0..1; with ``track_levels``)."""
        with self._registry_lock:
            return {sid: st.pipeline.level for sid, st in self._streams.items()}

    def health(self) -> dict[str, Any]:
        """A small dict for /healthz: is the pipeline alive, how many streams."""
        pipeline_alive = self._thread is not None and self._thread.is_alive()
        worker_alive = self._worker.running
        return {
            "status": "ok" if pipeline_alive and worker_alive else "down",
            "pipeline": pipeline_alive,
            "inference": worker_alive,
            "streams": len(self.stream_ids),
            "device": self.device,
            "model": self.info.version,
            "uptime_s": round(time.monotonic() - self._started_at, 3),
        }

    # ------------------------------------------------------------------ events

    def _emit(self, event: dict[str, Any]) -> None:
        with self._sink_lock:
            try:
                self._sink(event)
            except Exception:  # noqa: BLE001 - a consumer's bug must not stop the pipeline
                self._sink_failures += 1

    def _report(self, st: _MonitorStream, code: str, message: str, count: int) -> None:
        """An ``error`` event the first time ``code`` happens on ``st`` (later only counted)."""
        if code in st.reported:
            return
        st.reported[code] = count
        self._emit(events.error_event(st.id, code=code, message=message, count=count, ts=time.time()))

    # ------------------------------------------------------------------ pipeline thread

    def _run(self) -> None:
        while True:
            now = time.monotonic()
            timeout = self._timeout(now)
            if self._dirty and now < self._next_drain:
                # Coalescing: let more audio gather so each drain handles several blocks;
                # meanwhile only results (the worker wants its next batch) wake us.
                self._result_wake.wait(min(timeout, self._next_drain - now))
                self._result_wake.clear()
            else:
                self._wake.wait(timeout)
            self._wake.clear()
            now = time.monotonic()
            if now >= self._next_drain:
                self._process_dirty(now)
                self._next_drain = now + self._coalesce_s()
            self._release_cleared(now)
            self._check_closing(now)
            self._dispatch(time.monotonic())
            if now >= self._next_stats:
                self._next_stats = now + self.config.stats_interval_s
                self._emit_stats()
            if self._stopping and self._all_done():
                break
        # A last stats event: the totals of the run (a file replay's figures, for instance).
        self._emit_stats()

    def _coalesce_s(self) -> float:
        """Least time between drains: about none with few streams, up to 100 ms with hundreds.

        With many streams the fixed cost of a drain (ring read, VAD call, framing)
        dominates; draining each stream every few blocks instead of every block
        keeps the pipeline thread's cost per second of audio down, at the price
        of a few more milliseconds of latency that few streams do not need to pay.
        """
        if self.config.coalesce_s is not None:
            return self.config.coalesce_s
        return min(0.1, 0.0003 * len(self._streams))

    def _timeout(self, now: float) -> float:
        timeout = self._next_stats - now
        deadline = self._batcher.next_deadline()
        if deadline is not None and self._worker.queue_depth == 0:
            timeout = min(timeout, deadline - now)
        if self._closing:
            timeout = min(timeout, 0.05)
        return max(0.0, min(timeout, 0.25))

    def _all_done(self) -> bool:
        with self._registry_lock:
            return not self._streams

    def _process_dirty(self, now: float) -> None:
        dirty = self._dirty
        # Only the streams dirty now: one pushed to again meanwhile waits for the next drain,
        # so each drain takes the audio gathered since the last one in one piece.
        for _ in range(len(dirty)):
            st = dirty.popleft()
            st.queued_for_wake = False
            if st.ended:
                continue
            try:
                self._process_stream(st, now)
            except Exception as exc:  # noqa: BLE001 - one stream's failure stays its own
                self._pipe.inc("pipeline_errors")
                self._fail(st, "stream_error", f"stream pipeline failed: {one_line(exc, limit=None)}", now)
            if st.lifecycle is not Lifecycle.OPEN:
                self._closing.add(st)
            # Feed the worker as soon as it wants a batch, not only after the whole drain: with
            # hundreds of streams a drain outlasts a batch, and the model would sit idle meanwhile
            # while partials aged past their expiry (throughput fell as load rose).
            if self._batcher.pending and self._worker.queue_depth == 0:
                self._dispatch(time.monotonic())

    def _process_stream(self, st: _MonitorStream, now: float) -> None:
        if st.ended:
            return
        if st.trouble is not None:
            self._fail(st, *st.trouble, now)
            return
        with st.lock:
            index, raw = st.ring.read()
            marks = list(st.marks)
            st.marks.clear()
        if st.space_wanted:
            st.space_wanted = False
            st.space.set()
        if st.overflow_notes != st.seen_overflow_notes:
            n = st.overflow_notes - st.seen_overflow_notes
            st.seen_overflow_notes = st.overflow_notes
            self._pipe.inc("source_overflows", n)
            self._report(st, "overflow", "the audio source reported an input overflow (audio lost before capture)",
                         st.overflow_notes)
        pipeline = st.pipeline
        if raw.size:
            items = pipeline.push(index, raw, now, marks)
            bad = pipeline.bad_samples - st.seen_bad
            if bad:
                st.seen_bad = pipeline.bad_samples
                self._report(st, "bad_samples", f"{bad} non-finite (NaN or infinite) samples replaced by 0", bad)
            dropped = st.ring.dropped
            if dropped != st.ring_dropped_seen:
                st.ring_dropped_seen = dropped
                self._report(st, "overflow",
                             f"stream ring overflowed: {dropped} samples dropped (processing fell behind)", dropped)
            if items:
                self._handle(st, items, now)
        if st.lifecycle is Lifecycle.CLOSING:
            self._closing.add(st)
            if st.ring.available == 0:
                self._handle(st, pipeline.finish(now), now)
                if st.move(Lifecycle.DRAINING, only_from=(Lifecycle.CLOSING,)):
                    st.flushed_at = now

    def _handle(self, st: _MonitorStream, items: list[PipelineItem], now: float) -> None:
        """Speech events out now; windows into the stream's order gate, then the batch former."""
        admitted = False
        for item in items:
            if isinstance(item, SpeechBegan):
                self._emit(events.speech_start(st.id, t=item.t, ts=time.time()))
            elif isinstance(item, SpeechEnded):
                self._emit(
                    events.speech_end(st.id, t=item.t, duration=item.duration, reason=item.reason, ts=time.time())
                )
            else:
                with st.est_lock:
                    st.estimator.admit(item.window, item.arrived)
                admitted = True
        if admitted:
            self._release(st, now)

    def _release(self, st: _MonitorStream, now: float) -> None:
        """Hand the stream's cleared windows to the batch former, each with its speaker state."""
        with st.est_lock:
            ready = st.estimator.ready()
        for released in ready:
            self._submit(st, released, now)
        self._settle_drops()

    def _submit(self, st: _MonitorStream, released: Released[float], now: float) -> None:
        context = _WindowContext(st, released.tag, released.state)
        request = Request(stream=st.id, window=released.window, submitted=now, context=context)
        self._batcher.add(request, now, close=False)

    def _release_cleared(self, now: float) -> None:
        """Streams whose held windows a result (or a loss) has cleared since the last tick."""
        releasable = self._releasable
        while releasable:
            st = releasable.popleft()
            if not st.ended:
                self._release(st, now)

    def _settle_drops(self) -> None:
        """Tell each stream about the requests the batch former gave up on, so nobody waits on them."""
        for request in self._batcher.drain_dropped():
            self._lost(request)

    def _lost(self, request: Request) -> None:
        context: _WindowContext = request.context  # type: ignore[assignment]
        st = context.stream
        with st.est_lock:
            st.estimator.lost(request.window)
            cleared = st.estimator.has_ready
        if cleared:
            self._releasable.append(st)

    def _dispatch(self, now: float) -> None:
        """Pull mode: hand the worker a ready batch only when its queue is empty."""
        while self._worker.queue_depth == 0:
            for request in self._batcher.expire(now):
                self._lost(request)
            if self._releasable:
                self._release_cleared(now)
            batches = self._batcher.poll(now, max_batches=1)
            if not batches:
                return
            self._send(batches[0])

    def _send(self, batch: Batch) -> None:
        accepted = self._worker.submit(batch)
        if accepted:
            self._pipe.inc("batches_sent")
            self._pipe.inc("windows_sent", batch.size)
        else:
            self._pipe.inc("batches_refused")
            for request in batch.requests:
                self._lost(request)

    def _check_closing(self, now: float) -> None:
        """Remove closing streams once their last estimates are out (or they waited too long)."""
        for st in list(self._closing):
            if st.ended:
                self._closing.discard(st)
                continue
            if self._stopping and not self._drain_on_stop:
                self._remove(st, st.close_reason or "monitor stopped")
                continue
            if st.lifecycle is not Lifecycle.DRAINING:
                continue  # the stream is still in the dirty queue; its drain flushes it
            with st.est_lock:
                waiting = not st.estimator.idle
            if waiting and now - st.flushed_at < self.config.close_timeout_s:
                continue
            self._remove(st, st.close_reason or "closed")

    def _fail(self, st: _MonitorStream, code: str, message: str, now: float) -> None:
        st.move(Lifecycle.FAILED)
        self._pipe.inc("streams_failed")
        self._report(st, code, message, 1)
        self._remove(st, "error: " + message)

    def _remove(self, st: _MonitorStream, reason: str) -> None:
        with st.lock:
            if st.lifecycle is not Lifecycle.FAILED:
                st.lifecycle = Lifecycle.CLOSED
        self._closing.discard(st)
        st.space.set()
        with self._registry_lock:
            if self._streams.get(st.id) is not st:
                return
            del self._streams[st.id]
            self._removed_audio_drops += st.ring.dropped
            self._removed_bad += st.pipeline.bad_samples
            self._removed_samples += st.pipeline.samples_in
            self._removed_superseded += st.estimator.superseded
        self._pipe.inc("streams_closed")
        self._emit(
            events.stream_closed(
                st.id, source=st.source, codec=st.codec, sample_rate=st.rate, channels=st.channels,
                ts=time.time(), detail=st.detail, reason=reason, call=st.call, role=st.role,
            )
        )

    def _emit_stats(self) -> None:
        try:
            self._emit(self.stats_event())
        except Exception:  # noqa: BLE001 - stats must never stop the pipeline
            self._pipe.inc("pipeline_errors")

    # ------------------------------------------------------------------ inference thread

    def _state_for(self, batch: Batch) -> Mapping[str, list[np.ndarray | None]]:
        """Each row's speaker state, as fixed when its window was released (stream order, not timing)."""
        return {
            spec.name: [request.context.state.get(spec.name) for request in batch.requests]  # type: ignore[attr-defined]
            for spec in self.info.state_inputs
        }

    def _on_result(self, batch: Batch, output: InferenceOutput | None, error: str | None) -> None:
        now = time.monotonic()
        if output is None:
            self._infer.inc("inference_failures")
            self._infer.inc("windows_failed", batch.size)
            for request in batch.requests:
                self._resolve_lost(request)
            if error is not None:
                self._emit(
                    events.error_event(events.STATS_STREAM, code="inference_error", message=error,
                                       count=1, ts=time.time())
                )
            self._wake.set()
            self._result_wake.set()
            return
        latencies: list[float] = []
        finals: list[float] = []
        state_names = [spec.name for spec in self.info.state_inputs]
        for row, request in enumerate(batch.requests):
            context: _WindowContext = request.context  # type: ignore[assignment]
            st = context.stream
            if st.ended:
                self._resolve_lost(request)
                continue
            window = request.window
            updates = {name: output.state_updates[name][row] for name in state_names
                       if name in output.state_updates} if state_names else None
            try:
                with st.est_lock:
                    event = st.estimator.result(
                        window, output.probs[row], output.avd[row], gender=output.gender_probs[row],
                        state_updates=updates, latency_ms=(time.monotonic() - context.pushed_at) * 1000.0,
                        ts=time.time(),
                    )
                    cleared = st.estimator.has_ready
                self._emit(event)
                self._infer.inc("events_emitted")
                latency = time.monotonic() - context.pushed_at
                latencies.append(latency)
                if window.final:
                    finals.append(latency)
                self.metrics.observe_event(window.final, latency)
            except Exception as exc:  # noqa: BLE001 - a bad row fails its stream only
                self._infer.inc("result_errors")
                st.trouble = ("stream_error", f"result handling failed: {one_line(exc, limit=None)}")
                self._mark(st)
                continue
            if cleared:
                self._releasable.append(st)
        with self._stats_lock:
            for value in latencies:
                self._latency.record(value)
            for value in finals:
                self._final_latency.record(value)
            self._rate.record(now, batch.size)
            self._batch_sizes.append(batch.size)
        self._infer.inc("results", batch.size)
        # Closing streams, held windows and pull-mode dispatch all wait on results.
        self._wake.set()
        self._result_wake.set()

    def _resolve_lost(self, request: Request) -> None:
        """A window the worker ran without a usable result: its stream stops waiting for it."""
        try:
            self._lost(request)
        except ValueError:  # noqa: PERF203 - never released: nothing waits on it
            self._infer.inc("result_errors")


def _mono_view(block: np.ndarray) -> np.ndarray:
    """A 1-D view (or a cheap conversion) of a ``[frames]`` or ``[frames, channels]`` block.

    Float blocks of one channel are not copied here: the ring's write is the copy.
    """
    data = np.asarray(block)
    if data.dtype == np.int16:
        data = pcm16_to_float(data.reshape(-1)).reshape(data.shape)
    elif data.dtype.kind != "f":
        raise ValueError(f"audio must be float or int16 samples, got dtype {data.dtype}")
    if data.ndim == 1:
        return data
    if data.ndim == 2 and data.shape[1] == 1:
        return data[:, 0]
    return to_mono(data)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0

