"""The ``/fork`` WebSocket: FreeSWITCH ``mod_audio_fork`` calls into party streams.

``uuid_audio_fork <uuid> start wss://HOST/fork?mix=stereo&rate=16k&token=... stereo 16k {"call":"..."}``
(docs/telephony.md has the set-up). The server selects the subprotocol
``audio.drachtio.org`` when the module offers it. This adapter reads the
socket and carries out what the pure
:class:`~serstream.sources.fork_session.ForkSession` decides: at the first
message (the metadata, or the first audio frame when there is none) it opens
the call's party streams (``fork:<call>``, or ``fork:<call>:caller`` and
``fork:<call>:callee`` for stereo; source ``fork``), then splits every
binary frame among them. The module closes the socket when the call ends
(reason ``client closed``); a call that goes quiet for ``idle_timeout_s`` is
closed (``idle timeout``). Nothing is sent back to FreeSWITCH.
"""

from __future__ import annotations

import itertools
import time
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

from websockets.exceptions import ConnectionClosed, ConnectionClosedError

from serstream.sources.fork_session import (
    SUBPROTOCOL,
    ForkConfig,
    ForkSession,
    OpenCall,
    PartyAudio,
    Refuse,
    Rejected,
    Stop,
)
from serstream.sources.telephony import CallHandlerBase, CallState, Reader, peer_of

if TYPE_CHECKING:
    from websockets.asyncio.server import ServerConnection
    from websockets.http11 import Request

    from serstream.monitor import Monitor

__all__ = ["ForkHandler", "make_fork_handler", "query_of"]

CLOSE_NORMAL = 1000
CLOSE_TRY_LATER = 1013


def query_of(path: str) -> dict[str, str]:
    """The first value of each query parameter of a request path (``token`` left out)."""
    parsed = parse_qs(urlsplit(path).query, keep_blank_values=False)
    return {key: values[0] for key, values in parsed.items() if values and key != "token"}


class ForkHandler(CallHandlerBase):
    """The handler of ``/fork``.

    ``counters``: ``connections``, ``messages``, ``calls``, ``frames``, ``bytes``,
    ``texts`` (application text after the metadata), ``no_metadata_text``,
    ``metadata_not_json``, ``rejected_bad_frame``, ``rejected_oversized``, the
    refusals ``bad_format``, ``bad_metadata``, ``no_metadata``, ``refused_busy``,
    and ``idle_timeouts``, ``disconnects``, ``streams_opened``, ``backpressure_waits``,
    ``speed_waits``.
    """

    source = "fork"
    prefix = "fork"
    #: mod_audio_fork offers this subprotocol and expects it selected.
    subprotocols = (SUBPROTOCOL,)
    drop_keys = ("bad_format", "bad_metadata", "no_metadata", "refused_busy", "idle_timeouts", "disconnects")

    def __init__(self, monitor: Monitor, config: ForkConfig | None = None, max_calls: int = 256) -> None:
        super().__init__(monitor, max_calls)
        self.config = config or ForkConfig()
        self._serial = itertools.count(1)

    @property
    def description(self) -> str:
        return "receiving FreeSWITCH mod_audio_fork on /fork"

    async def __call__(self, conn: ServerConnection, request: Request) -> None:
        self._count("connections")
        session = ForkSession(self.config, time.monotonic(), query_of(request.path),
                              fallback_call=f"call-{next(self._serial)}", totals=self.counters)
        state = CallState()
        try:
            async with Reader(conn, session) as reader:
                state.reason = await self._serve(conn, session, reader, state)
        except ConnectionClosedError:
            self._count("disconnects")
            state.reason = "disconnected"
        except ConnectionClosed:
            state.reason = "client closed"
        finally:
            self._end_call(state)

    async def _serve(self, conn: ServerConnection, session: ForkSession, reader: Reader, state: CallState) -> str:
        """Read and carry out until the call ends; the reason its streams close with."""
        handles = state.handles
        while True:
            message = await reader.recv()
            if message is None:
                expired = reader.expired
                if isinstance(expired, Refuse):
                    self._log_once(expired.cause, f"refused a call from {peer_of(conn)}: {expired.reason}")
                return str(expired.reason) if expired is not None else "client closed"
            for decision in session.receive(message, time.monotonic()):
                if isinstance(decision, PartyAudio):
                    for handle, samples in zip(handles, decision.channels):
                        await self._push(handle, samples, session.pace_delay)
                    session.resume(time.monotonic())
                    if any(h.closed for h in handles):
                        await conn.close(1011, "stream closed by the monitor")
                        return "stream closed by the monitor"
                elif isinstance(decision, Rejected):
                    if decision.report:
                        self._report([h.stream_id for h in handles], decision.cause, decision.message,
                                     decision.count)
                elif isinstance(decision, OpenCall):
                    if not self._begin_call(state):
                        await conn.close(CLOSE_TRY_LATER, f"too many calls (max {self.max_calls})")
                        return "too many calls"
                    for party in decision.parties:
                        opened = self._open_party(
                            conn, party.stream_id, codec=decision.codec_name, sample_rate=decision.sample_rate,
                            call=decision.call, role=party.role, params=decision.params or None,
                        )
                        if isinstance(opened, str):
                            self._count("refused_busy")
                            self._log_once("refused_busy", f"could not open a stream for call {decision.call}: "
                                                           f"{opened}")
                            await conn.close(CLOSE_TRY_LATER, opened)
                            return "monitor busy"
                        handles.append(opened)
                elif isinstance(decision, Stop):
                    await conn.close(CLOSE_NORMAL, decision.reason)
                    return decision.reason
                else:
                    assert isinstance(decision, Refuse)
                    self._log_once(decision.cause, f"refused a call from {peer_of(conn)}: {decision.reason}")
                    await conn.close(decision.code, decision.reason)
                    return decision.reason


def make_fork_handler(monitor: Monitor, config: ForkConfig | None = None, max_calls: int = 256) -> ForkHandler:
    """The ``/fork`` handler, its counters registered with the monitor's ``stats.drops``."""
    handler = ForkHandler(monitor, config, max_calls)
    add = getattr(monitor, "add_stats_provider", None)
    if add is not None:
        add(handler.drop_counters)
    return handler
