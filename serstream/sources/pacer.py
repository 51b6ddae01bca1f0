"""One thread paces every real-time file replay in the process.

Why: a thread per file (each reading a 20 ms block through libsndfile's CFFI
and sleeping until it is due) made 100 replayed files 100 threads fighting
for the GIL, and the monitor's pipeline thread starved (``serstream bench``
topped out at 50 file streams where the RTP benchmark, one socket thread for
every stream, reached 100). Here one daemon thread keeps a heap of due times
and, at each, lets that source push its next block and tell when the one
after is due.

The pacer is per process (:func:`shared_pacer`), not per ``Monitor``: the
contention it removes is the process's GIL, whatever monitor (or
``WorkerPool``) the files feed, and a source needs nothing from its monitor
to be paced. It starts on the first source and its thread ends when the last
one leaves (a later source starts a new one), so an idle process has no
pacer thread at all.

The module has a pure part, testable with a made-up clock:

* :func:`block_due`: when a block is due (a microphone delivers a block once
  it has been captured: at its end time on the source's own clock, so the
  schedule never drifts, however late one wake-up was);
* :class:`DueSchedule`: which source is due next (heap of due times, ties in
  the order they were queued; sources leave at any time, even while stepped);
* :class:`ReadAhead`: file pieces in (0.5 s), blocks out, cut from memory so a
  block costs no decoder call; the blocks are exactly those of reading the
  file one block at a time (a block never spans the end of the file);

and the thread part, :class:`Pacer`, which only waits, pops and requeues.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from typing import Callable, Generic, Hashable, Protocol, TypeVar

import numpy as np

__all__ = ["DueSchedule", "Paced", "Pacer", "ReadAhead", "block_due", "read_ahead_frames", "shared_pacer"]

log = logging.getLogger(__name__)

#: How much of a file one read takes in real-time replay (then cut into blocks in memory).
READ_AHEAD_S = 0.5

#: The pacer wakes at most once per this many seconds: blocks due within it go out together, at most this late.
MIN_WAKE_INTERVAL_S = 0.001

K = TypeVar("K", bound=Hashable)


def block_due(started: float, frames_before: int, block_frames: int, sample_rate: int) -> float:
    """When a block is captured: the source's start plus the audio up to the block's end (no drift)."""
    return started + (frames_before + block_frames) / sample_rate


def read_ahead_frames(chunk: int, sample_rate: int, seconds: float = READ_AHEAD_S) -> int:
    """The read size: a whole number of blocks (at least one), about ``seconds`` long."""
    blocks = max(1, int(round(seconds * sample_rate / chunk)))
    return blocks * chunk


class DueSchedule(Generic[K]):
    """Which key is due next. Pure: the caller passes the time in; not thread-safe (the pacer locks it).

    A key is *registered* from :meth:`add` until :meth:`discard`; while
    registered it is either queued (with a due time) or popped (being
    stepped), and :meth:`requeue` puts a popped key back only if it is still
    registered, so a source that leaves while it is being stepped is never
    queued again. Heap entries of a key that left are skipped when popped.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, K]] = []
        self._queued: dict[K, int] = {}  # key -> the sequence number of its live heap entry
        self._registered: set[K] = set()
        self._seq = itertools.count()

    def __len__(self) -> int:
        """Registered keys (queued or being stepped)."""
        return len(self._registered)

    def __contains__(self, key: object) -> bool:
        return key in self._registered

    def add(self, key: K, due: float) -> None:
        """Register ``key``, due at ``due`` (a key already registered is moved to ``due``)."""
        self._registered.add(key)
        self._push(key, due)

    def requeue(self, key: K, due: float) -> bool:
        """Queue a popped key again at ``due``; False (and nothing queued) when it has left meanwhile."""
        if key not in self._registered:
            return False
        self._push(key, due)
        return True

    def discard(self, key: K) -> None:
        """``key`` leaves (its heap entry, if any, is skipped later)."""
        self._registered.discard(key)
        self._queued.pop(key, None)

    def next_due(self) -> float | None:
        """The earliest due time of a queued key, or None when none is queued."""
        self._drop_stale()
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float) -> list[tuple[K, float]]:
        """Every queued key due at or before ``now``, earliest first, with its due time; they stay registered."""
        out: list[tuple[K, float]] = []
        while True:
            self._drop_stale()
            if not self._heap or self._heap[0][0] > now:
                return out
            due, _, key = heapq.heappop(self._heap)
            del self._queued[key]
            out.append((key, due))

    def wake_time(self, last_wake: float, min_interval: float = MIN_WAKE_INTERVAL_S) -> float | None:
        """When to wake next: the next due time, but not sooner than ``min_interval`` after the last wake-up."""
        due = self.next_due()
        return None if due is None else max(due, last_wake + min_interval)

    def _push(self, key: K, due: float) -> None:
        seq = next(self._seq)
        self._queued[key] = seq
        heapq.heappush(self._heap, (due, seq, key))

    def _drop_stale(self) -> None:
        while self._heap and self._queued.get(self._heap[0][2]) != self._heap[0][1]:
            heapq.heappop(self._heap)


class ReadAhead:
    """Blocks cut from larger file pieces, the same blocks a block-by-block read would give. Pure.

    The caller feeds what each read returned (:meth:`feed`) and says when a
    read returned nothing (:meth:`end`); :meth:`take` gives the next block:
    ``chunk`` frames, or fewer only as the last block of the file, an empty
    block at the end, and None when more must be read first. The blocks are
    views of the pieces (``StreamHandle.push`` copies).
    """

    def __init__(self, chunk: int, channels: int) -> None:
        if chunk < 1 or channels < 1:
            raise ValueError(f"need a block of at least one frame and one channel, got {chunk}, {channels}")
        self.chunk = chunk
        self.channels = channels
        self._pieces: list[np.ndarray] = []
        self._offset = 0  # frames of _pieces[0] already taken
        self._available = 0
        self.ended = False

    @property
    def available(self) -> int:
        """Frames read from the file and not yet taken."""
        return self._available

    def feed(self, piece: np.ndarray) -> None:
        """Frames ``[n, channels]`` just read from the file (n > 0)."""
        if piece.ndim != 2 or piece.shape[1] != self.channels:
            raise ValueError(f"expected [frames, {self.channels}] samples, got shape {piece.shape}")
        if self.ended:
            raise ValueError("audio fed after the end of the file")
        if piece.shape[0]:
            self._pieces.append(piece)
            self._available += piece.shape[0]

    def end(self) -> None:
        """The file has no more frames (a read returned none, or failed)."""
        self.ended = True

    def restart(self) -> None:
        """The file was rewound (``--loop``): nothing is held and it has not ended."""
        self._pieces, self._offset, self._available, self.ended = [], 0, 0, False

    def take(self) -> np.ndarray | None:
        """The next block; empty at the end of the file; None when the file must be read first."""
        if self._available < self.chunk and not self.ended:
            return None
        n = min(self.chunk, self._available)
        if n == 0:
            return np.zeros((0, self.channels), np.float32)
        head = self._pieces[0]
        if head.shape[0] - self._offset >= n:  # the usual case: inside one piece, a view
            block = head[self._offset:self._offset + n]
            self._offset += n
        else:
            parts: list[np.ndarray] = []
            need = n
            while need:
                head = self._pieces[0]
                part = head[self._offset:self._offset + need]
                parts.append(part)
                need -= part.shape[0]
                self._offset += part.shape[0]
                if self._offset == head.shape[0]:
                    self._pieces.pop(0)
                    self._offset = 0
            block = np.concatenate(parts)
        if self._pieces and self._offset == self._pieces[0].shape[0]:
            self._pieces.pop(0)
            self._offset = 0
        self._available -= n
        return block


# ---------------------------------------------------------------- the thread


class Paced(Hashable, Protocol):
    """A source the pacer drives (hashable by identity: the schedule's key)."""

    def pace(self, now: float) -> float | None:
        """Do what is due at ``now`` (push a block); the next due time, or None when this source is done.

        Called on the pacer thread; must not block on anything slow and must
        handle its own errors (an exception drops the source, counted).
        """
        ...


class Pacer:
    """The thread that calls each :class:`Paced` source at its due times, from one :class:`DueSchedule`.

    The schedule's lock is never held while a source is stepped, so a
    source's own lock may be taken by :meth:`remove`'s caller first.
    """

    def __init__(self, name: str = "file-pacer", clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.clock = clock
        self._schedule: DueSchedule[Paced] = DueSchedule()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self.wakeups = 0  # times the thread woke to step at least one source
        self.steps = 0
        self.step_errors = 0  # sources dropped because pace() raised (a bug: they handle their own errors)

    def add(self, source: Paced, due: float) -> None:
        """Start pacing ``source``: its first :meth:`Paced.pace` call at ``due`` (the pacer's clock)."""
        with self._cond:
            self._schedule.add(source, due)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
            self._cond.notify()

    def remove(self, source: Paced) -> None:
        """Stop pacing ``source``; if it is being stepped now, that step is its last."""
        with self._cond:
            self._schedule.discard(source)
            self._cond.notify()

    def __len__(self) -> int:
        with self._cond:
            return len(self._schedule)

    @property
    def running(self) -> bool:
        """Whether the pacer has a thread now (it has none while no source is paced)."""
        with self._cond:
            return self._thread is not None

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {"sources": len(self._schedule), "wakeups": self.wakeups, "steps": self.steps,
                    "step_errors": self.step_errors}

    def _run(self) -> None:
        last_wake = float("-inf")
        while True:
            with self._cond:
                while True:
                    if not self._schedule:
                        self._thread = None  # the next add() starts a new thread
                        return
                    wake = self._schedule.wake_time(last_wake)
                    now = self.clock()
                    if wake is not None and wake <= now:
                        break
                    # Nothing queued (every source being stepped elsewhere cannot happen: one thread) or not yet due.
                    self._cond.wait(None if wake is None else wake - now)
                due = self._schedule.pop_due(now)
                self.wakeups += 1
            last_wake = now
            results: list[tuple[Paced, float | None]] = []
            for source, _ in due:
                try:
                    results.append((source, source.pace(self.clock())))
                except Exception:  # noqa: BLE001 - one source's bug must not stop the others' replay
                    log.exception("file pacer: a source failed and is no longer paced")
                    results.append((source, None))
                    with self._cond:
                        self.step_errors += 1
            with self._cond:
                self.steps += len(results)
                for source, next_due in results:
                    if next_due is None:
                        self._schedule.discard(source)
                    else:
                        self._schedule.requeue(source, next_due)


_shared: Pacer | None = None
_shared_lock = threading.Lock()


def shared_pacer() -> Pacer:
    """The process's pacer for real-time file replay (created on first use; its thread only while needed)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = Pacer()
        return _shared
