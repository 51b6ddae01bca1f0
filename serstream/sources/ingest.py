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

Names are unique among live streams: a name already in use gets a suffix
(``call-17-2``), so a client that reconnects while its old stream is still
closing is not refused. Names starting with ``rtp:`` or ``file:`` are refused
(1003): those prefixes belong to the monitor's own sources.

Flow control: audio goes into the stream's ring only when it fits with some
headroom; until then the handler stops reading the socket, so the
``websockets`` receive queue and then TCP flow control slow the sender down
instead of audio being dropped. A sender faster than real time (a replay) is
also held to ``max_speed`` times real time after a short burst, so one replay
cannot take the pipeline's time from the live streams.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Mapping

import numpy as np

from serstream import events
from serstream.monitor import MonitorError

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

#: Sample format -> numpy dtype of one sample (little-endian).
FORMATS: Final[Mapping[str, np.dtype[Any]]] = {"s16le": np.dtype("<i2"), "f32le": np.dtype("<f4")}
_CODECS = {"s16le": "pcm_s16le", "f32le": "pcm_f32le"}

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+/-]{0,99}")
_RESERVED_PREFIXES = ("rtp:", "file:")
_MAX_RATE = 384_000
_MAX_CHANNELS = 8
_SUFFIXES = 100

# Close codes (RFC 6455 §7.4.1).
CLOSE_NORMAL = 1000
CLOSE_PROTOCOL = 1002
CLOSE_UNSUPPORTED = 1003
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_TRY_LATER = 1013


class _FromEnv:
    def __repr__(self) -> str:
        return f"<token from ${TOKEN_ENV}>"


#: Default of ``make_ingest_handler(token=...)``: read ``$SERSTREAM_TOKEN`` (unset or empty: no token).
TOKEN_FROM_ENV: Final = _FromEnv()


@dataclass(frozen=True)
class IngestConfig:
    """Limits of the ingest endpoint."""

    token: str | None = None  # shared secret every client must present; None: open
    max_frame_bytes: int = 1 << 20  # larger binary messages close the connection (1009)
    max_streams: int = 256  # concurrent ingest streams; more are refused (1013)
    max_speed: float | None = 8.0  # a stream's intake cap, times real time, after the burst
    burst_s: float = 2.0  # seconds of audio a client may send ahead of that cap
    hello_timeout_s: float = 10.0  # the hello must come this soon after the handshake
    end_timeout_s: float = 10.0  # after "end", how long to wait for the stream's last events
    event_buffer: int = 1000  # events waiting for a slow client; the oldest are dropped (counted)

    def __post_init__(self) -> None:
        if self.max_frame_bytes < 8:
            raise ValueError(f"max_frame_bytes must be >= 8, got {self.max_frame_bytes}")
        if self.max_streams < 1:
            raise ValueError(f"max_streams must be >= 1, got {self.max_streams}")
        if self.max_speed is not None and self.max_speed < 1:
            raise ValueError(f"max_speed must be >= 1 (times real time) or None, got {self.max_speed}")
        if self.token is not None and not self.token:
            raise ValueError("token must be a non-empty string or None")


#: RFC 6455 §5.5: a close frame's payload is at most 125 bytes, 2 of them the code.
MAX_CLOSE_REASON_BYTES = 123


def fit_close_reason(reason: str) -> str:
    """``reason`` cut to fit a close frame (123 UTF-8 bytes, whole characters, "..." when cut)."""
    data = reason.encode("utf-8")
    if len(data) <= MAX_CLOSE_REASON_BYTES:
        return reason
    return data[: MAX_CLOSE_REASON_BYTES - 3].decode("utf-8", "ignore") + "..."


def _short(value: Any, limit: int = 24) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class HelloError(ValueError):
    """A hello the server refuses: ``code`` is the WebSocket close code, the message its reason.

    The reason always fits a WebSocket close frame (:func:`fit_close_reason`).
    """

    def __init__(self, code: int, reason: str) -> None:
        reason = fit_close_reason(reason)
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class Hello:
    """A validated hello."""

    stream: str
    sample_rate: int
    format: str
    channels: int
    token: str | None


def _int_field(obj: Mapping[str, Any], name: str, default: int | None = None) -> int:
    value = obj.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        if value is None:
            raise HelloError(CLOSE_PROTOCOL, f"hello lacks {name!r}")
        raise HelloError(CLOSE_PROTOCOL, f"hello field {name!r} must be an integer, got {type(value).__name__}")
    return value


def parse_hello(message: str | bytes) -> Hello:
    """Validate the first message (pure); raise :class:`HelloError` with a close code and reason."""
    if isinstance(message, (bytes, bytearray, memoryview)):
        raise HelloError(CLOSE_UNSUPPORTED, "the first message must be a JSON text hello, not binary audio")
    try:
        obj = json.loads(message)
    except (ValueError, RecursionError):
        raise HelloError(CLOSE_PROTOCOL, "hello is not valid JSON") from None
    if not isinstance(obj, dict) or obj.get("type") != "hello":
        raise HelloError(CLOSE_PROTOCOL, 'the first message must be {"type": "hello", ...}')
    stream = obj.get("stream")
    if not isinstance(stream, str) or not _NAME.fullmatch(stream):
        raise HelloError(
            CLOSE_PROTOCOL,
            "hello 'stream' must be 1-100 characters: letters, digits and ._:@+/- (starting with a letter or digit)",
        )
    if stream.startswith(_RESERVED_PREFIXES):
        raise HelloError(CLOSE_UNSUPPORTED, f"stream names starting with {' or '.join(_RESERVED_PREFIXES)} are reserved")
    rate = _int_field(obj, "sample_rate")
    if not 1000 <= rate <= _MAX_RATE:
        raise HelloError(CLOSE_UNSUPPORTED, f"sample_rate {rate} Hz is outside 1000-{_MAX_RATE}")
    fmt = obj.get("format", "s16le")
    if not isinstance(fmt, str) or fmt not in FORMATS:
        raise HelloError(CLOSE_UNSUPPORTED, f"format {_short(fmt)} is not supported (use s16le or f32le)")
    channels = _int_field(obj, "channels", 1)
    if not 1 <= channels <= _MAX_CHANNELS:
        raise HelloError(CLOSE_UNSUPPORTED, f"channels {channels} is outside 1-{_MAX_CHANNELS}")
    token = obj.get("token")
    if token is not None and not isinstance(token, str):
        raise HelloError(CLOSE_PROTOCOL, "hello 'token' must be a string")
    return Hello(stream=stream, sample_rate=rate, format=str(fmt), channels=channels, token=token)


def _bearer(request: "Request") -> str | None:
    header = request.headers.get("Authorization")
    if header is None:
        return None
    scheme, _, value = header.strip().partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""


def _token_ok(expected: str, given: str | None) -> bool:
    return given is not None and hmac.compare_digest(expected.encode("utf-8"), given.encode("utf-8"))


class _Refused(Exception):
    def __init__(self, code: int, reason: str) -> None:
        reason = fit_close_reason(reason)
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass
class _Connection:
    """Per-connection state of one ingest client."""

    stream_id: str
    handle: "StreamHandle"
    dtype: np.dtype[Any]
    channels: int
    rate: int
    bad_messages: int = 0
    bad_frames: int = 0
    samples: int = 0
    started: float = 0.0


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

    def __init__(self, monitor: "Monitor", bus: "EventBus", config: IngestConfig | None = None) -> None:
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

    def _log_once(self, cause: str, message: str) -> None:
        if cause not in self._logged:
            self._logged.add(cause)
            log.warning("ingest: %s (further cases are counted, not logged)", message)

    # ------------------------------------------------------------ one connection

    async def __call__(self, conn: "ServerConnection", request: "Request") -> None:
        from websockets.exceptions import ConnectionClosed, ConnectionClosedError

        self._count("connections")
        try:
            hello = await self._handshake(conn, request)
            stream_id, handle, sub = self._open(conn, hello)
        except _Refused as refused:
            await conn.close(refused.code, refused.reason)
            return
        except ConnectionClosed as exc:
            if exc.sent is not None and exc.sent.code == CLOSE_TOO_BIG:
                self._count("oversized_frames")
            else:
                self._count("no_hello")  # the client left before its hello
            return
        state = _Connection(stream_id, handle, FORMATS[hello.format], hello.channels, hello.sample_rate,
                            started=time.monotonic())
        sender = asyncio.create_task(self._send_events(conn, sub, stream_id))
        reason = "client closed"
        ended = False
        try:
            ended = await self._read_audio(conn, state)
            reason = "end of stream" if ended else "client closed"
        except _Refused as refused:
            reason = refused.reason
            await conn.close(refused.code, refused.reason)
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
            handle.close(reason=reason)
            if ended:
                self._count("ended")
                try:
                    # The last estimates and the `stream` closed event go out before we close.
                    await asyncio.wait_for(asyncio.shield(sender), self.config.end_timeout_s)
                except (asyncio.TimeoutError, ConnectionClosed):
                    pass
                await conn.close(CLOSE_NORMAL, "end of stream")
            sender.cancel()
            sub.close()
            self._live.discard(stream_id)

    async def _handshake(self, conn: "ServerConnection", request: "Request") -> "Hello":
        token = self.config.token
        header_token = _bearer(request)
        if token is not None and header_token is not None and not _token_ok(token, header_token):
            self._count("refused_token")
            self._log_once("token", f"refused a client from {_peer(conn)}: invalid token")
            raise _Refused(CLOSE_POLICY, "invalid token")
        try:
            first = await asyncio.wait_for(conn.recv(), self.config.hello_timeout_s)
        except asyncio.TimeoutError:
            self._count("bad_hello")
            raise _Refused(CLOSE_PROTOCOL, f"no hello within {self.config.hello_timeout_s:g} s") from None
        try:
            hello = parse_hello(first)
        except HelloError as exc:
            self._count("bad_hello")
            self._log_once("hello", f"refused a client from {_peer(conn)}: {exc.reason}")
            raise _Refused(exc.code, exc.reason) from None
        if token is not None and header_token is None and not _token_ok(token, hello.token):
            self._count("refused_token")
            self._log_once("token", f"refused a client from {_peer(conn)}: invalid token")
            raise _Refused(CLOSE_POLICY, "invalid token")
        return hello

    def _open(self, conn: "ServerConnection", hello: Hello) -> tuple[str, "StreamHandle", "Subscription"]:
        if len(self._live) >= self.config.max_streams:
            self._count("refused_busy")
            raise _Refused(CLOSE_TRY_LATER, f"too many ingest streams (max {self.config.max_streams}); try later")
        taken = set(self.monitor.stream_ids) | self._live
        for n in range(1, _SUFFIXES + 1):
            stream_id = hello.stream if n == 1 else f"{hello.stream}-{n}"
            if stream_id in taken:
                continue
            # Subscribe first, so the client gets its own `stream` open event.
            sub = self.bus.subscribe(stream_id, self.config.event_buffer)
            try:
                handle = self.monitor.open_stream(
                    stream_id, source="websocket", codec=_CODECS[hello.format], sample_rate=hello.sample_rate,
                    channels=hello.channels, detail=_peer(conn),
                )
            except MonitorError as exc:
                sub.close()
                text = " ".join(str(exc).split())
                if "already open" in text:  # taken in the meantime by another source
                    continue
                self._count("refused_busy")
                raise _Refused(CLOSE_TRY_LATER, text[:120]) from None
            self._live.add(stream_id)
            self._count("streams_opened")
            return stream_id, handle, sub
        self._count("refused_busy")
        raise _Refused(CLOSE_TRY_LATER, f"stream name {hello.stream!r} and its suffixes are all in use")

    async def _send_events(self, conn: "ServerConnection", sub: "Subscription", stream_id: str) -> None:
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

    async def _read_audio(self, conn: "ServerConnection", state: _Connection) -> bool:
        """Read until the client ends (True) or closes (ConnectionClosed)."""
        limit = self.config.max_frame_bytes
        frame_bytes = state.dtype.itemsize * state.channels
        while True:
            message = await conn.recv()
            if isinstance(message, str):
                if _is_end(message):
                    return True
                self._count("bad_messages")
                state.bad_messages += 1
                self._report(state, "bad_message", state.bad_messages,
                             f"text message of {len(message)} characters after the hello ignored: only binary "
                             'audio and {"type": "end"} are expected')
                continue
            size = len(message)
            if size > limit:
                self._count("oversized_frames")
                raise _Refused(CLOSE_TOO_BIG, f"frame of {size} bytes exceeds the limit of {limit}")
            if size % frame_bytes:
                self._count("bad_frames")
                self._count("bad_frame_bytes", size)
                state.bad_frames += 1
                self._report(state, "bad_frame", state.bad_frames,
                             f"binary message of {size} bytes is not a whole number of {frame_bytes}-byte "
                             "sample frames; dropped")
                continue
            self._count("frames")
            self._count("bytes", size)
            if size:
                await self._push(state, np.frombuffer(message, dtype=state.dtype).reshape(-1, state.channels))
            if state.handle.closed:
                # The monitor ended the stream (failure, shutdown): nothing more to take.
                raise _Refused(1011, "stream closed by the monitor")

    async def _push(self, state: _Connection, block: np.ndarray) -> None:
        handle = state.handle
        capacity = handle.capacity
        piece = max(1, capacity // 4)
        headroom = capacity // 8
        for start in range(0, block.shape[0], piece):
            part = block[start:start + piece]
            if handle.free_space < part.shape[0] + headroom:
                self._count("backpressure_waits")
                # Not reading the socket meanwhile is the point: TCP slows the sender.
                while handle.free_space < part.shape[0] + headroom and not handle.closed:
                    await asyncio.sleep(0.01)
            if handle.closed:
                return
            handle.push(part)
            state.samples += int(part.shape[0])
            await self._pace(state)

    async def _pace(self, state: _Connection) -> None:
        speed = self.config.max_speed
        if speed is None:
            return
        elapsed = time.monotonic() - state.started
        ahead_s = state.samples / state.rate - self.config.burst_s - elapsed * speed
        if ahead_s > 0:
            self._count("speed_waits")
            await asyncio.sleep(ahead_s / speed)

    def _report(self, state: _Connection, code: str, count: int, message: str) -> None:
        """An ``error`` event on the stream the first time ``code`` happens on this connection."""
        if count != 1:
            return
        self._log_once(code, f"stream {state.stream_id}: {message}")
        try:
            emit = getattr(self.monitor, "emit", None) or self.monitor.sink
            emit(events.error_event(state.stream_id, code=code, message=message, count=count, ts=time.time()))
        except Exception:  # noqa: BLE001 - a consumer's failure must not end this client
            pass


def _is_end(message: str) -> bool:
    if len(message) > 200:
        return False
    try:
        obj = json.loads(message)
    except (ValueError, RecursionError):
        return False
    return isinstance(obj, dict) and obj.get("type") == "end"


def _peer(conn: "ServerConnection") -> str:
    try:
        addr = conn.remote_address
    except Exception:  # noqa: BLE001 - the transport may already be gone
        return "unknown"
    if isinstance(addr, tuple) and len(addr) >= 2:
        return f"{addr[0]}:{addr[1]}"
    return str(addr)


def make_ingest_handler(
    monitor: "Monitor",
    *,
    bus: "EventBus",
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
    monitor: "Monitor", bus: "EventBus", args: argparse.Namespace, token: str | None | _FromEnv = TOKEN_FROM_ENV
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
