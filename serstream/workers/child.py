"""One ``--workers`` process: a :class:`~serstream.monitor.Monitor` whose model is the main process.

The worker runs the per-stream pipelines (resample, VAD, windows, the order
gate and the estimator) of the streams pinned to it, exactly the code of the
single-process monitor; only its :class:`RemoteBackend` differs: ``infer``
sends the batch (audio, lengths, speaker state rows) up to the main process's
inference tier and waits for its rows. Everything else crosses the two pipes
in batches:

* down (main -> worker), one message per send: a list of items in order,
  ``("open", id, kwargs)``, ``("audio", id, arrived, samples)``,
  ``("close", id, reason)``, ``("fail", id, message, code)``,
  ``("overflow", id, n)``, ``("idle", token, timeout)``, ``("stop", drain)``;
  and ``("result", request, output | None, error)`` from the inference tier.
* up (worker -> main): ``("events", [event, ...], gone)`` every few
  milliseconds (``gone``: per stream, samples the worker's ring no longer
  holds, the main process's flow control), ``("infer", request, audio,
  lengths, state)``, ``("stats", Monitor.stats())`` once a second, ``("levels", {id: rms})``
  ten times a second with ``track_levels``,
  ``("idle", token, ok)`` and ``("bye",)``.

The worker ignores SIGINT and SIGTERM (the main process orders the stop) and
exits when the main process goes away (its pipe ends), so nothing is left
behind; SIGKILL still ends it (and the pool restarts it).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import signal
import threading
import time
from collections import deque
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from serstream.contract import ModelInfo
from serstream.errors import InferenceError, MonitorError, one_line
from serstream.inference.session import InferenceOutput

__all__ = ["RemoteBackend", "worker_main", "serve_worker"]

log = logging.getLogger("serstream.workers")

#: How often buffered events go up (seconds); also the flow-control report period.
EVENT_FLUSH_S = 0.005
STATS_PERIOD_S = 1.0
LEVELS_PERIOD_S = 0.1


class _Up:
    """The worker's sending end, shared by its threads under one lock."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.lock = threading.Lock()
        self.broken = False

    def send(self, message: tuple[Any, ...]) -> None:
        with self.lock:
            if self.broken:
                return
            try:
                self.conn.send(message)
            except (OSError, EOFError, BrokenPipeError):
                self.broken = True


class RemoteBackend:
    """An :class:`~serstream.inference.worker.InferenceBackend` that runs batches in the main process."""

    def __init__(self, info: ModelInfo, device: str, up: _Up) -> None:
        self.info = info
        self.device = device
        self._up = up
        self._ids = itertools.count(1)
        self._cond = threading.Condition()
        self._results: dict[int, tuple[InferenceOutput | None, str | None]] = {}
        self._closed = False

    def infer(
        self,
        audio: np.ndarray,
        lengths: np.ndarray,
        state: Mapping[str, np.ndarray | Sequence[np.ndarray | None]] | None = None,
    ) -> InferenceOutput:
        request = next(self._ids)
        rows = None if state is None else {name: list(value) for name, value in state.items()}
        self._up.send(("infer", request, np.ascontiguousarray(audio, np.float32),
                       np.asarray(lengths, np.int64), rows))
        with self._cond:
            while request not in self._results:
                if self._closed or self._up.broken:
                    raise InferenceError("the inference tier went away (main process stopping)")
                self._cond.wait(0.5)
            output, error = self._results.pop(request)
        if output is None:
            raise InferenceError(error or "inference failed")
        return output

    def deliver(self, request: int, output: InferenceOutput | None, error: str | None) -> None:
        with self._cond:
            self._results[request] = (output, error)
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class _Outbox:
    """Events and replies in order, sent up in batches by one thread."""

    def __init__(self, up: _Up, handles: dict[str, Any], received: dict[str, int], monitor: Any) -> None:
        self.up = up
        self.handles = handles
        self.received = received
        self.monitor = monitor
        self.items: deque[tuple[str, Any]] = deque()
        self.wake = threading.Event()
        self.stopped = threading.Event()
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="serstream-worker-up", daemon=True)
        self._last_gone: dict[str, int] = {}
        self._next_stats = 0.0
        self._next_levels = 0.0

    def event(self, event: dict[str, Any]) -> None:
        if event.get("type") == "stats":
            return  # the main process sends the pool's stats event (sums of every worker)
        self.items.append(("event", event))
        self.wake.set()

    def reply(self, message: tuple[Any, ...]) -> None:
        self.items.append(("reply", message))
        self.wake.set()

    def flush(self) -> None:
        """Send everything queued now (callers: the stop path)."""
        with self.lock:
            self._send_queued()

    def _gone(self) -> dict[str, int]:
        """Per stream whose figure changed: samples received that its ring no longer holds."""
        changed: dict[str, int] = {}
        for sid, handle in list(self.handles.items()):
            try:
                gone = self.received.get(sid, 0) - (handle.capacity - handle.free_space)
            except Exception:  # noqa: BLE001 - a stream closing meanwhile
                continue
            if self._last_gone.get(sid) != gone:
                self._last_gone[sid] = gone
                changed[sid] = gone
        for sid in [s for s in self._last_gone if s not in self.handles]:
            del self._last_gone[sid]
        return changed

    def _send_queued(self) -> None:
        batch: list[dict[str, Any]] = []
        sent_closed = False
        while self.items:
            kind, item = self.items.popleft()
            if kind == "event":
                batch.append(item)
                continue
            if batch:
                self.up.send(("events", batch, {}))
                sent_closed = sent_closed or _has_closed(batch)
                batch = []
            self.up.send(item)
        gone = self._gone()
        if batch or gone:
            self.up.send(("events", batch, gone))
        if sent_closed or _has_closed(batch):
            # A stream's totals move into the monitor's "removed" counters: let the sums follow.
            self._next_stats = 0.0

    def _run(self) -> None:
        while not self.stopped.is_set():
            self.wake.wait(0.02)
            self.wake.clear()
            time.sleep(EVENT_FLUSH_S)  # let a burst of events gather into one message
            with self.lock:
                self._send_queued()
                now = time.monotonic()
                if now >= self._next_stats:
                    self._next_stats = now + STATS_PERIOD_S
                    with contextlib.suppress(Exception):
                        self.up.send(("stats", self.monitor.stats()))
                if self.monitor.config.track_levels and now >= self._next_levels:
                    # The console's level meter (a TTY only): ten small reports a second.
                    self._next_levels = now + LEVELS_PERIOD_S
                    self.up.send(("levels", self.monitor.levels()))


def _has_closed(batch: list[dict[str, Any]]) -> bool:
    return any(e.get("type") == "stream" and e.get("state") == "closed" for e in batch)


def worker_main(index: int, down: Any, up_conn: Any, info: ModelInfo, device: str, config: Any) -> None:
    """The worker process's entry point (spawned by :class:`~serstream.workers.pool.WorkerPool`)."""
    # The main process orders the stop, so Ctrl-C in a terminal or a service manager's SIGTERM
    # to the whole process group still gives every stream its last estimates.
    with contextlib.suppress(ValueError, OSError):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format=f"serstream: worker {index}: %(message)s")
    up = _Up(up_conn)
    try:
        serve_worker(down, up, RemoteBackend(info, device, up), config)
    finally:
        os._exit(0)


def serve_worker(
    down: Any,
    up: _Up,
    backend: Any,
    config: Any,
    stats_providers: Sequence[Callable[[], Mapping[str, int]]] = (),
) -> None:
    """Run one worker's ``Monitor`` on ``backend`` for the pool at the other end of ``down``/``up``.

    ``down.recv()`` gives the pool's messages in order (EOFError or OSError:
    the pool is gone); ``up`` carries the replies. Shared by the ``--workers``
    process (pipes, :class:`RemoteBackend`) and the cluster shard actor
    (in-memory queues, the Serve backend): the same loop either way.
    """
    from serstream.monitor import Monitor

    handles: dict[str, Any] = {}
    received: dict[str, int] = {}
    outbox: _Outbox
    monitor = Monitor(backend, config, lambda event: outbox.event(event))
    for provider in stats_providers:
        monitor.add_stats_provider(provider)
    outbox = _Outbox(up, handles, received, monitor)
    monitor.start()
    up.send(("ready",))
    outbox.thread.start()
    stopper: threading.Thread | None = None
    close_backend = getattr(backend, "close", None)

    def stop(drain: bool) -> None:
        monitor.stop(drain)
        if close_backend is not None:
            close_backend()
        outbox.stopped.set()
        outbox.thread.join(2.0)
        outbox.flush()
        with contextlib.suppress(Exception):
            up.send(("stats", monitor.stats()))
        up.send(("bye",))

    def idle(token: int, timeout: float) -> None:
        ok = monitor.wait_idle(timeout)
        outbox.reply(("idle", token, ok))

    try:
        while True:
            try:
                message = down.recv()
            except (EOFError, OSError):
                break  # the main process is gone: nothing to serve any more
            if message[0] == "result":
                _, request, output, error = message
                backend.deliver(request, output, error)
                continue
            for item in message[1]:
                kind = item[0]
                if kind == "audio":
                    _, sid, arrived, samples = item
                    handle = handles.get(sid)
                    if handle is not None:
                        handle.push(samples, at=arrived)
                        received[sid] = received.get(sid, 0) + int(samples.shape[0])
                elif kind == "open":
                    _, sid, kwargs = item
                    try:
                        handles[sid] = monitor.open_stream(sid, unique=False, **kwargs)
                        received[sid] = 0
                    except MonitorError as exc:
                        outbox.reply(("open_failed", sid, one_line(exc, limit=None)))
                elif kind == "close":
                    handle = handles.pop(item[1], None)
                    received.pop(item[1], None)
                    if handle is not None:
                        handle.close(item[2])
                elif kind == "fail":
                    handle = handles.get(item[1])
                    if handle is not None:
                        handle.fail(item[2], code=item[3])
                elif kind == "overflow":
                    handle = handles.get(item[1])
                    if handle is not None:
                        handle.note_overflow(item[2])
                elif kind == "idle":
                    threading.Thread(target=idle, args=item[1:], daemon=True).start()
                elif kind == "stop" and stopper is None:
                    # On a thread: stopping drains the streams, which needs results from this loop.
                    stopper = threading.Thread(target=stop, args=(bool(item[1]),), daemon=True)
                    stopper.start()
            # Streams the monitor ended itself (failure, close): forget their handles.
            for sid in [s for s, h in handles.items() if h.closed]:
                handles.pop(sid, None)
                received.pop(sid, None)
    finally:
        if stopper is not None:
            stopper.join(30.0)
        else:
            if close_backend is not None:
                close_backend()
            monitor.stop(False, timeout=2.0)
