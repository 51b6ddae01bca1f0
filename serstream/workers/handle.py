"""The stream handle of a ``--workers`` pool: what a source holds, the ``StreamHandle`` members.

The audio goes to the stream's worker process through the pool; flow control
counts what was queued minus what the worker reports its ring no longer holds.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from serstream.errors import one_line
from serstream.monitor import _mono_view

if TYPE_CHECKING:
    from serstream.workers.pool import WorkerPool

__all__ = ["PooledHandle"]


class PooledHandle:
    """What a source holds for a stream of a :class:`WorkerPool`; the same members as ``StreamHandle``."""

    def __init__(self, pool: WorkerPool, stream_id: str, sample_rate: int, capacity: int) -> None:
        self._pool = pool
        self._id = stream_id
        self._rate = sample_rate
        self._capacity = capacity
        self._closed = False
        # Flow control: samples queued for the worker minus samples its ring no longer holds.
        self.pushed = 0
        self.gone = 0
        self.dropped_noted = False

    @property
    def stream_id(self) -> str:
        return self._id

    @property
    def sample_rate(self) -> int:
        return self._rate

    @property
    def closed(self) -> bool:
        """True once ``close`` was called or the pool ended the stream (failure, worker lost for good, stop)."""
        return self._closed

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def free_space(self) -> int:
        """Native-rate samples the stream's ring (in its worker) can take, counting those still on the way."""
        return max(0, self._capacity - (self.pushed - self.gone))

    def push(self, block: np.ndarray) -> None:
        """Queue one block for the stream's worker; never blocks (a dead or swamped worker: dropped, counted)."""
        if self._closed:
            return
        arrived = time.monotonic()
        try:
            mono = np.array(_mono_view(block), dtype=np.float32, copy=True)
        except (ValueError, TypeError) as exc:
            self._pool._control(self._id, ("fail", self._id, f"unusable audio block: {one_line(exc, limit=None)}",
                                           "bad_samples"))
            return
        self._pool._audio(self, mono, arrived)

    def note_overflow(self, count: int = 1) -> None:
        """The source lost audio before it reached us (e.g. a PortAudio input overflow)."""
        self._pool._control(self._id, ("overflow", self._id, int(count)))

    def fail(self, message: str, code: str = "source_error") -> None:
        """Report a source failure on this stream (an ``error`` event with ``code``); it is closed."""
        self._pool._control(self._id, ("fail", self._id, str(message), str(code)))

    def wait_for_space(self, samples: int, timeout: float | None = None) -> bool:
        """Block until ``samples`` fit without overwriting (replay at full speed)."""
        needed = min(int(samples), self._capacity)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self.free_space >= needed:
                return True
            if self._closed:
                return False
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.005)

    def close(self, reason: str | None = None) -> None:
        """End the stream: its worker processes the remaining audio and sends its last estimates."""
        if self._closed:
            return
        self._closed = True
        self._pool._control(self._id, ("close", self._id, reason))
