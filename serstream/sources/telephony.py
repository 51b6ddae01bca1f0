"""What the telephony WebSocket adapters (``/twilio``, ``/fork``) share: party streams, pushing, reporting.

A call's connection carries one or more parties; each party is one monitor
stream tagged with the call's ``call`` id and the party's ``role``. The pure
sessions (:mod:`serstream.sources.twilio_session`,
:mod:`serstream.sources.fork_session`) decide; :class:`CallHandlerBase` holds
what every adapter does with the decisions: open the party streams, push
audio with backpressure (the socket is not read while a ring is full, so TCP
slows the sender), honour the speed cap, report a drop cause once (a log
line per handler, an ``error`` event per connection), and keep the counters
that ``stats.drops`` shows.

Nothing is sent back to the telephony platform: Twilio and mod_audio_fork
would read our events as commands. Consumers read the calls' events on
``/events`` (``?stream=`` filters one party).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Protocol

import numpy as np
from websockets.exceptions import ConnectionClosed

from serstream import events
from serstream.errors import MonitorError, StreamIdTaken

if TYPE_CHECKING:
    from websockets.asyncio.server import ServerConnection

    from serstream.monitor import Monitor, StreamHandle

__all__ = ["CallHandlerBase", "CallState", "Reader", "peer_of"]

log = logging.getLogger(__name__)


def peer_of(conn: ServerConnection) -> str:
    """``host:port`` of the remote end (``unknown`` once the transport is gone)."""
    try:
        addr = conn.remote_address
    except Exception:  # noqa: BLE001 - the transport may already be gone
        return "unknown"
    if isinstance(addr, tuple) and len(addr) >= 2:
        return f"{addr[0]}:{addr[1]}"
    return str(addr)


@dataclass
class CallState:
    """One connection's party streams, whether it holds a call slot, and why it ended."""

    handles: list[StreamHandle] = field(default_factory=list)
    counted: bool = False
    reason: str = "client closed"


class CallHandlerBase:
    """Shared state and helpers of a telephony handler; subclasses implement ``__call__``.

    ``counters``: totals since start (the sessions add to it directly);
    ``drop_keys``: the counters that :meth:`drop_counters` exposes in
    ``stats.drops`` under ``<prefix>_<key>`` (with every ``rejected_*``).
    """

    source = "twilio"
    prefix = "twilio"
    drop_keys: tuple[str, ...] = ()

    def __init__(self, monitor: Monitor, max_calls: int = 256) -> None:
        self.monitor = monitor
        self.max_calls = int(max_calls)
        self.counters: dict[str, int] = {}
        self._live: set[str] = set()
        self._calls = 0
        self._logged: set[str] = set()

    @property
    def active(self) -> int:
        """Party streams open now."""
        return len(self._live)

    @property
    def calls(self) -> int:
        """Connections carrying a call now."""
        return self._calls

    @property
    def stream_ids(self) -> list[str]:
        return sorted(self._live)

    def stats(self) -> dict[str, int]:
        return {**self.counters.copy(), "active": self.active, "calls": self._calls}

    def drop_counters(self) -> dict[str, int]:
        """Flat totals for the monitor's ``stats.drops``: ``<prefix>_<cause>`` (called from its stats thread).

        The loop adds keys as new causes appear: read a copy (one C call under the GIL), never iterate live.
        """
        counts = self.counters.copy()
        keys = [k for k in counts if k.startswith("rejected_")] + list(self.drop_keys)
        return {f"{self.prefix}_{key}": counts.get(key, 0) for key in keys}

    def _count(self, key: str, n: int = 1) -> None:
        self.counters[key] = self.counters.get(key, 0) + n

    def _log_once(self, cause: str, message: str) -> None:
        if cause not in self._logged:
            self._logged.add(cause)
            log.warning("%s: %s (further cases are counted, not logged)", self.prefix, message)

    # ------------------------------------------------------------ streams

    def _open_party(
        self, conn: ServerConnection, base_id: str, *, codec: str, sample_rate: int, call: str,
        role: str | None, params: Mapping[str, str] | None,
    ) -> StreamHandle | str:
        """Open one party stream (``base_id`` or its first free ``-N``); the handle, or why not (one line)."""
        try:
            handle = self.monitor.open_stream(
                base_id, source=self.source, codec=codec, sample_rate=sample_rate, channels=1,
                detail=peer_of(conn), unique=True, call=call, role=role, params=params,
            )
        except StreamIdTaken:
            return f"stream id {base_id!r} and its suffixes are all in use"
        except MonitorError as exc:
            return " ".join(str(exc).split())[:120]
        self._live.add(handle.stream_id)
        self._count("streams_opened")
        return handle

    def _close_parties(self, handles: Iterable[StreamHandle], reason: str) -> None:
        for handle in handles:
            handle.close(reason=reason)
            self._live.discard(handle.stream_id)

    def _begin_call(self, state: CallState) -> bool:
        """Take a call slot for this connection; False (counted ``refused_busy``) when all are taken."""
        if self._calls >= self.max_calls:
            self._count("refused_busy")
            return False
        self._calls += 1
        state.counted = True
        return True

    def _end_call(self, state: CallState) -> None:
        """Close the connection's party streams with its reason and give its call slot back."""
        self._close_parties(state.handles, state.reason)
        if state.counted:
            self._calls -= 1
            state.counted = False

    async def _push(self, handle: StreamHandle, block: np.ndarray, pace: Callable[[float], float]) -> None:
        """Push ``block`` in ring-sized pieces; wait (not reading the socket) while the ring is full."""
        capacity = handle.capacity
        piece = max(1, capacity // 4)
        headroom = capacity // 8
        for start in range(0, block.shape[0], piece):
            part = block[start:start + piece]
            if handle.free_space < part.shape[0] + headroom:
                self._count("backpressure_waits")
                while handle.free_space < part.shape[0] + headroom and not handle.closed:
                    await asyncio.sleep(0.01)
            if handle.closed:
                return
            handle.push(part)
        delay = pace(time.monotonic())
        if delay > 0:
            self._count("speed_waits")
            await asyncio.sleep(delay)

    def _report(self, stream_ids: Iterable[str], cause: str, message: str, count: int) -> None:
        """Log ``cause`` once per handler; an ``error`` event (code ``bad_message``) on each stream given."""
        self._log_once(cause, message)
        emit: Callable[[dict[str, Any]], None] = getattr(self.monitor, "emit", None) or self.monitor.sink
        for stream_id in stream_ids:
            try:
                emit(events.error_event(stream_id, code="bad_message", message=f"{cause}: {message}",
                                        count=count, ts=time.time()))
            except Exception:  # noqa: BLE001 - a consumer's failure must not end this call
                pass



class _Expiring(Protocol):
    """What :class:`Reader` needs of a session: its deadline, and what expiring it decides."""

    @property
    def stopped(self) -> bool: ...

    @property
    def deadline(self) -> float: ...

    def expire(self, now: float) -> Any: ...


class Reader:
    """A connection's messages, with one watchdog task enforcing the session's deadline.

    One task per connection instead of a timeout per message (``wait_for``
    costs a task each time: at 50 messages a second per track that adds up).
    The watchdog expires the session only while :meth:`recv` waits for the
    client: time spent pushing into a full ring is the monitor's, not the
    client's idleness. On expiry it closes the socket with the decision's code
    (1000 for an idle call) and :meth:`recv` returns None; the decision is in
    :attr:`expired`.
    """

    def __init__(self, conn: ServerConnection, session: _Expiring) -> None:
        self.conn = conn
        self.session = session
        self.expired: Any = None
        self._waiting = False
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Reader:
        self._task = asyncio.create_task(self._watch())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        if self.expired is None:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
            await task

    async def _watch(self) -> None:
        session = self.session
        while not session.stopped:
            now = time.monotonic()
            delay = session.deadline - now
            if delay > 0 or not self._waiting:
                # Re-checked at least twice a second: the deadline moves as messages come.
                await asyncio.sleep(min(max(delay, 0.05), 0.5))
                continue
            expired = session.expire(now)
            if expired is None:
                return
            self.expired = expired
            await self.conn.close(int(getattr(expired, "code", 1000)), str(expired.reason))
            return

    async def recv(self) -> str | bytes | None:
        """The next message; None once the session expired (the socket is being closed)."""
        if self.expired is not None or self.session.stopped:
            return None
        self._waiting = True
        try:
            message = await self.conn.recv()
        except ConnectionClosed:
            if self.expired is not None:
                return None
            raise
        finally:
            self._waiting = False
        if self.expired is not None or self.session.stopped:
            return None
        return message
