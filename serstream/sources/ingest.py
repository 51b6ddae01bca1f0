"""The ``/ingest`` WebSocket: clients push audio and get their own stream's events back.

Protocol (docs/ingest.md has the full page):

1. The client's first message is a JSON text hello::

       {"type": "hello", "stream": "call-17", "sample_rate": 16000,
        "format": "s16le", "channels": 1, "token": "..."}

   ``format`` is ``s16le`` or ``f32le`` (interleaved when ``channels`` > 1);
   ``token`` is only needed when the server has one and the client did not
   send ``Authorization: Bearer <token>`` with the handshake.
2. Then binary messages of audio, each a whole number of sample frames. The
   server answers with the stream's events as JSON text: first the ``stream``
   open event (its ``stream`` field is the id the server assigned), then
   ``speech``, ``emotion`` and ``error`` events.
3. The client ends with the text ``{"type": "end"}``: the server finishes the
   audio, sends the last estimates and the ``stream`` closed event, and closes
   with 1000. A client that just closes ends its stream too ("client closed");
   one whose connection drops ends it with reason "disconnected".

Errors: a wrong or missing token closes with 1008 "invalid token"; a hello
that is not JSON or misses fields closes with 1002, an unsupported format,
rate or channel count with 1003 (one-line reasons); too many streams closes
with 1013. After the hello, a text message other than ``end`` and a binary
message with a partial sample are dropped, counted, and reported once per
connection as an ``error`` event (codes ``bad_message``, ``bad_frame``); the
connection stays open. A message above the size limit closes with 1009.

A hello with ``"split": true`` (or ``"roles": [...]``, one per channel) and
``channels`` >= 2 is a call with one party per channel: one mono stream per
party, ``<name>:<role>``, each with the call (the hello's ``call``, else the
name) and its role; every message is de-interleaved by
:mod:`serstream.core.parties` and pushed to all the parties at once (once all
their rings have room), so they stay on one clock. Without ``split`` the
channels are mixed, as before; ``call``/``role`` then tag the one stream.

Names are unique among live streams: a name already in use gets a suffix
(``call-17-2``, the one rule of :mod:`serstream.core.stream_ids`), so a client
that reconnects while its old stream is still closing is not refused. Names
starting with ``rtp:`` or ``file:`` are refused (1003): those prefixes belong to the monitor's own sources.

Flow control: audio goes into the stream's ring only when it fits with some
headroom; until then the handler stops reading the socket, so the
``websockets`` receive queue and then TCP flow control slow the sender down
instead of audio being dropped. A sender faster than real time (a replay) is
also held to ``max_speed`` times real time after a short burst, so one replay
cannot take the pipeline's time from the live streams.

The protocol itself (hello, tokens, close codes, per-message decisions, the
speed cap) is the pure :class:`~serstream.sources.ingest_session.IngestSession`;
this module is the asyncio adapter: it reads the socket, feeds the session,
opens the monitor stream, pushes audio with back-pressure and sends the
stream's events back.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Mapping

import numpy as np

from serstream import events
from serstream.core.parties import PartySplit
from serstream.core.stream_ids import MAX_SUFFIX, candidates
from serstream.monitor import MonitorError, StreamIdTaken
from serstream.sources.ingest_session import (
    CLOSE_INTERNAL,
    CLOSE_NORMAL,
    CLOSE_TOO_BIG,
    FORMATS,
    MAX_CLOSE_REASON_BYTES,
    Audio,
    Dropped,
    End,
    Hello,
    HelloError,
    IngestConfig,
    IngestSession,
    Refuse,
    codec_name,
    fit_close_reason,
    parse_hello,
)

if TYPE_CHECKING:
    from websockets.asyncio.server import ServerConnection
    from websockets.http11 import Request

    from serstream.monitor import Monitor, StreamHandle
    from serstream.server import EventBus, Subscription

__all__ = [
    "TOKEN_ENV",
    "FORMATS",
    "IngestConfig",
    "IngestHandler",
    "HelloError",
    "Hello",
    "MAX_CLOSE_REASON_BYTES",
    "fit_close_reason",
    "parse_hello",
    "make_ingest_handler",
    "add_ingest_arguments",
    "ingest_handler_from_args",
]

log = logging.getLogger(__name__)

#: Environment variable holding the shared secret when ``--token`` is not given.
TOKEN_ENV = "SERSTREAM_TOKEN"


class _FromEnv:
    def __repr__(self) -> str:
        return f"<token from ${TOKEN_ENV}>"


#: Default of ``make_ingest_handler(token=...)``: read ``$SERSTREAM_TOKEN`` (unset or empty: no token).
TOKEN_FROM_ENV: Final = _FromEnv()


def _bearer(request: Request) -> str | None:
    header = request.headers.get("Authorization")
    if header is None:
        return None
    scheme, _, value = header.strip().partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""


class _Refused(Exception):
    def __init__(self, refusal: Refuse) -> None:
        super().__init__(refusal.reason)
        self.refusal = refusal


@dataclass(frozen=True)
class _OpenStream:
    stream_id: str
    handle: StreamHandle
    sub: Subscription


@dataclass(frozen=True)
class _Opened:
    """A connection's streams: one, or (``split``) one per party in channel order."""

    streams: tuple[_OpenStream, ...]
    split: PartySplit | None


def _undo(opened: list[_OpenStream]) -> None:
    """Close streams opened for a name that could not be had whole (no audio went in)."""
    for o in opened:
        o.sub.close()
        o.handle.close(reason="stream name taken")


class IngestHandler:
    """The ``ingest_handler`` of :class:`~serstream.server.MonitorServer`; see the module docstring.

    ``counters`` (totals since start, read from any thread): ``connections``,
    ``streams_opened``, ``refused_token``, ``bad_hello``, ``no_hello`` (left before
    the hello), ``refused_busy``,
    ``bad_messages``, ``bad_frames``, ``bad_frame_bytes``, ``oversized_frames``,
    ``disconnects``, ``client_closes``, ``ended``, ``frames``, ``bytes``,
    ``backpressure_waits``, ``speed_waits``; ``active`` is the number of live
    ingest streams.
    """

    def __init__(self, monitor: Monitor, bus: EventBus, config: IngestConfig | None = None) -> None:
        self.monitor = monitor
        self.bus = bus
        self.config = config or IngestConfig()
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "connections", "streams_opened", "refused_token", "bad_hello", "no_hello", "refused_busy",
                "bad_messages", "bad_frames", "bad_frame_bytes", "oversized_frames", "disconnects",
                "client_closes", "ended", "frames", "bytes", "backpressure_waits", "speed_waits",
            ),
            0,
        )
        self._live: set[str] = set()
        self._logged: set[str] = set()

    @property
    def active(self) -> int:
        return len(self._live)

    @property
    def description(self) -> str:
        return "receiving audio on /ingest"

    @property
    def stream_ids(self) -> list[str]:
        return sorted(self._live)

    def stats(self) -> dict[str, int]:
        return {**self.counters, "active": self.active}

    def drop_counters(self) -> dict[str, int]:
        """Flat totals for the monitor's ``stats.drops`` (names prefixed ``ingest_``)."""
        c = self.counters
        return {
            "ingest_refused_token": c["refused_token"],
            "ingest_bad_hello": c["bad_hello"],
            "ingest_refused_busy": c["refused_busy"],
            "ingest_bad_messages": c["bad_messages"],
            "ingest_bad_frames": c["bad_frames"],
            "ingest_oversized_frames": c["oversized_frames"],
            "ingest_disconnects": c["disconnects"],
        }

    def _count(self, key: str, n: int = 1) -> None:
        self.counters[key] += n

    def _add(self, counts: Mapping[str, int]) -> None:
        for key, n in counts.items():
            self.counters[key] += n

    def _log_once(self, cause: str, message: str) -> None:
        if cause not in self._logged:
            self._logged.add(cause)
            log.warning("ingest: %s (further cases are counted, not logged)", message)

    def _refused(self, conn: ServerConnection, refusal: Refuse) -> _Refused:
        self._add(refusal.counts)
        if refusal.log is not None:
            self._log_once(refusal.log, f"refused a client from {_peer(conn)}: {refusal.reason}")
        return _Refused(refusal)

    # ------------------------------------------------------------ one connection

    async def __call__(self, conn: ServerConnection, request: Request) -> None:
        from websockets.exceptions import ConnectionClosed, ConnectionClosedError

        self._count("connections")
        session = IngestSession(self.config, _bearer(request))
        try:
            await self._handshake(conn, session)
            opened = self._open(conn, session)
        except _Refused as refused:
            await conn.close(refused.refusal.code, refused.refusal.reason)
            return
        except ConnectionClosed as exc:
            if exc.sent is not None and exc.sent.code == CLOSE_TOO_BIG:
                self._count("oversized_frames")
            else:
                self._count("no_hello")  # the client left before its hello
            return
        # One sender per stream (a split connection has one per party), all on this connection.
        senders = [asyncio.create_task(self._send_events(conn, o.sub, o.stream_id)) for o in opened.streams]
        handles = [o.handle for o in opened.streams]
        reason = "client closed"
        ended = False
        try:
            ended = await self._read_audio(conn, session, handles, opened.split)
            reason = "end of stream" if ended else "client closed"
        except _Refused as refused:
            reason = refused.refusal.reason
            await conn.close(refused.refusal.code, refused.refusal.reason)
        except ConnectionClosedError as exc:
            if exc.sent is not None and exc.sent.code == CLOSE_TOO_BIG:
                # The server's max_size tripped inside websockets before we saw the message.
                self._count("oversized_frames")
                reason = "message too big"
            else:
                self._count("disconnects")
                reason = "disconnected"
        except ConnectionClosed:
            self._count("client_closes")
        finally:
            for handle in handles:
                handle.close(reason=reason)
            if ended:
                self._count("ended")
                try:
                    # The last estimates and the `stream` closed events go out before we close.
                    await asyncio.wait_for(asyncio.shield(asyncio.gather(*senders)), self.config.end_timeout_s)
                except (TimeoutError, ConnectionClosed):
                    pass
                await conn.close(CLOSE_NORMAL, "end of stream")
            for sender in senders:
                sender.cancel()
            for o in opened.streams:
                o.sub.close()
                self._live.discard(o.stream_id)

    async def _handshake(self, conn: ServerConnection, session: IngestSession) -> Hello:
        refusal = session.check_handshake()
        if refusal is not None:
            raise self._refused(conn, refusal)
        try:
            first = await asyncio.wait_for(conn.recv(), self.config.hello_timeout_s)
        except TimeoutError:
            raise self._refused(conn, session.hello_timed_out()) from None
        hello = session.accept_hello(first)
        if isinstance(hello, Refuse):
            raise self._refused(conn, hello)
        return hello

    def _open(self, conn: ServerConnection, session: IngestSession) -> _Opened:
        """Open the connection's stream, or (a split hello) one stream per party under one base name."""
        hello = session.hello
        assert hello is not None
        refusal = session.check_capacity(len(self._live))
        if refusal is not None:
            raise self._refused(conn, refusal)
        taken = set(self.monitor.stream_ids) | self._live
        for base in candidates(hello.stream):
            split = hello.parties(base) if hello.split else None
            wanted = [(p.stream, p.role) for p in split.parties] if split else [(base, hello.role)]
            if any(stream_id in taken for stream_id, _ in wanted):
                continue
            call = split.call if split else hello.call
            opened: list[_OpenStream] = []
            try:
                for stream_id, role in wanted:
                    # Subscribe first, so the client gets its own `stream` open event.
                    sub = self.bus.subscribe(stream_id, self.config.event_buffer)
                    try:
                        handle = self.monitor.open_stream(
                            stream_id, source="websocket", codec=codec_name(hello.format),
                            sample_rate=hello.sample_rate, channels=1 if split else hello.channels,
                            detail=_peer(conn), call=call, role=role,
                        )
                    except BaseException:
                        sub.close()
                        raise
                    opened.append(_OpenStream(stream_id, handle, sub))
            except StreamIdTaken:
                # Taken in the meantime by another source: undo this name's streams, try the next suffix.
                _undo(opened)
                continue
            except MonitorError as exc:
                _undo(opened)
                raise self._refused(conn, session.open_failed(" ".join(str(exc).split()))) from None
            for o in opened:
                self._live.add(o.stream_id)
            self._count("streams_opened", len(opened))
            session.opened([o.stream_id for o in opened], time.monotonic())
            return _Opened(tuple(opened), split)
        raise self._refused(conn, session.open_failed(
            f"stream name {hello.stream!r} and its suffixes -2 to -{MAX_SUFFIX} are all in use"))

    async def _send_events(self, conn: ServerConnection, sub: Subscription, stream_id: str) -> None:
        """This stream's events to the client until its ``stream`` closed event has gone out."""
        from websockets.exceptions import ConnectionClosed

        try:
            async for payload in sub:
                # Monitor-wide stats reach every subscription; /events is the place for them.
                if payload.startswith(b'{"type":"stats"'):
                    continue
                await conn.send(payload, text=True)
                if payload.startswith(b'{"type":"stream"') and b'"state":"closed"' in payload:
                    return
        except ConnectionClosed:
            pass
        finally:
            sub.close()

    async def _read_audio(
        self, conn: ServerConnection, session: IngestSession, handles: list[StreamHandle], split: PartySplit | None
    ) -> bool:
        """Read until the client ends (True) or closes (ConnectionClosed)."""
        while True:
            decision = session.receive(await conn.recv())
            if isinstance(decision, End):
                return True
            if isinstance(decision, Refuse):
                raise self._refused(conn, decision)
            self._add(decision.counts)
            if isinstance(decision, Dropped):
                if decision.report:
                    self._report(session.stream_id or "", decision)
                continue
            assert isinstance(decision, Audio)
            if decision.samples.shape[0]:
                await self._push(session, handles, decision.samples, split)
            if any(handle.closed for handle in handles):
                # The monitor ended a stream (failure, shutdown): nothing more to take.
                raise _Refused(Refuse(CLOSE_INTERNAL, "stream closed by the monitor"))

    async def _push(
        self, session: IngestSession, handles: list[StreamHandle], block: np.ndarray, split: PartySplit | None
    ) -> None:
        """Push ``block`` (split: each party its channel) once every stream has room for it.

        A split connection's parties get the same frames in the same pushes, so
        their clocks stay equal: no party's ring takes a piece until all of them can.
        """
        capacity = min(handle.capacity for handle in handles)
        piece = max(1, capacity // 4)
        headroom = capacity // 8

        def room(frames: int) -> bool:
            return all(handle.free_space >= frames + headroom or handle.closed for handle in handles)

        for start in range(0, block.shape[0], piece):
            part = block[start:start + piece]
            frames = int(part.shape[0])
            if not room(frames):
                self._count("backpressure_waits")
                # Not reading the socket meanwhile is the point: TCP slows the sender.
                while not room(frames):
                    await asyncio.sleep(0.01)
            if any(handle.closed for handle in handles):
                return
            if split is None:
                handles[0].push(part)
            else:
                for handle, mono in zip(handles, split.split(part), strict=True):
                    handle.push(mono)
            session.pushed(frames)
            delay = session.pace_delay(time.monotonic())
            if delay > 0:
                self._count("speed_waits")
                await asyncio.sleep(delay)

    def _report(self, stream_id: str, dropped: Dropped) -> None:
        """An ``error`` event on the stream the first time a drop's code happens on this connection."""
        self._log_once(dropped.code, f"stream {stream_id}: {dropped.message}")
        try:
            emit = getattr(self.monitor, "emit", None) or self.monitor.sink
            emit(events.error_event(stream_id, code=dropped.code, message=dropped.message, count=dropped.count,
                                    ts=time.time()))
        except Exception:  # noqa: BLE001 - a consumer's failure must not end this client
            pass


def _peer(conn: ServerConnection) -> str:
    try:
        addr = conn.remote_address
    except Exception:  # noqa: BLE001 - the transport may already be gone
        return "unknown"
    if isinstance(addr, tuple) and len(addr) >= 2:
        return f"{addr[0]}:{addr[1]}"
    return str(addr)


def make_ingest_handler(
    monitor: Monitor,
    *,
    bus: EventBus,
    token: str | None | _FromEnv = TOKEN_FROM_ENV,
    max_frame_bytes: int = IngestConfig.max_frame_bytes,
    max_streams: int = IngestConfig.max_streams,
    max_speed: float | None = IngestConfig.max_speed,
) -> IngestHandler:
    """The handler for ``MonitorServer(..., ingest_handler=...)``.

    ``bus`` is the server's event bus (the handler subscribes each client to
    its own stream). ``token``: the shared secret; by default read from
    ``$SERSTREAM_TOKEN`` (unset or empty: no token). Keep ``max_frame_bytes``
    at or below the server's ``max_message_bytes``.
    """
    if isinstance(token, _FromEnv):
        token = os.environ.get(TOKEN_ENV, "").strip() or None
    config = IngestConfig(token=token, max_frame_bytes=max_frame_bytes, max_streams=max_streams,
                          max_speed=max_speed)
    handler = IngestHandler(monitor, bus, config)
    add = getattr(monitor, "add_stats_provider", None)
    if add is not None:
        add(handler.drop_counters)
    return handler


def add_ingest_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--token``, ``--max-frame-bytes``, ``--max-ingest-streams`` and ``--ingest-max-speed``."""
    parser.add_argument("--token", default=None, metavar="SECRET",
                        help=f"shared secret every endpoint but /healthz requires (default: ${TOKEN_ENV}, "
                             "else --token-file; on loopback none means open, elsewhere one is generated; "
                             "see docs/security.md)")
    parser.add_argument("--max-frame-bytes", type=int, default=IngestConfig.max_frame_bytes, metavar="BYTES",
                        help="largest /ingest binary message (default 1 MiB); larger ones close with 1009")
    parser.add_argument("--max-ingest-streams", type=int, default=IngestConfig.max_streams, metavar="N",
                        help="concurrent /ingest streams (default 256)")
    parser.add_argument("--ingest-max-speed", type=float, default=IngestConfig.max_speed, metavar="X",
                        help="cap on a client's intake, times real time (default 8; 0 = no cap)")


def ingest_handler_from_args(
    monitor: Monitor, bus: EventBus, args: argparse.Namespace, token: str | None | _FromEnv = TOKEN_FROM_ENV
) -> IngestHandler:
    """:func:`make_ingest_handler` from parsed options; ValueError (one line) on a bad value.

    ``token``: the server's resolved token (from ``--token``, ``--token-file``,
    the environment, or generated; None: none), so the hello is checked
    against the same secret as every other endpoint. By default it is read
    from ``args.token``, else ``$SERSTREAM_TOKEN``.
    """
    if not isinstance(token, _FromEnv):
        speed = getattr(args, "ingest_max_speed", IngestConfig.max_speed)
        return make_ingest_handler(
            monitor, bus=bus, token=token,
            max_frame_bytes=int(getattr(args, "max_frame_bytes", IngestConfig.max_frame_bytes)),
            max_streams=int(getattr(args, "max_ingest_streams", IngestConfig.max_streams)),
            max_speed=None if not speed else float(speed),
        )
    token = getattr(args, "token", None)
    speed = getattr(args, "ingest_max_speed", IngestConfig.max_speed)
    return make_ingest_handler(
        monitor,
        bus=bus,
        token=token if token else TOKEN_FROM_ENV,
        max_frame_bytes=int(getattr(args, "max_frame_bytes", IngestConfig.max_frame_bytes)),
        max_streams=int(getattr(args, "max_ingest_streams", IngestConfig.max_streams)),
        max_speed=None if not speed else float(speed),
    )
