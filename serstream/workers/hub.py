"""The inference tier of a ``--workers`` pool: every worker's batches, one model call.

One thread in the main process. Workers send their batches (audio, lengths
and the speaker-state rows each window was released with, so the tier keeps
no state); the tier takes the batches waiting, in order, up to
:data:`HUB_MAX_ROWS` windows and while at most :data:`HUB_MAX_PADDING` of the
call is padding, runs them as one padded call of the model and answers each
worker with its own rows. A failing merged call is run again one worker batch
at a time, so one worker's bad window does not cost the others their rows.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

from serstream.core.stats import LatencyTracker, RateMeter
from serstream.errors import one_line
from serstream.inference.worker import InferenceBackend
from serstream.workers.merge import Part, merge_requests, padding_share, split_output

__all__ = ["HubEntry", "InferenceHub", "HUB_MAX_ROWS"]

#: Most windows in one model call (several workers' batches together).
HUB_MAX_ROWS = 64
#: A worker's batch joins the call only while at most this share of the call is padding.
HUB_MAX_PADDING = 0.3


@dataclass
class HubEntry:
    """One worker's batch and how to answer it (``reply(output, None)`` or ``reply(None, message)``)."""

    reply: Callable[[Any, str | None], None]
    part: Part


class InferenceHub:
    """The inference tier: one thread, every worker's batches merged into one model call."""

    def __init__(self, backend: InferenceBackend, with_state: bool) -> None:
        self.backend = backend
        self.with_state = with_state
        self.queue: deque[HubEntry] = deque()
        self.cond = threading.Condition()
        self.stopping = False
        self.busy = False
        self.thread = threading.Thread(target=self._run, name="serstream-inference-hub", daemon=True)
        self.batches = 0
        self.windows = 0
        self.failures = 0
        self.sizes: deque[int] = deque(maxlen=1024)
        self.infer_latency = LatencyTracker(2048)
        self.rate = RateMeter(window_s=10.0)
        self.stats_lock = threading.Lock()

    def submit(self, entry: HubEntry) -> None:
        with self.cond:
            self.queue.append(entry)
            self.cond.notify()

    @property
    def idle(self) -> bool:
        with self.cond:
            return not self.queue and not self.busy

    @property
    def pending(self) -> int:
        with self.cond:
            return sum(e.part.rows for e in self.queue)

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        if self.thread.is_alive():
            self.thread.join(5.0)

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.queue and not self.stopping:
                    self.cond.wait()
                if not self.queue:
                    return
                taken: list[HubEntry] = [self.queue.popleft()]
                rows = taken[0].part.rows
                while (
                    self.queue
                    and rows + self.queue[0].part.rows <= HUB_MAX_ROWS
                    and padding_share([e.part for e in taken] + [self.queue[0].part]) <= HUB_MAX_PADDING
                ):
                    entry = self.queue.popleft()
                    taken.append(entry)
                    rows += entry.part.rows
                self.busy = True
            try:
                self._run_entries(taken)
            finally:
                with self.cond:
                    self.busy = False

    def _infer(self, entries: list[HubEntry]) -> list[Any]:
        audio, lengths, state = merge_requests([e.part for e in entries])
        started = time.perf_counter()
        output = self.backend.infer(audio, lengths, state if self.with_state else None)
        elapsed = time.perf_counter() - started
        with self.stats_lock:
            self.batches += 1
            self.windows += int(lengths.shape[0])
            self.sizes.append(int(lengths.shape[0]))
            self.infer_latency.record(elapsed)
            self.rate.record(time.monotonic(), int(lengths.shape[0]))
        return split_output(output, [e.part.rows for e in entries])

    def _run_entries(self, entries: list[HubEntry]) -> None:
        try:
            outputs = self._infer(entries)
        except Exception as exc:  # noqa: BLE001 - a failing call must not end the tier
            if len(entries) > 1:
                # Whose window broke it is unknown: each worker's batch alone, so the others still get rows.
                for entry in entries:
                    self._run_entries([entry])
                return
            with self.stats_lock:
                self.failures += 1
            message = one_line(exc, limit=None) or type(exc).__name__
            entries[0].reply(None, message)
            return
        for entry, output in zip(entries, outputs):
            entry.reply(output, None)
