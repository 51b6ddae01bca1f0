"""The bus's bounded event history and the resume plan of a reconnecting client (pure logic).

Every event the bus publishes gets a bus-wide number ``id`` (1, 2, 3, ...).
:class:`EventHistory` keeps the recent ones as ``(id, time, stream,
payload)`` entries, bounded by age (``max_age_s``) and by a hard count
(``max_events``), so a client that lost its connection can ask for what came
after the last number it saw. :meth:`EventHistory.resume` answers with a
:class:`ResumePlan`: the entries it missed (filtered like its live feed) and,
when some of them have already left the history, how many were lost.

Nothing here reads a clock, opens a socket or starts a thread: the caller
passes ``now`` (any monotonic seconds) and decides what to do with the plan.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

__all__ = [
    "DEFAULT_HISTORY_MAX",
    "DEFAULT_HISTORY_S",
    "MAX_SINCE_DIGITS",
    "EventHistory",
    "HistoryEntry",
    "ResumePlan",
    "parse_since",
    "run_first_id",
]

#: Defaults of the server's history (``--history-s``) and its hard count cap.
DEFAULT_HISTORY_S = 60.0
DEFAULT_HISTORY_MAX = 50_000

#: ``since`` values longer than this are refused (no bus issues 10**18 events).
MAX_SINCE_DIGITS = 18

#: ``wants(stream, broadcast)``: does a subscription's filter take this event?
#: (``broadcast`` events, e.g. ``stats``, reach every subscription.)
StreamFilter = Callable[[str, bool], bool]


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One published event: its bus number, when it was published, its stream, its JSON bytes.

    ``broadcast``: the event goes to every subscription whatever its stream
    filter (``stats`` events).
    """

    id: int
    time: float
    stream: str
    payload: bytes
    broadcast: bool = False


@dataclass(frozen=True, slots=True)
class ResumePlan:
    """What a client that last saw ``since`` gets before the live feed.

    ``lost`` counts the bus events after ``since`` that have left the history
    (events of every stream: for a client that filters by stream it is an
    upper bound of what it lost). ``resume_from`` is the first number the
    history still holds (the number the client resumes at when ``lost`` > 0).
    ``reason`` is ``None`` when nothing was lost, ``"history"`` when events
    left the history, ``"restart"`` when ``since`` is below this run's first
    number (the client saw an earlier run of the server), ``"future"`` when it
    is beyond the last number issued (a wrong number, or a clock stepped
    back); for both every held entry is replayed and ``lost`` counts this
    run's events that are no longer held.
    """

    since: int
    entries: tuple[HistoryEntry, ...]
    lost: int
    resume_from: int
    reason: str | None = None

    @property
    def gap(self) -> bool:
        return self.reason is not None


@dataclass(slots=True)
class EventHistory:
    """A ring of recent :class:`HistoryEntry`, bounded by age and by count.

    ``max_age_s`` = 0 keeps no history (a reconnecting client gets a gap for
    everything it missed). Numbers are assigned here (:meth:`next_id`), so the
    ring and the numbering cannot disagree.
    """

    max_age_s: float = DEFAULT_HISTORY_S
    max_events: int = DEFAULT_HISTORY_MAX
    #: The number of this run's first event (see :func:`run_first_id`).
    first_id: int = 1
    _entries: deque[HistoryEntry] = field(default_factory=deque, init=False, repr=False)
    _last_id: int = field(default=0, init=False)
    #: Entries evicted so far (by age or by count).
    evicted: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if not self.max_age_s >= 0:
            raise ValueError(f"history age must be >= 0 seconds, got {self.max_age_s}")
        if self.max_events < 0:
            raise ValueError(f"history count cap must be >= 0, got {self.max_events}")
        if self.first_id < 1:
            raise ValueError(f"the first id must be >= 1, got {self.first_id}")
        self._last_id = self.first_id - 1

    # ------------------------------------------------------------ writing

    @property
    def last_id(self) -> int:
        """The last number issued (0 before the first event)."""
        return self._last_id

    @property
    def oldest_id(self) -> int:
        """The oldest number still held; ``last_id + 1`` when the ring is empty."""
        return self._entries[0].id if self._entries else self._last_id + 1

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[HistoryEntry]:
        return iter(self._entries)

    def next_id(self) -> int:
        """Issue the next number (the caller then :meth:`append`\\ s the event under it)."""
        self._last_id += 1
        return self._last_id

    def append(self, entry: HistoryEntry, now: float | None = None) -> None:
        """Keep ``entry`` (numbers must increase), then evict what is too old or too many."""
        if self._entries and entry.id <= self._entries[-1].id:
            raise ValueError(f"history ids must increase: {entry.id} after {self._entries[-1].id}")
        self._last_id = max(self._last_id, entry.id)
        if self.max_events > 0 and self.max_age_s > 0:
            self._entries.append(entry)
        self.evict(entry.time if now is None else now)

    def evict(self, now: float) -> int:
        """Drop entries older than ``max_age_s`` at ``now`` and those beyond the count cap."""
        removed = 0
        entries = self._entries
        while len(entries) > self.max_events:
            entries.popleft()
            removed += 1
        horizon = now - self.max_age_s
        while entries and entries[0].time < horizon:
            entries.popleft()
            removed += 1
        self.evicted += removed
        return removed

    # ------------------------------------------------------------ reading

    def resume(self, since: int, wants: StreamFilter | None = None, now: float | None = None) -> ResumePlan:
        """The plan for a client whose last seen number is ``since`` (0: it saw none of this run).

        Entries after ``since`` that ``wants`` accepts, oldest first; ``lost``
        and ``reason`` as in :class:`ResumePlan`. With ``now`` the ring is
        evicted first, so nothing older than the window is replayed.
        """
        if since < 0:
            raise ValueError(f"since must be >= 0, got {since}")
        if now is not None:
            self.evict(now)
        if since == 0:  # "nothing seen yet": from the start of this run
            since = self.first_id - 1
        oldest = self.oldest_id
        if since > self._last_id or since < self.first_id - 1:
            reason = "future" if since > self._last_id else "restart"
            return ResumePlan(since, self._select(0, wants), oldest - self.first_id, oldest, reason)
        lost = max(0, oldest - since - 1)
        return ResumePlan(since, self._select(since, wants), lost, oldest, "history" if lost else None)

    def _select(self, since: int, wants: StreamFilter | None) -> tuple[HistoryEntry, ...]:
        entries = self._entries
        if not entries or entries[-1].id <= since:
            return ()
        # A reconnect is rare and the ring is bounded: one linear pass (deque
        # indexing is not O(1) in the middle, so no bisection).
        return tuple(e for e in entries if e.id > since and (wants is None or wants(e.stream, e.broadcast)))


def run_first_id(unix_seconds: float) -> int:
    """The first id of a server run started at ``unix_seconds``: ``int(seconds) * 10**6 + 1``.

    A later run starts above every id of an earlier one (unless that run made
    more than a million events per second of its life), so a client that
    reconnects across a restart is recognised (``restart``) instead of being
    taken for one that saw part of the new run. The ids stay below 2**53,
    exact in JavaScript numbers, until the year 2255.
    """
    return int(unix_seconds) * 1_000_000 + 1


def parse_since(text: str) -> int:
    """The ``since`` query value as a number >= 0; ``ValueError`` (one line) for anything else."""
    value = text.strip()
    if not value:
        raise ValueError("since is empty; give the last event id you received (an integer >= 0)")
    if not value.isascii() or not value.isdigit():
        shown = value if len(value) <= 24 else value[:24] + "..."
        raise ValueError(f"since must be an integer >= 0, got {shown!r}")
    if len(value.lstrip("0")) > MAX_SINCE_DIGITS:
        raise ValueError(f"since has more than {MAX_SINCE_DIGITS} digits")
    return int(value)
