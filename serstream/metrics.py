"""Prometheus metrics through ``prometheus_client``: histograms that add up across processes.

Why not the hand-written text ``/metrics`` served before: it exported latency
as per-process quantiles (a summary), and quantiles of two processes cannot be
combined into the quantiles of both. Histograms can: their buckets are plain
counters, so Prometheus (or ``prometheus_client``'s multiprocess mode) sums
them across worker processes and nodes, and ``histogram_quantile()`` then gives
the p95 of the whole deployment. The bucket bounds include the capacity
targets (:mod:`serstream.core.capacity`: 250 ms for partials, 500 ms for
finals), so "share of partials on time" is one bucket divided by the count.

Each :class:`MonitorMetrics` has its own ``CollectorRegistry`` (never the
process-global one), so several monitors in one process, and the tests, do not
clash. Two kinds of instruments:

* **observed where they happen**: the latency of each emotion event (the
  monitor's result path), inference time and size of each batch (the
  inference worker);
* **mirrored from the monitor's snapshot** (:meth:`MonitorMetrics.update`,
  called with ``Monitor.stats()`` on every stats tick and every scrape):
  counters grow by the difference since the last snapshot, gauges are set. The
  counters stay in the places that count them today (batch former, worker,
  sources, server), and the ``stats`` event and ``/metrics`` cannot disagree.

Multiprocess mode (for ``--workers N`` later; docs/scale-out.md): start every
process with ``PROMETHEUS_MULTIPROC_DIR`` set to one empty folder. The
instruments then keep their values in files there, and :meth:`render` (in any
of the processes) serves the sum over all of them through
``prometheus_client.multiprocess.MultiProcessCollector``. The variable must be
set before ``prometheus_client`` is first imported (it picks its value store
at import), and one monitor per process is the rule there (the files are keyed
by metric name and process id).
"""

from __future__ import annotations

import math
import os
import re
import threading
from typing import Any, Mapping, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = [
    "LATENCY_BUCKETS_S",
    "BATCH_SECONDS_BUCKETS",
    "BATCH_SIZE_BUCKETS",
    "MULTIPROC_ENV",
    "MonitorMetrics",
    "multiprocess_dir",
    "prometheus_text",
    "scrape",
]

#: Event latency buckets, seconds: fine up to the partial target (0.25), the final target (0.5) an edge too.
LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
#: Inference time per batch, seconds (a 3 s window costs about 5 ms on one CPU core; batches of 8 about 40 ms).
BATCH_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
#: Windows per batch (the batch former's limits are 8 on CPU, 32 on CUDA by default).
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

_COUNTER_NAME = re.compile(r"^[a-z][a-z0-9_]{0,80}$")


#: Names ``update(counters=...)`` may not use: the families above already have them.
_TAKEN = frozenset({"drops", "batches", "windows", "events", "audio_samples"})


def multiprocess_dir() -> str | None:
    """The multiprocess folder when that mode is on (the environment variable is set), else None."""
    return os.environ.get(MULTIPROC_ENV) or os.environ.get(MULTIPROC_ENV.lower()) or None


class MonitorMetrics:
    """One monitor's instruments in a registry of its own; every method is safe from any thread."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        self._lock = threading.Lock()
        # Last mirrored value of each counter, keyed by (metric, label value).
        self._seen: dict[tuple[str, str], float] = {}
        #: Snapshot values that went down (a source's counter reset): not added, only counted.
        self.counter_resets = 0
        #: Snapshot values that were not finite numbers: left out, only counted.
        self.bad_values = 0
        #: Counter names of ``update(counters=...)`` refused (not a plain lower-case name): counted, not exported.
        self.bad_counter_names = 0
        self._named: dict[str, Counter] = {}

        self.partial_latency = Histogram(
            "serstream_partial_latency_seconds",
            "Audio-to-event latency of partial emotion estimates: the audio completing the window "
            "reaching the monitor to the event.", buckets=LATENCY_BUCKETS_S, registry=reg)
        self.final_latency = Histogram(
            "serstream_final_latency_seconds",
            "End-of-speech-to-final latency: the audio that ended the segment (after the VAD hangover) "
            "reaching the monitor to the final event.", buckets=LATENCY_BUCKETS_S, registry=reg)
        self.batch_seconds = Histogram(
            "serstream_inference_batch_seconds", "Time the model took per batch (successful batches).",
            buckets=BATCH_SECONDS_BUCKETS, registry=reg)
        self.batch_size = Histogram(
            "serstream_batch_size", "Windows per batch run by the model.", buckets=BATCH_SIZE_BUCKETS,
            registry=reg)

        self.drops = Counter("serstream_drops", "Items dropped or refused since start, by cause.",
                             ["cause"], registry=reg)
        self.batches = Counter("serstream_batches", "Batches run since start.", registry=reg)
        self.windows = Counter("serstream_windows", "Windows run through the model since start.", registry=reg)
        self.events = Counter("serstream_events", "Emotion events emitted since start.", registry=reg)
        self.audio = Counter("serstream_audio_samples",
                             "Audio samples taken in since start (each stream at its own rate).", registry=reg)

        self.uptime = Gauge("serstream_uptime_seconds", "Seconds since the monitor started.", registry=reg,
                            multiprocess_mode="max")
        self.streams = Gauge("serstream_streams", "Streams open now.", registry=reg, multiprocess_mode="livesum")
        self.rate = Gauge("serstream_windows_per_second",
                          "Windows run through the model per second (recent average).", registry=reg,
                          multiprocess_mode="livesum")
        self.queues = Gauge("serstream_queue_depth", "Items waiting in each queue now.", ["queue"],
                            registry=reg, multiprocess_mode="livesum")
        self.batch_max = Gauge("serstream_batch_size_max", "Largest of the recent batches.", registry=reg,
                               multiprocess_mode="max")
        # An info-style gauge (Info metrics do not work in multiprocess mode).
        self.device = Gauge("serstream_device_info",
                            "Where the model runs: device and ONNX Runtime execution provider (labels), always 1.",
                            ["device", "provider"], registry=reg, multiprocess_mode="max")

    # ------------------------------------------------------------------ observed where they happen

    def observe_event(self, final: bool, latency_s: float) -> None:
        """One emotion event's latency (seconds); NaN, inf or negative values are left out."""
        if math.isfinite(latency_s) and latency_s >= 0:
            (self.final_latency if final else self.partial_latency).observe(latency_s)

    def observe_batch(self, size: int, seconds: float) -> None:
        """One batch the model ran: its windows and how long it took."""
        self.batch_size.observe(size)
        if math.isfinite(seconds) and seconds >= 0:
            self.batch_seconds.observe(seconds)

    def set_device(self, device: str, provider: str) -> None:
        """Which device and execution provider the model got (set once, at start)."""
        self.device.labels(device=str(device), provider=str(provider)).set(1)

    # ------------------------------------------------------------------ mirrored from the snapshot

    def update(self, stats: Mapping[str, Any], counters: Mapping[str, int] | None = None) -> None:
        """Mirror a ``Monitor.stats()`` snapshot: counters grow by what is new, gauges are set.

        Fields absent from ``stats`` are left alone, so a partial snapshot is fine.
        ``counters`` (``Monitor.counters()``) become ``serstream_NAME_total`` each.
        """
        with self._lock:
            for name, count in sorted((counters or {}).items()):
                counter = self._named_counter(str(name))
                if counter is not None:
                    self._grow(counter, "counter", str(name), count)
            for cause, value in sorted((stats.get("drops") or {}).items()):
                self._grow(self.drops.labels(cause=str(cause)), "drops", str(cause), value)
            batches = stats.get("batches") or {}
            if "count" in batches:
                self._grow(self.batches, "batches", "", batches["count"])
            if "max_size" in batches:
                self._set(self.batch_max, batches["max_size"])
            for key, counter in (("windows", self.windows), ("events", self.events), ("audio_samples", self.audio)):
                if key in stats:
                    self._grow(counter, key, "", stats[key])
            for key, gauge in (("uptime_s", self.uptime), ("streams", self.streams), ("windows_per_s", self.rate)):
                if key in stats:
                    self._set(gauge, stats[key])
            for queue, depth in sorted((stats.get("queues") or {}).items()):
                self._set(self.queues.labels(queue=str(queue)), depth)

    def _named_counter(self, name: str) -> Counter | None:
        # Called with the lock held.
        counter = self._named.get(name)
        if counter is None:
            if not _COUNTER_NAME.match(name) or name in _TAKEN:
                self.bad_counter_names += 1
                return None
            try:
                counter = Counter(f"serstream_{name}", f"The monitor's {name.replace('_', ' ')} since start "
                                  "(Monitor.counters()).", registry=self.registry)
            except ValueError:  # its name collides with a family already registered
                self.bad_counter_names += 1
                return None
            self._named[name] = counter
        return counter

    def _number(self, value: Any) -> float | None:
        """``value`` as a finite float; anything else is counted in ``bad_values`` and left out."""
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number):
            self.bad_values += 1
            return None
        return number

    def _set(self, gauge: Any, value: Any) -> None:
        number = self._number(value)
        if number is not None:
            gauge.set(number)

    def _grow(self, counter: Any, name: str, label: str, value: Any) -> None:
        # Called with the lock held.
        current = self._number(value)
        if current is None:
            return
        key = (name, label)
        last = self._seen.get(key, 0.0)
        if current < last:
            self.counter_resets += 1
        elif current > last:
            counter.inc(current - last)
        self._seen[key] = current

    # ------------------------------------------------------------------ exposition

    def render(self) -> str:
        """The Prometheus text exposition: this registry, or every process's files in multiprocess mode."""
        folder = multiprocess_dir()
        if folder is None:
            return generate_latest(self.registry).decode("utf-8")
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=folder)
        return generate_latest(registry).decode("utf-8")


def prometheus_text(stats: Mapping[str, Any]) -> str:
    """A ``stats`` snapshot rendered alone, in a fresh registry (tests, one-off tools).

    It has the counters and gauges only (histograms need the events
    themselves); a running monitor serves ``monitor.metrics`` instead. Not for
    multiprocess mode, where every instrument writes to the shared folder.
    """
    metrics = MonitorMetrics()
    metrics.update(stats)
    if "device" in stats:
        metrics.set_device(str(stats["device"]), str(stats.get("provider") or ""))
    return generate_latest(metrics.registry).decode("utf-8")


class _Scrapable(Protocol):
    metrics: MonitorMetrics

    def stats(self) -> dict[str, Any]: ...

    def counters(self) -> dict[str, int]: ...


def scrape(monitor: _Scrapable) -> str:
    """What ``/metrics`` serves for a running monitor: its snapshot mirrored in, then the exposition."""
    monitor.metrics.update(monitor.stats(), monitor.counters())
    return monitor.metrics.render()
