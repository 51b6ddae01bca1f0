"""Counters, latency percentiles and event rates for the ``stats`` events and ``/metrics``.

All three are plain containers: time is passed in, nothing reads a clock.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Iterable

import numpy as np

__all__ = ["Counters", "LatencyTracker", "RateMeter"]


class Counters(dict[str, int]):
    """Named integer counters; a missing name reads as 0 through :meth:`get`."""

    def inc(self, name: str, n: int = 1) -> int:
        """Add ``n`` to ``name`` and return the new value."""
        value = self.get(name, 0) + n
        self[name] = value
        return value

    def snapshot(self) -> dict[str, int]:
        """A plain copy, safe to hand to another thread or serialise."""
        return dict(self)


class LatencyTracker:
    """The most recent ``capacity`` latencies (seconds) and their percentiles."""

    def __init__(self, capacity: int = 4096) -> None:
        if capacity <= 0:
            raise ValueError(f"latency tracker capacity must be > 0, got {capacity}")
        self._values = np.zeros(int(capacity), dtype=np.float64)
        self._next = 0
        self.count = 0  # total recorded since creation (finite values only)
        self.rejected = 0  # non-finite or negative values refused

    @property
    def capacity(self) -> int:
        return int(self._values.size)

    @property
    def size(self) -> int:
        """Values held now (at most ``capacity``)."""
        return min(self.count, self.capacity)

    def record(self, latency_s: float) -> None:
        """Add one latency; NaN, inf or negative values are counted in ``rejected`` instead."""
        value = float(latency_s)
        if not math.isfinite(value) or value < 0:
            self.rejected += 1
            return
        self._values[self._next] = value
        self._next = (self._next + 1) % self.capacity
        self.count += 1

    def percentiles(self, ps: Iterable[float] = (50, 95, 99)) -> dict[float, float | None]:
        """Map each requested percentile (0..100) to its latency; None while nothing is recorded."""
        points = list(ps)
        for p in points:
            if not 0 <= p <= 100:
                raise ValueError(f"percentile must be within 0..100, got {p}")
        if self.size == 0:
            return {p: None for p in points}
        values = np.percentile(self._values[: self.size], points)
        return {p: float(v) for p, v in zip(points, values)}


class RateMeter:
    """Events per second over a sliding window of ``window_s`` seconds.

    Events are summed in buckets of ``window_s / buckets`` seconds, so memory
    stays bounded at any event rate. Until a full window has passed since
    ``start`` (or the first event), the rate is taken over the time elapsed.
    """

    def __init__(self, window_s: float = 10.0, buckets: int = 20, start: float | None = None) -> None:
        if not window_s > 0 or buckets <= 0:
            raise ValueError(f"rate meter needs window_s > 0 and buckets > 0, got {window_s}, {buckets}")
        self.window_s = float(window_s)
        self._bucket_s = self.window_s / buckets
        self._buckets: deque[list[float]] = deque()  # [bucket number, events]
        self._in_window = 0.0
        self._start = start
        self.total = 0.0

    def record(self, now: float, n: float = 1) -> None:
        """Count ``n`` events at time ``now``."""
        if self._start is None:
            self._start = now
        bucket = math.floor(now / self._bucket_s)
        if self._buckets and self._buckets[-1][0] >= bucket:
            # Same bucket, or time went backwards: fold into the newest bucket.
            self._buckets[-1][1] += n
        else:
            self._buckets.append([bucket, n])
        self._in_window += n
        self.total += n
        self._expire(now)

    def rate(self, now: float) -> float:
        """Events per second over the last window (or since the start, when shorter)."""
        self._expire(now)
        if self._start is None:
            return 0.0
        span = min(self.window_s, now - self._start)
        if span <= 0:
            return 0.0
        return self._in_window / span

    def _expire(self, now: float) -> None:
        oldest = math.floor((now - self.window_s) / self._bucket_s)
        while self._buckets and self._buckets[0][0] < oldest:
            self._in_window -= self._buckets.popleft()[1]
