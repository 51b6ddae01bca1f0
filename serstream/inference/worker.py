"""The inference worker: threads that run batches, so the pipeline never waits on the model.

The pipeline :meth:`~InferenceWorker.submit`\\ s closed batches (non-blocking;
a full queue refuses the batch and counts the drop) and gets each result back
through ``on_result`` on the worker thread. What runs the batch is an
:class:`InferenceBackend`: the in-process :class:`~serstream.inference.session.EmotionModel`
today, a client of a remote serving engine (Ray Serve, Triton) later, with
the same three members.

A failing batch never stops the worker, and one stream's audio cannot take
the other streams' estimates down with it: a batch of several windows that
fails is run again one window at a time (counted in ``batches_split``), so
only the windows the model really fails on are lost. Each failure is counted
per distinct message, and reported through ``on_result(batch, None, message)``
the first time that message occurs; later failures with the same message
arrive as ``on_result(batch, None, None)`` (the batch failed, its cause was
already reported), so the caller can still release what it holds for those
requests without flooding its users with the same error.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from serstream.contract import ModelInfo
from serstream.core.stats import LatencyTracker
from serstream.inference.session import InferenceOutput

__all__ = [
    "InferenceBackend",
    "BatchLike",
    "ResultCallback",
    "StateProvider",
    "WorkerStats",
    "InferenceWorker",
]

log = logging.getLogger(__name__)

#: Distinct failure messages remembered; past this, new messages count as repeats.
_MAX_DISTINCT_FAILURES = 64


@runtime_checkable
class InferenceBackend(Protocol):
    """What the worker needs from a model: its metadata, its device, and a batch call."""

    info: ModelInfo
    device: str

    def infer(
        self,
        audio: np.ndarray,
        lengths: np.ndarray,
        state: Mapping[str, np.ndarray | Sequence[np.ndarray | None]] | None = None,
    ) -> InferenceOutput: ...


class BatchLike(Protocol):
    """The fields of :class:`serstream.core.batcher.Batch` the worker uses (read only)."""

    @property
    def requests(self) -> Sequence[Any]: ...

    @property
    def audio(self) -> np.ndarray: ...

    @property
    def lengths(self) -> np.ndarray: ...


#: ``on_result(batch, output, error)``: output on success; on failure output is
#: None and error is the message (first occurrence) or None (a repeat).
ResultCallback = Callable[[Any, InferenceOutput | None, str | None], None]

#: Builds the state inputs for a batch (e.g. from each request's ``context``);
#: called on the worker thread just before ``infer``.
StateProvider = Callable[[Any], Mapping[str, np.ndarray | Sequence[np.ndarray | None]] | None]


@dataclass(frozen=True)
class WorkerStats:
    """A snapshot of the worker's counters (safe to hand to any thread)."""

    #: submit() calls, accepted or not.
    submitted: int
    #: Batches run (failed ones included) and the windows in them.
    batches: int
    windows: int
    #: Batches whose infer raised.
    failures: int
    #: Refused by submit() (queue full, not started, stopped) or discarded by stop(drain=False).
    dropped_batches: int
    dropped_windows: int
    #: on_result calls that raised (logged once, then only counted).
    callback_failures: int
    queue_depth: int
    max_queue: int
    mean_batch_size: float
    max_batch_size: int
    batch_sizes: dict[int, int] = field(default_factory=dict)
    #: Latency of ``backend.infer`` per batch, milliseconds; None before the first batch.
    infer_ms_p50: float | None = None
    infer_ms_p95: float | None = None
    infer_ms_p99: float | None = None
    failure_counts: dict[str, int] = field(default_factory=dict)
    #: Failed batches of several windows that were run again one window at a time.
    batches_split: int = 0
    #: ``observe`` calls that raised (the batch's results still went out).
    observe_failures: int = 0


@dataclass
class _RowBatch:
    """One window of a failed batch, run again on its own (a :class:`BatchLike`)."""

    requests: list[Any]
    audio: np.ndarray
    lengths: np.ndarray

    @property
    def size(self) -> int:
        return len(self.requests)


def split_rows(batch: BatchLike) -> list[_RowBatch]:
    """``batch`` as one single-window batch per request, each cut to its own length."""
    rows = []
    for i, request in enumerate(batch.requests):
        n = int(batch.lengths[i])
        rows.append(_RowBatch([request], batch.audio[i : i + 1, :n], batch.lengths[i : i + 1]))
    return rows


class InferenceWorker:
    """Runs submitted batches on one thread and hands each result to ``on_result``."""

    def __init__(
        self,
        backend: InferenceBackend,
        on_result: ResultCallback,
        max_queue: int = 8,
        *,
        state_for: StateProvider | None = None,
        clock: Callable[[], float] = time.perf_counter,
        observe: Callable[[int, float], None] | None = None,
        concurrency: int = 1,
    ) -> None:
        if max_queue <= 0:
            raise ValueError(f"max_queue must be > 0, got {max_queue}")
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        #: Batches run at once, each on its own thread (the backend must take concurrent calls:
        #: an ONNX Runtime session does). Results of different batches may then arrive out of
        #: order; the monitor's order gate keeps at most one window of a stream in flight.
        self.concurrency = int(concurrency)
        self.backend = backend
        self.on_result = on_result
        self.max_queue = int(max_queue)
        self.state_for = state_for
        self._clock = clock
        #: ``observe(windows, seconds)`` for each batch the model ran without failing (metrics histograms).
        self.observe = observe
        self._observe_failures = 0
        self._queue: deque[BatchLike] = deque()
        self._cond = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._busy = 0  # batches running now
        self._latency = LatencyTracker(capacity=2048)
        self._sizes: Counter[int] = Counter()
        self._failures: dict[str, int] = {}
        self._submitted = 0
        self._batches = 0
        self._windows = 0
        self._failed = 0
        self._dropped_batches = 0
        self._dropped_windows = 0
        self._callback_failures = 0
        self._split = 0

    # ------------------------------------------------------------------ control

    def start(self) -> None:
        """Start the worker thread (once)."""
        with self._cond:
            if self._threads:
                raise RuntimeError("inference worker already started")
            self._stopping = False
            self._threads = [
                threading.Thread(target=self._run, name="serstream-inference" + (f"-{i}" if i else ""), daemon=True)
                for i in range(self.concurrency)
            ]
            for thread in self._threads:
                thread.start()

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop the thread. ``drain``: run the batches still queued first; else drop them (counted)."""
        with self._cond:
            self._stopping = True
            if not drain:
                while self._queue:
                    self._count_drop(self._queue.popleft())
            self._cond.notify_all()
            threads = list(self._threads)
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    @property
    def running(self) -> bool:
        return bool(self._threads) and all(thread.is_alive() for thread in self._threads)

    @property
    def queue_depth(self) -> int:
        """Batches waiting (not counting the one running)."""
        with self._cond:
            return len(self._queue)

    @property
    def idle(self) -> bool:
        """Nothing queued and nothing running: a pull-mode caller may hand over the next batch."""
        with self._cond:
            return not self._queue and not self._busy

    def submit(self, batch: BatchLike) -> bool:
        """Queue ``batch`` without blocking. False (and a counted drop) when full or stopped."""
        with self._cond:
            self._submitted += 1
            if self._stopping or not self._threads or len(self._queue) >= self.max_queue:
                self._count_drop(batch)
                return False
            self._queue.append(batch)
            self._cond.notify()
            return True

    # ------------------------------------------------------------------ stats

    def stats(self) -> WorkerStats:
        """A consistent snapshot of the counters."""
        with self._cond:
            pct = self._latency.percentiles((50, 95, 99))
            sizes = dict(sorted(self._sizes.items()))
            return WorkerStats(
                submitted=self._submitted,
                batches=self._batches,
                windows=self._windows,
                failures=self._failed,
                dropped_batches=self._dropped_batches,
                dropped_windows=self._dropped_windows,
                callback_failures=self._callback_failures,
                queue_depth=len(self._queue),
                max_queue=self.max_queue,
                mean_batch_size=(self._windows / self._batches) if self._batches else 0.0,
                max_batch_size=max(sizes, default=0),
                batch_sizes=sizes,
                infer_ms_p50=_ms(pct[50]),
                infer_ms_p95=_ms(pct[95]),
                infer_ms_p99=_ms(pct[99]),
                failure_counts=dict(self._failures),
                batches_split=self._split,
                observe_failures=self._observe_failures,
            )

    # ------------------------------------------------------------------ thread

    def _count_drop(self, batch: BatchLike) -> None:
        # Called with the lock held.
        self._dropped_batches += 1
        self._dropped_windows += len(batch.requests)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return  # stopping and drained
                batch = self._queue.popleft()
                self._busy += 1
            try:
                self._process(batch)
            finally:
                with self._cond:
                    self._busy -= 1

    def _process(self, batch: BatchLike) -> None:
        size = len(batch.requests)
        output: InferenceOutput | None = None
        error: str | None = None
        failed = False
        started = self._clock()
        try:
            state = self.state_for(batch) if self.state_for is not None else None
            output = self.backend.infer(batch.audio, batch.lengths, state)
        except Exception as exc:  # a bad batch must not end the worker
            failed = True
            error = _describe(exc)
        elapsed = self._clock() - started
        if failed and size > 1:
            # Which window broke it is unknown: run each alone, so the others still get results.
            with self._cond:
                self._split += 1
            for row in split_rows(batch):
                self._process(row)
            return

        with self._cond:
            self._batches += 1
            self._windows += size
            self._sizes[size] += 1
            if failed:
                self._failed += 1
                assert error is not None
                if error in self._failures:
                    self._failures[error] += 1
                    error = None  # already reported once
                elif len(self._failures) >= _MAX_DISTINCT_FAILURES:
                    self._failures["other"] = self._failures.get("other", 0) + 1
                    error = None
                else:
                    self._failures[error] = 1
            else:
                self._latency.record(elapsed)

        if failed and error is not None:
            log.warning("inference failed: %s", error)
        if not failed and self.observe is not None:
            try:
                self.observe(size, elapsed)
            except Exception:  # noqa: BLE001 - a metrics bug must not lose the batch's results
                with self._cond:
                    self._observe_failures += 1
        try:
            self.on_result(batch, output, error)
        except Exception as exc:
            with self._cond:
                self._callback_failures += 1
                first = self._callback_failures == 1
            if first:
                log.error("result callback failed: %s", _describe(exc))


def _describe(exc: BaseException) -> str:
    """One line: the exception's first line, with its type when the message alone is vague."""
    text = str(exc).strip()
    first = text.splitlines()[0].strip() if text else ""
    if not first:
        return type(exc).__name__
    if isinstance(exc, (RuntimeError, ValueError)) and type(exc).__module__.startswith("serstream"):
        return first
    return f"{type(exc).__name__}: {first}"


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0
