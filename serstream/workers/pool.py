"""``--workers N``: the per-stream pipelines in N processes, one inference tier, one event bus.

:class:`WorkerPool` has the :class:`~serstream.monitor.Monitor`'s interface
(``open_stream`` -> a handle with ``push``/``close``/``fail``, ``stats``,
``health``, ``emit``, ``start``/``stop``), so sources, the server and the CLI
use it unchanged. Inside:

* **Workers**: N spawned processes (:mod:`serstream.workers.child`), each a
  plain ``Monitor`` for the streams pinned to it. How the pool reaches a
  worker is its slot's :class:`~serstream.workers.link.Link`: a process and
  two pipes here, a Ray actor for ``serstream cluster --shards``
  (:mod:`serstream.cluster.shards`, whose workers run their batches on Serve
  themselves, so the inference tier below stays idle). A stream is pinned for its
  life by :func:`~serstream.workers.plan.assign_worker` (least loaded by open
  streams, ties by index).
* **Audio**: ``handle.push`` converts to mono float32 and queues the block for
  its worker; one sender thread per worker sends everything queued in one
  message every couple of milliseconds. Flow control (``free_space``,
  ``wait_for_space``) uses the worker's reports of how much of each stream's
  ring it has read.
* **Inference tier** (:class:`~serstream.workers.hub.InferenceHub`, a thread of this process): every worker's
  batches (with their speaker-state rows: the tier keeps no state) are
  merged into one model call and the rows sent back.
* **Events**: each worker sends its events up in batches; one receiver thread
  per worker hands them to the sink in order (so one stream's events keep
  their order; the bus numbers them).
* **A worker that dies** (its pipe ends or its process sentinel fires): one
  line is logged, each of its streams gets an ``error`` event (code
  ``worker_lost``) and a ``stream`` closed event, the worker is restarted, and
  its streams reopen on it (a new ``stream`` open event, same id; their
  speaker state and open utterance are lost). Audio pushed meanwhile is
  dropped and counted (``drops.worker_audio_samples``), never blocking. Other
  workers' streams are untouched.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import multiprocessing
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from serstream import events
from serstream.contract import ModelInfo
from serstream.core.stats import LatencyTracker
from serstream.core.stream_ids import MAX_SUFFIX, allocate
from serstream.errors import MonitorError, StreamIdTaken, one_line
from serstream.inference.worker import InferenceBackend
from serstream.metrics import MonitorMetrics
from serstream.monitor import (
    MonitorConfig,
    check_model_info,
    scheduler_config_for,
    validate_stream_params,
)
from serstream.workers.handle import PooledHandle
from serstream.workers.hub import HubEntry, InferenceHub
from serstream.workers.link import Link, LinkFactory, ProcessLink
from serstream.workers.merge import Part, sum_stats
from serstream.workers.plan import CLOSE_ON_LOSS_SOURCES, after_loss, assign_worker, may_reopen, restart_delay

__all__ = ["WorkerPool", "PooledHandle", "WORKER_LOST"]

log = logging.getLogger("serstream.workers")

#: The ``error`` event code of a stream whose worker process died.
WORKER_LOST = "worker_lost"
#: How long ``start`` waits for every worker to come up.
START_TIMEOUT_S = 60.0

Sink = Callable[[dict[str, Any]], None]


@dataclass
class _PoolStream:
    """A stream as the main process knows it: its id, worker, open parameters and handle."""

    id: str
    slot: int
    kwargs: dict[str, Any]
    handle: PooledHandle
    reopens: int = 0


@dataclass
class _Slot:
    """One worker position: its link (process or actor, replaced on restart), queue and last stats."""

    index: int
    lock: threading.Lock = field(default_factory=threading.Lock)  # outbox, alive
    down_lock: threading.Lock = field(default_factory=threading.Lock)  # sends on the link, swapping it
    outbox: deque[tuple[Any, ...]] = field(default_factory=deque)
    outbox_samples: int = 0
    wake: threading.Event = field(default_factory=threading.Event)
    link: Link | None = None
    incarnation: int = 0
    alive: bool = False
    ready: threading.Event = field(default_factory=threading.Event)
    #: Streams of a dead incarnation waiting for the restarted worker to be ready.
    pending_reopen: list[_PoolStream] = field(default_factory=list)
    bye: bool = False
    started_at: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)
    levels: dict[str, float] = field(default_factory=dict)
    retired: dict[str, Any] = field(default_factory=dict)
    #: Why the first start failed (the worker died before it was ready); it is not restarted.
    start_error: str | None = None
    receiver: threading.Thread | None = None
    sender: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        return None if self.link is None else self.link.pid


def _reply(slot: _Slot, incarnation: int, request: int) -> Callable[[Any, str | None], None]:
    """How the inference tier answers one request: to the worker that asked, unless it was replaced."""

    def send(output: Any, error: str | None) -> None:
        with slot.down_lock:
            if slot.incarnation != incarnation or slot.link is None:
                return
            with contextlib.suppress(OSError, EOFError, ValueError):
                slot.link.send(("result", request, output, error))

    return send


class WorkerPool:
    """The Monitor's interface over N worker processes (``--workers N``); see the module docstring."""

    def __init__(
        self,
        model_or_backend: InferenceBackend,
        config: MonitorConfig | None = None,
        sink: Sink | None = None,
        *,
        workers: int = 2,
        max_reopens: int = 3,
        hang_timeout_s: float = 30.0,
        link_factory: LinkFactory | None = None,
        name: str = "worker",
        start_timeout_s: float = START_TIMEOUT_S,
        restart_timeout_s: float | None = None,
    ) -> None:
        if workers < 1:
            raise MonitorError(f"workers must be >= 1, got {workers}")
        self.backend = model_or_backend
        self.info: ModelInfo = model_or_backend.info
        self.device: str = str(getattr(model_or_backend, "device", "cpu"))
        self.config = config or MonitorConfig()
        check_model_info(self.info, getattr(model_or_backend, "path", None))
        try:
            self.scheduler_config = self.config.scheduler or scheduler_config_for(self.info, self.config.hop_s)
        except ValueError as exc:
            raise MonitorError(one_line(exc, limit=None)) from None
        self.workers = int(workers)
        self.max_reopens = int(max_reopens)
        #: A running worker silent this long (it reports every second) is taken as hung and killed.
        self.hang_timeout_s = float(hang_timeout_s)
        self._sink: Sink = sink or (lambda event: None)
        self._sink_lock = threading.Lock()
        self._sink_failures = 0
        self._ctx = multiprocessing.get_context("spawn")
        #: How a slot's worker is made: a local process (default) or, for cluster shards, a Ray actor.
        self._link_factory: LinkFactory = link_factory or self._process_link
        #: Where the batches run: here (the hub, ``--workers``) or inside each worker (shards on Serve).
        self._local_inference = link_factory is None
        #: "worker" or "shard": how log lines and events name a slot.
        self.name = name
        self.start_timeout_s = float(start_timeout_s)
        #: A restarted worker not ready by then is ended (``Link.stalled``; for a shard: the cluster is gone).
        self.restart_timeout_s = float(start_timeout_s if restart_timeout_s is None else restart_timeout_s)
        #: Set (one line) when the backend behind the workers is gone (a Ray cluster lost): no restart.
        self.fatal: str | None = None
        self._fatal_callbacks: list[Callable[[str], None]] = []
        self._cluster_lost = 0
        self._slots = [_Slot(i) for i in range(self.workers)]
        self._streams: dict[str, _PoolStream] = {}
        self._registry_lock = threading.Lock()
        self._hub = InferenceHub(self.backend, bool(self.info.state_inputs))
        self._started = False
        self._stopping = False
        self._stopped = threading.Event()
        self._started_at = time.monotonic()
        self._stats_lock = threading.Lock()
        self._latency = LatencyTracker(4096)
        self._final_latency = LatencyTracker(4096)
        self._events = 0
        self._opened = 0
        self._restarts = 0
        self._lost_streams = 0
        self._audio_dropped = 0  # samples pushed to a dead or swamped worker
        self._bus_drops: Callable[[], int] | None = None
        self._stats_providers: list[Callable[[], Mapping[str, int]]] = []
        self._idle_cond = threading.Condition()
        self._idle_replies: dict[int, bool | None] = {}
        self._idle_ids = itertools.count(1)
        self._ticker: threading.Thread | None = None
        #: Prometheus instruments of the whole pool (serstream/metrics.py): event latencies are
        #: observed here, where every worker's events arrive, so /metrics sees every stream.
        self.metrics = MonitorMetrics()
        self.metrics.set_device(self.device, str(getattr(model_or_backend, "provider", "") or self.device))

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the inference tier and every worker; MonitorError (one line) if a worker does not come up."""
        if self._started:
            raise MonitorError("monitor already started")
        self._started = True
        self._started_at = time.monotonic()
        self._hub.thread.start()
        for slot in self._slots:
            self._spawn(slot)
            slot.sender = threading.Thread(target=self._send_loop, args=(slot,),
                                           name=f"serstream-worker-{slot.index}-down", daemon=True)
            slot.sender.start()
            slot.receiver = threading.Thread(target=self._receive_loop, args=(slot,),
                                             name=f"serstream-worker-{slot.index}-up", daemon=True)
            slot.receiver.start()
        deadline = time.monotonic() + self.start_timeout_s
        for slot in self._slots:
            while not slot.ready.wait(0.05):
                failed = slot.start_error
                if failed is not None or time.monotonic() >= deadline:
                    self.stop(drain=False, timeout=2.0)
                    raise MonitorError(f"{self.name} {slot.index} did not start: "
                                       f"{failed or f'not ready within {self.start_timeout_s:g} s'}")
        self._ticker = threading.Thread(target=self._tick, name="serstream-pool-stats", daemon=True)
        self._ticker.start()

    def _process_link(self, index: int, info: ModelInfo, device: str, config: Any) -> Link:
        return ProcessLink(self._ctx, index, info, device, config)

    def on_fatal(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(line)`` (from a pool thread) once, when the workers' backend is gone for good."""
        self._fatal_callbacks.append(callback)

    def _spawn(self, slot: _Slot) -> None:
        """A new worker for ``slot`` (first start or restart), its link swapped in under the send lock."""
        link = self._link_factory(slot.index, self.info, self.device, self.config)
        with slot.down_lock:
            slot.link = link
            slot.incarnation += 1
            slot.bye = False
            slot.started_at = time.monotonic()
            slot.ready = threading.Event()
        # `alive` (takes streams and audio) is set when the worker says it is ready.

    def stop(self, drain: bool = True, timeout: float = 10.0) -> None:
        """Stop every worker (``drain``: their streams' last estimates first), then the inference tier."""
        if not self._started or self._stopped.is_set():
            return
        with self._registry_lock:
            self._stopping = True  # under the lock: no stream opens after this
        for slot in self._slots:
            self._enqueue(slot, ("stop", bool(drain)))
        deadline = time.monotonic() + timeout + 5.0
        for slot in self._slots:
            if slot.receiver is not None:
                slot.receiver.join(max(0.0, deadline - time.monotonic()))
        for slot in self._slots:
            link = slot.link
            if link is not None and link.is_alive() and not slot.bye:
                log.warning("%s %d (%s) did not stop in time; killed", self.name, slot.index, link.label)
                link.kill()
            if link is not None:
                link.join(5.0)
                if link.is_alive():
                    link.kill()
            with slot.lock:
                slot.alive = False
            slot.wake.set()
            with slot.down_lock:
                if link is not None:
                    link.close_down()
        with self._registry_lock:
            left = list(self._streams.values())
            self._streams.clear()
        for st in left:  # their worker never sent the closed event (it died while stopping)
            st.handle._closed = True
            self._emit(self._closed_event(st, "monitor stopped"))
        self._hub.stop()
        self._stopped.set()
        if self._ticker is not None:
            self._ticker.join(2.0)
        self._emit_stats()

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
    ) -> PooledHandle:
        """Register a stream, pin it to a worker and open it there (``Monitor.open_stream``'s contract).

        The ``stream`` open event comes from the worker, ahead of the stream's
        other events; the id is taken (for ``unique``) until its closed event.
        """
        rate, channels = validate_stream_params(stream_id, source=source, sample_rate=sample_rate,
                                                channels=channels, call=call, role=role)
        capacity = max(1, int(math.ceil(self.config.ring_seconds * rate)))
        kwargs = {"source": source, "codec": codec, "sample_rate": rate, "channels": channels, "detail": detail,
                  "call": call, "role": role, "params": None if params is None else dict(params)}
        with self._registry_lock:
            if self._stopping or not self._started:
                raise MonitorError("monitor is stopping" if self._stopping else "monitor not started")
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
            loads = [0] * self.workers
            for other in self._streams.values():
                loads[other.slot] += 1
            index = assign_worker(loads, [slot.alive for slot in self._slots])
            if index is None:
                raise MonitorError("no worker process is running (all are restarting)")
            handle = PooledHandle(self, stream_id, rate, capacity)
            st = _PoolStream(stream_id, index, kwargs, handle)
            self._streams[stream_id] = st
            self._opened += 1
            # In the lock: a push that follows this return queues behind the open.
            self._enqueue(self._slots[index], ("open", stream_id, kwargs))
        return handle

    @property
    def stream_ids(self) -> list[str]:
        with self._registry_lock:
            return list(self._streams)

    def worker_of(self, stream_id: str) -> int | None:
        """The index of the worker a stream is pinned to (None: not open)."""
        with self._registry_lock:
            st = self._streams.get(stream_id)
            return None if st is None else st.slot

    def worker_pids(self) -> list[int | None]:
        """Each worker's process id now (a restarted worker has a new one)."""
        return [slot.pid for slot in self._slots]

    # ------------------------------------------------------------------ main -> worker

    def _enqueue(self, slot: _Slot, item: tuple[Any, ...]) -> None:
        with slot.lock:
            slot.outbox.append(item)
        slot.wake.set()

    def _control(self, stream_id: str, item: tuple[Any, ...]) -> None:
        with self._registry_lock:
            st = self._streams.get(stream_id)
        if st is not None:
            self._enqueue(self._slots[st.slot], item)

    def _audio(self, handle: PooledHandle, samples: np.ndarray, arrived: float) -> None:
        with self._registry_lock:
            st = self._streams.get(handle.stream_id)
        if st is None or st.handle is not handle:
            return
        slot = self._slots[st.slot]
        n = int(samples.shape[0])
        with slot.lock:
            # Bounded: a worker that cannot read its pipe loses audio here (counted), the source never waits.
            # About one ring (ring_seconds) of audio per stream of the worker, at least 1 Mi samples.
            limit = max(1 << 20, handle.capacity * (len(self._streams) // self.workers + 1))
            accepted = slot.alive and slot.outbox_samples + n <= limit
            if accepted:
                slot.outbox.append(("audio", handle.stream_id, arrived, samples))
                slot.outbox_samples += n
                handle.pushed += n
        if accepted:
            slot.wake.set()
            return
        with self._stats_lock:
            self._audio_dropped += n
        if not handle.dropped_noted:
            handle.dropped_noted = True
            self._emit(events.error_event(
                handle.stream_id, code="overflow", count=1, ts=time.time(),
                message=f"audio dropped before reaching worker {slot.index} (it is "
                        f"{'restarting' if not slot.alive else 'not keeping up'})"))

    def _send_loop(self, slot: _Slot) -> None:
        """Everything queued for ``slot`` in one message every couple of milliseconds."""
        while not self._stopped.is_set():
            slot.wake.wait(0.1)
            slot.wake.clear()
            time.sleep(0.002)  # let blocks of other streams gather into the same message
            with slot.lock:
                if not slot.outbox:
                    continue
                items = list(slot.outbox)
                slot.outbox.clear()
                slot.outbox_samples = 0
            with slot.down_lock:
                link = slot.link
                try:
                    if link is None:
                        raise OSError("no worker")
                    link.send(("items", items))
                except (OSError, EOFError, ValueError):
                    lost = sum(int(item[3].shape[0]) for item in items if item[0] == "audio")
                    with self._stats_lock:
                        self._audio_dropped += lost

    # ------------------------------------------------------------------ worker -> main

    def _receive_loop(self, slot: _Slot) -> None:
        """Read ``slot``'s worker until it ends; on an unexpected end, restart it (until the pool stops)."""
        while True:
            link, incarnation = slot.link, slot.incarnation
            assert link is not None
            self._serve(slot, link, incarnation)
            link.close_up()
            if slot.bye or self._stopping:
                link.join(5.0)
                self._drop_streams_of(slot, expected=slot.bye)
                return
            if not self._worker_lost(slot, link):
                return

    def _serve(self, slot: _Slot, link: Link, incarnation: int) -> None:
        heard = time.monotonic()
        stalled = False
        while True:
            ready = link.wait(1.0)
            if ready is None:
                now = time.monotonic()
                silent = now - heard
                if slot.ready.is_set() and not self._stopping and silent > self.hang_timeout_s:
                    # Stuck (a native call that never returns, a stopped process): end it, so the
                    # death path reports its streams and restarts it; nothing waits on it for ever.
                    log.error("%s %d (%s) sent nothing for %.0f s; killing it", self.name, slot.index, link.label,
                              silent)
                    link.kill()
                    heard = now
                elif (incarnation > 1 and not slot.ready.is_set() and not stalled and not self._stopping
                      and now - slot.started_at > self.restart_timeout_s + 5.0):
                    # A restart that never comes up (for a shard: the cluster cannot place it again);
                    # a shard's link gives up on its own at restart_timeout_s, this is the backstop.
                    stalled = True
                    link.stalled(self.restart_timeout_s)
                continue
            heard = time.monotonic()
            if ready == "ended":
                # The worker ended: what it sent before may still be waiting; read it first.
                with contextlib.suppress(EOFError, OSError):
                    while link.poll():
                        self._dispatch(slot, link.recv(), incarnation)
                return
            try:
                message = link.recv()
            except (EOFError, OSError):
                return
            self._dispatch(slot, message, incarnation)

    def _dispatch(self, slot: _Slot, message: tuple[Any, ...], incarnation: int) -> None:
        kind = message[0]
        if kind == "events":
            for event in message[1]:
                self._from_worker(slot, event)
            if message[2]:
                with self._registry_lock:
                    for sid, gone in message[2].items():
                        st = self._streams.get(sid)
                        if st is not None and st.slot == slot.index:
                            st.handle.gone = int(gone)
        elif kind == "infer":
            _, request, audio, lengths, state = message
            self._hub.submit(HubEntry(_reply(slot, incarnation, request), Part(audio, lengths, state)))
        elif kind == "stats":
            slot.stats = message[1]
        elif kind == "levels":
            slot.levels = message[1]
        elif kind == "ready":
            self._on_ready(slot)
        elif kind == "idle":
            with self._idle_cond:
                if message[1] in self._idle_replies:
                    self._idle_replies[message[1]] = bool(message[2])
                self._idle_cond.notify_all()
        elif kind == "open_failed":
            _, sid, text = message
            with self._registry_lock:
                st = self._streams.pop(sid, None)
            if st is not None:
                st.handle._closed = True
                self._emit(events.error_event(sid, code="stream_error", message=text, count=1, ts=time.time()))
        elif kind == "bye":
            slot.bye = True
            with slot.down_lock:
                if slot.link is not None:
                    slot.link.close_down()

    def _on_ready(self, slot: _Slot) -> None:
        """A (re)started worker is up: reopen the streams it inherited, then take audio and new streams."""
        with self._registry_lock:
            for st in slot.pending_reopen:
                if self._streams.get(st.id) is not st:
                    continue
                if st.handle._closed:  # the source closed it while the worker was down
                    del self._streams[st.id]
                    continue
                st.handle.pushed = 0
                st.handle.gone = 0
                st.handle.dropped_noted = False
                self._enqueue(slot, ("open", st.id, st.kwargs))
            slot.pending_reopen = []
            with slot.lock:
                slot.alive = True
        slot.ready.set()

    def _from_worker(self, slot: _Slot, event: dict[str, Any]) -> None:
        """One event of a worker: counted, the registry told of closed streams, then the sink."""
        kind = event.get("type")
        if kind == "emotion":
            latency = float(event.get("latency_ms") or 0.0) / 1000.0
            with self._stats_lock:
                self._latency.record(latency)
                if event.get("kind") == "final":
                    self._final_latency.record(latency)
                self._events += 1
            self.metrics.observe_event(event.get("kind") == "final", latency)
        elif kind == "stream" and event.get("state") == "closed":
            with self._registry_lock:
                st = self._streams.get(str(event.get("stream")))
                if st is not None and st.slot == slot.index:
                    del self._streams[st.id]
                    st.handle._closed = True
        self._emit(event)

    def _drop_streams_of(self, slot: _Slot, expected: bool) -> None:
        """The pool is stopping and ``slot``'s worker ended: its streams left without a closed event get one."""
        with self._registry_lock:
            left = [st for st in self._streams.values() if st.slot == slot.index]
            for st in left:
                del self._streams[st.id]
        for st in left:
            st.handle._closed = True
            self._emit(self._closed_event(st, "monitor stopped" if expected else "error: worker lost"))

    def _worker_lost(self, slot: _Slot, link: Link) -> bool:
        """A worker died: say so (one line, events per stream), restart it, reopen its streams there.

        Unless the backend behind every worker is gone (``link.gone``: a Ray
        cluster lost): then its streams are closed, nothing restarts, and the
        pool's ``fatal`` line is set for the command to exit on.
        """
        link.join(2.0)
        how = link.how()
        uptime = time.monotonic() - slot.started_at
        action = after_loss(first_start=slot.incarnation == 1, was_ready=slot.ready.is_set(),
                            backend_gone=link.gone is not None)
        if action == "start_failed":
            # It never came up (a broken install, an import error): restarting would only loop.
            slot.start_error = f"{self.name} ({link.label}) ended before it was ready ({how})"
            with slot.lock:
                slot.alive = False
            return False
        fatal = action == "fatal"
        with slot.lock:
            slot.alive = False
            lost_audio = sum(int(item[3].shape[0]) for item in slot.outbox if item[0] == "audio")
            slot.outbox.clear()
            slot.outbox_samples = 0
        with self._stats_lock:
            self._audio_dropped += lost_audio
            self._restarts += 0 if fatal else 1
        slot.retired = sum_stats([slot.retired, slot.stats]) if slot.stats else slot.retired
        slot.stats = {}
        with self._registry_lock:
            # Streams still waiting from an earlier death were told then; they wait on for this restart.
            waiting = [st for st in slot.pending_reopen if self._streams.get(st.id) is st]
            affected = [st for st in self._streams.values() if st.slot == slot.index and st not in waiting]
            reopen: list[_PoolStream] = [] if fatal else list(waiting)
            for st in affected:
                st.reopens += 1
                if (not fatal and may_reopen(st.reopens - 1, self.max_reopens, st.kwargs["source"])
                        and not st.handle._closed):
                    reopen.append(st)
                else:
                    del self._streams[st.id]
                    st.handle._closed = True
            if fatal:
                for st in waiting:
                    self._streams.pop(st.id, None)
                    st.handle._closed = True
                slot.pending_reopen = []
        if fatal:
            log.error("%s %d (%s) lost: %s; not restarting it", self.name, slot.index, link.label, link.gone)
        else:
            log.error("%s %d (%s) died (%s); restarting it, its %d stream(s) reopen there",
                      self.name, slot.index, link.label, how, len(reopen))
        for st in affected:
            again = st in reopen
            with self._stats_lock:
                self._lost_streams += 1
            self._emit(events.error_event(
                st.id, code=WORKER_LOST, count=st.reopens, ts=time.time(),
                message=(f"{self.name} {slot.index} ({link.label}) "
                         + (f"lost ({link.gone})" if fatal else f"died ({how})")
                         + ": audio and estimates in flight and the speaker state are lost; "
                         + ("the stream is closed" if fatal
                            else f"the stream reopens on the restarted {self.name}" if again
                            else "the stream is closed (its client reconnects for a new one)"
                            if st.kwargs["source"] in CLOSE_ON_LOSS_SOURCES
                            else f"the stream is closed (its worker died {st.reopens} times with it)"
                            if st.reopens > self.max_reopens else "the stream is closed"))))
            self._emit(self._closed_event(st, "error: worker lost"))
        if fatal:
            self._give_up(str(link.gone))
            return False
        delay = restart_delay(uptime)
        if delay:
            time.sleep(delay)
        with self._registry_lock:
            slot.pending_reopen = reopen
        if self._stopping:
            self._forget(reopen)
            return False
        try:
            self._spawn(slot)  # its streams reopen when it is ready (_on_ready)
        except Exception as exc:  # noqa: BLE001 - no new process: its streams end, others go on
            why = one_line(exc, limit=None)
            log.error("%s %d could not be restarted: %s", self.name, slot.index, why)
            self._forget(reopen)
            if not self._local_inference:
                # A shard that cannot be made again: the cluster is gone (a local process always can be).
                self._give_up(f"cannot start {self.name} {slot.index} again: {why}")
            return False
        return True

    def _give_up(self, line: str) -> None:
        """The backend behind the workers is gone: remember the first line, tell the command once."""
        with self._stats_lock:
            self._cluster_lost += 1
            first = self.fatal is None
            if first:
                self.fatal = line
        if first:
            for callback in self._fatal_callbacks:
                with contextlib.suppress(Exception):
                    callback(line)

    def _forget(self, streams: list[_PoolStream]) -> None:
        """Streams that will not reopen (the pool stops, no new worker): gone, their handles closed."""
        with self._registry_lock:
            for st in streams:
                if self._streams.get(st.id) is st:
                    del self._streams[st.id]
                st.handle._closed = True

    def _closed_event(self, st: _PoolStream, reason: str) -> dict[str, Any]:
        k = st.kwargs
        return events.stream_closed(
            st.id, source=k["source"], codec=k["codec"], sample_rate=k["sample_rate"], channels=k["channels"],
            ts=time.time(), detail=k["detail"], reason=reason, call=k["call"], role=k["role"])

    # ------------------------------------------------------------------ idle / stats / health

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until every worker has processed what was pushed and its events are out; True if so."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = 3600.0 if deadline is None else max(0.0, deadline - time.monotonic())
            tokens = []
            for slot in self._slots:
                if slot.alive:
                    token = next(self._idle_ids)
                    with self._idle_cond:
                        self._idle_replies[token] = None
                    self._enqueue(slot, ("idle", token, min(remaining, 5.0)))
                    tokens.append(token)
            answers = self._idle_answers(tokens, min(remaining, 5.0) + 1.0)
            if all(answers) and self._hub.idle and all(not s.outbox for s in self._slots):
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False

    def _idle_answers(self, tokens: list[int], timeout: float) -> list[bool | None]:
        with self._idle_cond:
            self._idle_cond.wait_for(lambda: all(self._idle_replies[t] is not None for t in tokens), timeout=timeout)
            return [self._idle_replies.pop(t) for t in tokens]

    def stats(self) -> dict[str, Any]:
        """The ``Monitor.stats()`` dict for the whole pool: every worker's counters summed."""
        now = time.monotonic()
        snapshots = [s for slot in self._slots for s in (slot.retired, slot.stats) if s]
        total = sum_stats(snapshots)
        hub = self._hub
        with hub.stats_lock:
            sizes = list(hub.sizes)
            infer_pct = hub.infer_latency.percentiles((50, 95))
            batches = hub.batches
            windows = hub.windows
            rate = hub.rate.rate(now)
        mean_size = (sum(sizes) / len(sizes)) if sizes else 0.0
        max_size = max(sizes, default=0)
        if not self._local_inference:
            # The batches run inside the workers (shards on Serve): their own counts, summed.
            live = [slot.stats for slot in self._slots if slot.stats]
            counted = total.get("batches") or {}
            batches = int(counted.get("count") or 0)
            windows = int(total.get("windows") or 0)
            rate = float(sum(float(s.get("windows_per_s") or 0.0) for s in live))
            mean_size = windows / batches if batches else 0.0
            max_size = max((int((s.get("batches") or {}).get("max_size") or 0) for s in live), default=0)
        with self._stats_lock:
            pct = self._latency.percentiles((50, 95, 99))
            final_pct = self._final_latency.percentiles((50, 95, 99))
            latency_count = self._latency.count
            final_count = self._final_latency.count
            audio_dropped = self._audio_dropped
            events_seen = self._events
        drops = {str(k): int(v) for k, v in (total.get("drops") or {}).items() if isinstance(v, (int, float))}
        drops["events_dropped"] = self._bus_drops() if self._bus_drops else 0
        drops["sink_failures"] = drops.get("sink_failures", 0) + self._sink_failures
        drops["inference_failures"] = max(drops.get("inference_failures", 0), hub.failures)
        drops["worker_audio_samples"] = audio_dropped
        drops["worker_lost"] = self._lost_streams
        if not self._local_inference:
            drops["shards_given_up"] = self._cluster_lost
        for provider in self._stats_providers:
            try:
                extra = provider()
            except Exception:  # noqa: BLE001 - a source's counter bug must not break /metrics
                continue
            for key, value in extra.items():
                drops[str(key)] = drops.get(str(key), 0) + int(value)
        queues = {str(k): v for k, v in (total.get("queues") or {}).items()}
        queues["inference_pending"] = hub.pending
        with self._registry_lock:
            streams = len(self._streams)
        return {
            "uptime_s": now - self._started_at,
            "streams": streams,
            "windows_per_s": rate,
            "batches": {
                "count": batches,
                "mean_size": mean_size,
                "max_size": max_size,
            },
            "queues": queues,
            "drops": drops,
            "latency_ms": {"p50": _ms(pct[50]), "p95": _ms(pct[95]), "p99": _ms(pct[99]), "count": latency_count},
            "final_latency_ms": {"p50": _ms(final_pct[50]), "p95": _ms(final_pct[95]), "p99": _ms(final_pct[99]),
                                 "count": final_count},
            "inference_ms": {"p50": _ms(infer_pct[50]), "p95": _ms(infer_pct[95])},
            "device": self.device,
            "model": self.info.version,
            "windows": windows,
            "audio_samples": int(total.get("audio_samples") or 0),
            "events": events_seen,
            "workers": {
                "count": self.workers,
                "alive": sum(1 for slot in self._slots if slot.alive),
                "restarts": self._restarts,
                "streams": self._loads(),
            },
        }

    def counters(self) -> dict[str, int]:
        """The pool's own counters (``/metrics`` exports each as ``serstream_NAME_total``)."""
        with self._stats_lock:
            return {"worker_restarts": self._restarts, "worker_streams_lost": self._lost_streams,
                    "sink_failures": self._sink_failures}

    def _loads(self) -> list[int]:
        with self._registry_lock:
            loads = [0] * self.workers
            for st in self._streams.values():
                loads[st.slot] += 1
        return loads

    def stats_event(self) -> dict[str, Any]:
        """The ``stats`` event for now (the same fields as the single-process monitor's)."""
        s = self.stats()
        return events.stats_event(
            uptime_s=s["uptime_s"], streams=s["streams"], windows_per_s=s["windows_per_s"],
            batches=s["batches"], queues=s["queues"], drops=s["drops"], latency_ms=s["latency_ms"],
            device=s["device"] if s["device"] in ("cpu", "cuda") else "cpu", ts=time.time(),
        )

    def levels(self) -> dict[str, float]:
        """Each stream's recent RMS level (with ``track_levels``: the workers report them 10 times a second)."""
        merged: dict[str, float] = {}
        for slot in self._slots:
            if slot.alive:
                merged.update(slot.levels)
        with self._registry_lock:
            return {sid: level for sid, level in merged.items() if sid in self._streams}

    def health(self) -> dict[str, Any]:
        """A small dict for /healthz: the inference tier and every worker alive, how many streams."""
        alive = sum(1 for slot in self._slots if slot.alive and slot.link is not None and slot.link.is_alive())
        hub_alive = self._hub.thread.is_alive()
        return {
            "status": "ok" if hub_alive and alive == self.workers else "down",
            "pipeline": alive == self.workers,
            "inference": hub_alive,
            "workers": alive,
            "streams": len(self.stream_ids),
            "device": self.device,
            "model": self.info.version,
            "uptime_s": round(time.monotonic() - self._started_at, 3),
        }

    def _tick(self) -> None:
        while not self._stopped.wait(self.config.stats_interval_s):
            self._emit_stats()

    def _emit_stats(self) -> None:
        try:
            self._emit(self.stats_event())
        except Exception:  # noqa: BLE001 - stats must never stop the pool
            self._sink_failures += 1

    def _emit(self, event: dict[str, Any]) -> None:
        with self._sink_lock:
            try:
                self._sink(event)
            except Exception:  # noqa: BLE001 - a consumer's bug must not stop the pool
                self._sink_failures += 1


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0
