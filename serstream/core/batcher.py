"""Forms padded inference batches from the windows of all streams.

A batch closes when it is full (``max_batch`` rows), when one more row would
push its padded size (rows x longest row) past ``max_batch_samples``, or when
its oldest request has waited its deadline. Finals wait at most
``final_wait_s`` (end-of-speech latency is what users notice), partials
``partial_wait_s``.

Rows are taken finals first, then partials, each oldest first. The first
of them (the *head*) is always taken, so no row is starved: every row becomes
a head in time (a row larger than the budget on its own makes a batch of
one). The selection stops at the first row that does not fit the sample
budget, and skips the rows whose length would leave more than
``max_padding`` of the batch's padded samples as padding: an 8 s final
padded together with 3 s partials made the model compute almost twice the
audio it was given, on a CPU where inference is most of the cost.

The queue is bounded by ``max_pending``, and only the newest partial of a
stream matters: a new partial replaces that stream's pending partial, and a
final replaces it too (it covers the same speech). When still full, the
oldest pending partial is dropped; a final is dropped only when the queue
holds nothing but finals. Every one of these is counted in ``counters``, and
every request the former gives up on comes back to the caller exactly once:
stale partials from :meth:`BatchFormer.expire`, the superseded, evicted and
refused ones from :meth:`BatchFormer.drain_dropped`. So a caller waiting on
its requests (a closing stream) never waits on one that is gone.

Two ways to drive it: *push* (``add`` returns the batches it makes ready,
``poll`` at ``next_deadline``), or *pull* (``add(..., close=False)`` only
queues, and an idle worker takes ``poll(now, max_batches=1)``), in which case
the supersede and drop rules are the back-pressure.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from serstream.contract import SAMPLE_RATE
from serstream.core.scheduler import KIND_FINAL, KIND_PARTIAL, Window
from serstream.core.stats import Counters

__all__ = ["Request", "Batch", "BatcherConfig", "BatchFormer"]


@dataclass
class Request:
    """One window of one stream waiting for inference; ``context`` is the caller's own data."""

    stream: str
    window: Window
    submitted: float
    context: object = None


@dataclass
class Batch:
    """Closed batch: ``audio`` float32 ``[B, N]`` zero-padded, ``lengths`` int64 ``[B]``.

    ``reason`` says why it closed: ``"full"``, ``"samples"``, ``"deadline"`` or ``"flush"``.
    """

    requests: list[Request]
    audio: np.ndarray = field(repr=False, compare=False)
    lengths: np.ndarray = field(compare=False)
    closed: float = 0.0
    reason: str = ""

    @property
    def size(self) -> int:
        return len(self.requests)

    @property
    def padding(self) -> int:
        """Padded samples in ``audio`` (wasted work)."""
        return int(self.audio.size - int(self.lengths.sum()))


@dataclass(frozen=True)
class BatcherConfig:
    """Batching limits; ``max_batch_samples`` None means ``max_batch`` x 3 s at 16 kHz."""

    max_batch: int = 32
    final_wait_s: float = 0.002
    partial_wait_s: float = 0.020
    max_pending: int = 4096
    max_batch_samples: int | None = None
    #: Largest share of a batch's padded samples that may be padding (1.0: any mix of lengths).
    max_padding: float = 0.3

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.final_wait_s < 0 or self.partial_wait_s < 0:
            raise ValueError("batch wait times must be >= 0")
        if self.max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {self.max_pending}")
        if self.max_batch_samples is not None and self.max_batch_samples < 1:
            raise ValueError(f"max_batch_samples must be >= 1, got {self.max_batch_samples}")
        if not 0.0 <= self.max_padding <= 1.0:
            raise ValueError(f"max_padding must be within 0..1, got {self.max_padding}")

    @property
    def batch_samples(self) -> int:
        if self.max_batch_samples is not None:
            return self.max_batch_samples
        return self.max_batch * 3 * SAMPLE_RATE


@dataclass
class _Entry:
    request: Request
    deadline: float
    length: int


class BatchFormer:
    """The batch former shared by all streams. Not thread-safe: one thread drives it."""

    def __init__(
        self,
        max_batch: int = 32,
        max_pending: int = 4096,
        *,
        final_wait_s: float = 0.002,
        partial_wait_s: float = 0.020,
        max_batch_samples: int | None = None,
        partial_max_age_s: float | None = None,
        max_padding: float = 0.3,
    ) -> None:
        if partial_max_age_s is not None and not partial_max_age_s > 0:
            raise ValueError(f"partial_max_age_s must be > 0 or None, got {partial_max_age_s}")
        #: A partial still waiting this long after it was submitted is stale: :meth:`expire` drops it.
        self.partial_max_age_s = partial_max_age_s
        self.config = BatcherConfig(
            max_batch=max_batch,
            final_wait_s=final_wait_s,
            partial_wait_s=partial_wait_s,
            max_pending=max_pending,
            max_batch_samples=max_batch_samples,
            max_padding=max_padding,
        )
        self._budget = self.config.batch_samples
        self._seq = 0
        self._finals: OrderedDict[int, _Entry] = OrderedDict()
        self._partials: OrderedDict[int, _Entry] = OrderedDict()
        self._partial_of_stream: dict[str, int] = {}
        # Requests given up on by `add` (superseded, evicted, refused) until `drain_dropped`.
        self._dropped: list[Request] = []
        self.counters = Counters(
            requests=0,
            batches=0,
            rows=0,
            partials_superseded=0,
            partials_dropped=0,
            partials_expired=0,
            finals_dropped=0,
            closed_full=0,
            closed_samples=0,
            closed_deadline=0,
            closed_flush=0,
        )

    @property
    def pending(self) -> int:
        """Requests waiting now."""
        return len(self._finals) + len(self._partials)

    def add(self, request: Request, now: float, close: bool = True) -> list[Batch]:
        """Queue a request; with ``close`` return the batches that are ready at ``now``."""
        window = request.window
        if window.kind not in (KIND_FINAL, KIND_PARTIAL):
            raise ValueError(f"window kind must be 'partial' or 'final', got {window.kind!r}")
        audio = np.asarray(window.audio)
        if audio.ndim != 1 or audio.size == 0:
            raise ValueError(f"window audio must be a non-empty 1-D array, got shape {audio.shape}")
        self.counters.inc("requests")
        final = window.kind == KIND_FINAL
        old = self._partial_of_stream.pop(request.stream, None)
        if old is not None:
            # Either a newer partial or the final of that speech: the pending partial is stale.
            self._dropped.append(self._partials.pop(old).request)
            self.counters.inc("partials_superseded")
        if self.pending >= self.config.max_pending:
            if self._partials:
                self._drop_oldest_partial()
            elif final:
                self.counters.inc("finals_dropped")
                self._dropped.append(request)
                return self.poll(now) if close else []
            else:
                self.counters.inc("partials_dropped")
                self._dropped.append(request)
                return self.poll(now) if close else []
        seq = self._seq
        self._seq += 1
        if final:
            self._finals[seq] = _Entry(request, now + self.config.final_wait_s, audio.size)
        else:
            self._partials[seq] = _Entry(request, now + self.config.partial_wait_s, audio.size)
            self._partial_of_stream[request.stream] = seq
        return self.poll(now) if close else []

    def poll(self, now: float, max_batches: int | None = None) -> list[Batch]:
        """Close the batches that are ready at ``now`` (full, over budget or past a deadline)."""
        batches: list[Batch] = []
        while self.pending and (max_batches is None or len(batches) < max_batches):
            keys, padded_len, fits_all = self._select()
            if len(keys) >= self.config.max_batch:
                reason = "full"
            elif not fits_all:
                reason = "samples"
            elif (deadline := self.next_deadline()) is not None and deadline <= now:
                reason = "deadline"
            else:
                break
            batches.append(self._close(keys, padded_len, now, reason))
        return batches

    def flush(self, now: float) -> list[Batch]:
        """Close everything pending regardless of deadlines (shutdown)."""
        batches: list[Batch] = []
        while self.pending:
            keys, padded_len, _ = self._select()
            batches.append(self._close(keys, padded_len, now, "flush"))
        return batches

    def next_deadline(self) -> float | None:
        """Earliest deadline among pending requests, or None when nothing waits."""
        # Deadlines grow with insertion within each kind, so the oldest of each is the earliest.
        heads = [queue[next(iter(queue))].deadline for queue in (self._finals, self._partials) if queue]
        return min(heads) if heads else None

    def drain_dropped(self) -> list[Request]:
        """The requests :meth:`add` gave up on since the last call (superseded, evicted, refused).

        Each comes back once; the caller that waits on its requests must drain
        after every ``add`` (the list grows until it does).
        """
        dropped, self._dropped = self._dropped, []
        return dropped

    def expire(self, now: float) -> list[Request]:
        """Drop (and return) the partials waiting longer than ``partial_max_age_s``, counted.

        Under overload every speaking stream keeps one partial waiting, and they
        are served oldest first, so without a limit a partial's latency grows
        with the number of streams. A stale partial is worth little: its stream's
        next partial (or its final) says the same, fresher. Finals never expire.
        """
        if self.partial_max_age_s is None:
            return []
        expired: list[Request] = []
        limit = now - self.partial_max_age_s
        while self._partials:
            seq = next(iter(self._partials))
            entry = self._partials[seq]
            if entry.request.submitted > limit:
                break  # insertion order: the rest are younger
            del self._partials[seq]
            if self._partial_of_stream.get(entry.request.stream) == seq:
                del self._partial_of_stream[entry.request.stream]
            expired.append(entry.request)
        if expired:
            self.counters.inc("partials_expired", len(expired))
        return expired

    # -- internals -------------------------------------------------------------------------

    def _drop_oldest_partial(self) -> None:
        seq, entry = self._partials.popitem(last=False)
        if self._partial_of_stream.get(entry.request.stream) == seq:
            del self._partial_of_stream[entry.request.stream]
        self._dropped.append(entry.request)
        self.counters.inc("partials_dropped")

    def _select(self) -> tuple[list[tuple[bool, int]], int, bool]:
        """Rows for the next batch: ``([(is_final, seq)], longest, can_grow)``.

        ``can_grow`` is False when the batch is full or the sample budget stopped it;
        rows skipped for their padding do not stop it (they wait to head a batch of their own).
        """
        keys: list[tuple[bool, int]] = []
        longest = useful = 0
        usable = 1.0 - self.config.max_padding
        for final, queue in ((True, self._finals), (False, self._partials)):
            for seq, entry in queue.items():
                if len(keys) >= self.config.max_batch:
                    return keys, longest, False
                grown = max(longest, entry.length)
                padded = grown * (len(keys) + 1)
                if keys and padded > self._budget:
                    return keys, longest, False
                if keys and useful + entry.length < usable * padded:
                    continue  # too long or too short for this batch: a later one takes it
                keys.append((final, seq))
                longest = grown
                useful += entry.length
        return keys, longest, True

    def _close(self, keys: list[tuple[bool, int]], longest: int, now: float, reason: str) -> Batch:
        audio = np.zeros((len(keys), longest), dtype=np.float32)
        lengths = np.zeros(len(keys), dtype=np.int64)
        requests: list[Request] = []
        for row, (final, seq) in enumerate(keys):
            if final:
                entry = self._finals.pop(seq)
            else:
                entry = self._partials.pop(seq)
                self._partial_of_stream.pop(entry.request.stream, None)
            audio[row, : entry.length] = entry.request.window.audio
            lengths[row] = entry.length
            requests.append(entry.request)
        self.counters.inc("batches")
        self.counters.inc("rows", len(keys))
        self.counters.inc(f"closed_{reason}")
        return Batch(requests=requests, audio=audio, lengths=lengths, closed=now, reason=reason)
