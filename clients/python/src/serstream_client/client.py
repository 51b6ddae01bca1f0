"""The connections of the serstream client: an ``/events`` reader and an ``/ingest`` audio pusher.

Part of the ``serstream-client`` distribution (depends only on
``websockets``; numpy only to send arrays, soundfile only for
:func:`push_file`); the event types come from :mod:`serstream_client.model`.

Reading events from a running monitor::

    import asyncio
    from serstream_client import EmotionEvent, events

    async def main():
        async for event in events("ws://127.0.0.1:8765/events"):
            if isinstance(event, EmotionEvent):
                print(event.stream, event.label, event.confidence)

    asyncio.run(main())

Pushing audio and reading that stream's events (``serstream serve``)::

    async with IngestClient("ws://127.0.0.1:8765/ingest", "call-17", 16000) as client:
        await client.send(samples)          # raw bytes, or numpy float32/int16 (needs numpy)
        await client.end()                  # no more audio: finish and send the last events
        async for event in client.events():
            ...

or, without asyncio, ``push_file(url, "call.wav", "call-17")``.

A monitor with a token (docs/security.md) wants ``token=...`` (sent as
``Authorization: Bearer``); one serving TLS is reached at ``wss://`` and,
with a self-signed or private certificate, ``ca_file=`` (the PEM file of the
certificate or of the CA that signed it). A refused token or origin raises
:class:`AccessDenied`, a certificate that does not verify :class:`TLSFailed`;
neither is retried, since trying again cannot fix them.

:func:`read_event` never raises: a message of an unknown ``type``, of a
newer schema version ``v``, or one that is malformed becomes an
:class:`UnknownEvent` (with a warning logged once per kind of problem), and
fields a client does not know are ignored, as docs/events.md asks of clients.
Connection problems raise :class:`ClientError` subclasses (all
``ConnectionError``) with a one-line message.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Mapping, Sequence
from urllib.parse import urlencode, urlsplit, urlunsplit

if TYPE_CHECKING:
    import numpy as np

from serstream_client.model import (
    EVENT_CLASSES,
    SCHEMA_VERSION,
    BaseEvent,
    EmotionEvent,
    ErrorEvent,
    Event,
    EventError,
    FileEvent,
    GapEvent,
    Mood,
    SpeechEvent,
    StatsEvent,
    StreamEvent,
    UnknownEvent,
    parse_event,
)

__all__ = [
    "ClientError",
    "MonitorUnavailable",
    "BadURL",
    "IngestRefused",
    "AccessDenied",
    "TLSFailed",
    "client_ssl_context",
    "Mood",
    "BaseEvent",
    "EmotionEvent",
    "SpeechEvent",
    "StreamEvent",
    "StatsEvent",
    "ErrorEvent",
    "FileEvent",
    "GapEvent",
    "UnknownEvent",
    "Event",
    "AnyEvent",
    "EventError",
    "parse_event",
    "read_event",
    "events",
    "CallFilter",
    "IngestClient",
    "push_file",
]

log = logging.getLogger(__name__)

DEFAULT_EVENTS_URL = "ws://127.0.0.1:8765/events"
DEFAULT_INGEST_URL = "ws://127.0.0.1:8765/ingest"


# --------------------------------------------------------------------------- errors


class ClientError(ConnectionError):
    """A connection to the monitor failed; the message is one line for people."""


class MonitorUnavailable(ClientError):
    """Nothing answers at the URL (no monitor running there, wrong host or port)."""


class BadURL(ClientError):
    """The URL cannot be a serstream endpoint (wrong scheme, unknown path, not a WebSocket)."""


class IngestRefused(ClientError):
    """The server closed the ingest connection; ``code`` and ``reason`` are its close frame."""

    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(f"the server refused the stream: {reason or 'no reason given'} (close code {code})")
        self.code = code
        self.reason = reason


class AccessDenied(ClientError):
    """The monitor refused the connection: no or a wrong token (HTTP 401), or a forbidden origin (403)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class TLSFailed(ClientError):
    """The TLS handshake failed (most often: the server's certificate does not verify against the CA given)."""


def client_ssl_context(url: str, ca_file: str | Path | None) -> ssl.SSLContext | None:
    """The TLS context for ``url``: None for ``ws://``; for ``wss://`` the system CAs, or ``ca_file`` only.

    Raises :class:`TLSFailed` (one line) when ``ca_file`` cannot be read or is not PEM.
    """
    if urlsplit(url).scheme != "wss":
        if ca_file is not None:
            raise BadURL(f"a CA file needs a wss:// URL, got {url!r}")
        return None
    if ca_file is None:
        return ssl.create_default_context()
    try:
        return ssl.create_default_context(cafile=str(ca_file))
    except FileNotFoundError:
        raise TLSFailed(f"CA file {ca_file} does not exist") from None
    except (ssl.SSLError, OSError, ValueError) as exc:
        reason = " ".join(str(getattr(exc, "reason", None) or exc).split())
        raise TLSFailed(f"CA file {ca_file} is not a PEM certificate file ({reason})") from None


# --------------------------------------------------------------------------- reading messages

#: Anything a client may read: a known event, or an :class:`UnknownEvent` saying why not.
AnyEvent = Event | UnknownEvent

_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning("%s", message)


def _unknown(raw: Mapping[str, Any], problem: str, warn_key: str, malformed: bool = True) -> UnknownEvent:
    _warn_once(warn_key, f"serstream client: {problem} (shown once; such messages become UnknownEvent)")
    v = raw.get("v")
    ts = raw.get("ts")
    event_id = raw.get("id")
    kind = raw.get("type")
    stream = raw.get("stream")
    return UnknownEvent(
        type=kind if isinstance(kind, str) else "",
        v=v if isinstance(v, int) and not isinstance(v, bool) else 0,
        stream=stream if isinstance(stream, str) else "",
        ts=float(ts) if isinstance(ts, (int, float)) and not isinstance(ts, bool) else 0.0,
        id=event_id if isinstance(event_id, int) and not isinstance(event_id, bool) and event_id >= 1 else None,
        raw=raw,
        problem=problem,
        malformed=malformed,
    )


def read_event(message: str | bytes | bytearray | Mapping[str, Any]) -> AnyEvent:
    """One event from a JSON text (or a decoded object); never raises.

    A message of an unknown ``type``, or one that :func:`parse_event` refuses,
    becomes an :class:`UnknownEvent` (a warning is logged once per kind of
    problem); a newer schema version ``v`` is warned about once and read for
    the fields this client knows, as docs/events.md asks of clients.
    """
    if isinstance(message, (str, bytes, bytearray)):
        try:
            obj = json.loads(message)
        except (ValueError, RecursionError):
            return _unknown({}, "a message that is not JSON", "not-json")
    else:
        obj = message
    if not isinstance(obj, Mapping):
        return _unknown({}, f"a JSON {type(obj).__name__} instead of an event object", "not-object")
    kind = obj.get("type")
    version = obj.get("v")
    if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
        _warn_once(f"version-{version}", f"serstream client: events of schema version {version}; this client "
                   f"reads version {SCHEMA_VERSION} and keeps the fields it knows (upgrade serstream-client)")
    if isinstance(kind, str) and kind not in EVENT_CLASSES:
        well_formed = isinstance(version, int) and not isinstance(version, bool) and version >= 1
        return _unknown(obj, f"an unknown event type {kind!r}", f"type-{kind!r}"[:80], malformed=not well_formed)
    try:
        return parse_event(obj)
    except EventError as exc:
        return _unknown(obj, str(exc), f"malformed-{kind!r}"[:80])


# --------------------------------------------------------------------------- connections


def _check_url(url: str, path: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss"):
        raise BadURL(f"{url!r} is not a WebSocket URL; expected ws://HOST:PORT{path}")
    if not parts.hostname:
        raise BadURL(f"{url!r} has no host; expected ws://HOST:PORT{path}")
    return url


def _connect_error(url: str, exc: BaseException) -> ClientError:
    """Turn what ``websockets.connect`` raised into a one-line ClientError."""
    from websockets.exceptions import InvalidHandshake, InvalidStatus, InvalidURI

    if isinstance(exc, InvalidURI):
        return BadURL(f"{url!r} is not a valid WebSocket URL")
    if isinstance(exc, InvalidStatus):
        status = exc.response.status_code
        if status == 401:
            return AccessDenied(f"{url} refused the connection: it needs the monitor's token "
                                "(wrong or missing; pass --token or token=)", status)
        if status == 403:
            return AccessDenied(f"{url} refused the connection (HTTP 403: origin not allowed)", status)
        if status == 503:
            return MonitorUnavailable(f"{url} is busy (HTTP 503: too many connections); retry later")
        if status == 404:
            return BadURL(f"{url} is not a serstream endpoint (HTTP 404); use /events or /ingest")
        return BadURL(f"{url} answered HTTP {status} instead of opening a WebSocket")
    if isinstance(exc, InvalidHandshake):
        return BadURL(f"{url} did not answer as a WebSocket server ({type(exc).__name__})")
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason = exc.verify_message or exc.reason or str(exc)
        return TLSFailed(f"the certificate of {url} does not verify ({reason}); pass the CA that signed it "
                         "with --ca-file / ca_file=")
    if isinstance(exc, ssl.SSLError):
        return TLSFailed(f"TLS with {url} failed ({exc.reason or exc}); is it a wss:// server?")
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return MonitorUnavailable(f"no answer from {url} (timed out); is the monitor running?")
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc) or type(exc).__name__
        return MonitorUnavailable(
            f"no serstream monitor at {url} ({reason}); start one with `serstream serve` or `serstream listen`"
        )
    return MonitorUnavailable(f"cannot connect to {url}: {type(exc).__name__}: {exc}")


def _auth_headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


async def _open(url: str, headers: Mapping[str, str] | None, timeout: float, max_size: int | None,
                ssl_context: ssl.SSLContext | None = None) -> Any:
    from websockets.asyncio.client import connect

    try:
        return await connect(url, additional_headers=dict(headers or {}), open_timeout=timeout,
                             max_size=max_size, compression=None, ssl=ssl_context)
    except Exception as exc:  # noqa: BLE001 - every failure becomes one ClientError line
        raise _connect_error(url, exc) from None


def _with_stream(url: str, stream: str | None) -> str:
    if not stream:
        return url
    parts = urlsplit(url)
    query = (parts.query + "&" if parts.query else "") + urlencode({"stream": stream})
    return urlunsplit(parts._replace(query=query))


def _with_since(url: str, since: int | None) -> str:
    """``url`` asking for the events after ``since`` (replacing a ``since`` already in it)."""
    if since is None:
        return url
    parts = urlsplit(url)
    kept = [pair for pair in parts.query.split("&") if pair and not pair.startswith("since=")]
    return urlunsplit(parts._replace(query="&".join([*kept, f"since={int(since)}"])))


class CallFilter:
    """Which events belong to one call: the ``call=`` option of :func:`events`, usable on its own.

    ``stream`` and ``emotion`` events name their call (schema revision 1.2);
    ``speech`` and ``error`` events name only their stream, so a stream joins
    the call's set when an event of it names the call, and leaves it when its
    ``stream`` closed event has passed (an id may be reused by another call
    later). Monitor-wide ``stats`` and the connection's ``gap`` events pass,
    as they do with ``stream=``. A party's speech event that comes before any
    event of it naming the call (a client that joins mid-call, before that
    party's next estimate) is not recognised: read from an earlier ``since``
    to get the ``stream`` open events.
    """

    def __init__(self, call: str) -> None:
        self.call = call
        #: The call's streams seen so far (stream id -> role, or "" when none was given).
        self.streams: dict[str, str] = {}

    def __call__(self, event: AnyEvent) -> bool:
        if isinstance(event, (StatsEvent, GapEvent)):
            return True
        named = getattr(event, "call", None)
        if isinstance(event, (StreamEvent, EmotionEvent)) and named == self.call:
            if isinstance(event, StreamEvent) and event.state == "closed":
                self.streams.pop(event.stream, None)
            else:
                self.streams[event.stream] = event.role or ""
            return True
        return event.stream in self.streams


async def events(
    url: str = DEFAULT_EVENTS_URL,
    *,
    stream: str | None = None,
    call: str | None = None,
    reconnect: bool = True,
    max_backoff_s: float = 10.0,
    open_timeout_s: float = 5.0,
    token: str | None = None,
    ca_file: str | Path | None = None,
    since: int | None = None,
    resume: bool = True,
) -> AsyncIterator[AnyEvent]:
    """Every event from the monitor's ``/events`` (``stream``: one stream's events plus stats).

    ``call``: only the events of that call's parties (both sides of a
    two-party call, each ``stream``/``emotion`` event naming its ``role``),
    plus stats and gaps; filtered here, by :class:`CallFilter`.

    ``token``: the monitor's token (sent as ``Authorization: Bearer``);
    ``ca_file``: PEM file to verify a ``wss://`` monitor's certificate with
    (default: the system's CAs). :class:`AccessDenied` and :class:`TLSFailed`
    are raised at once, with or without ``reconnect``.

    With ``reconnect`` the iterator outlives a lost connection or a monitor
    restart: it logs one line when the connection is lost, retries with
    exponential backoff (0.5 s doubling up to ``max_backoff_s``, with
    jitter), and logs one line when it is back. With ``resume`` (default) it
    remembers the last event ``id`` it yielded and reconnects with
    ``?since=ID``: the server first sends what was missed (or a
    :class:`GapEvent` saying how many events are gone), so nothing is lost
    silently. ``since`` starts the first connection that way too. Without
    ``reconnect``, a lost or refused connection raises
    :class:`MonitorUnavailable`. A bad URL raises :class:`BadURL` either way.
    """
    from websockets.exceptions import ConnectionClosed

    base = _with_stream(_check_url(url, "/events"), stream)
    wanted = CallFilter(call) if call else None
    target = base
    last_id = since
    context = client_ssl_context(base, ca_file)
    headers = _auth_headers(token)
    backoff = 0.5
    was_connected = False
    outage_logged = False
    while True:
        target = _with_since(base, last_id) if resume or not was_connected else base
        try:
            ws = await _open(target, headers, open_timeout_s, None, context)
        except (AccessDenied, TLSFailed):
            raise
        except ClientError as exc:
            # A server that has answered before and now fails the handshake is
            # most likely half-way through a restart (socket bound, handler not
            # yet serving), so after a first success every failure is retried.
            if not reconnect or (isinstance(exc, BadURL) and not was_connected):
                raise
            if not outage_logged:
                log.warning("%s; retrying (up to every %.0f s)", exc, max_backoff_s)
                outage_logged = True
            await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
            backoff = min(max_backoff_s, backoff * 2)
            continue
        if was_connected:
            log.warning("reconnected to %s", target)
        elif outage_logged:
            log.warning("connected to %s", target)
        was_connected, outage_logged, backoff = True, False, 0.5
        try:
            async for message in ws:
                event = read_event(message)
                if event.id is not None:
                    last_id = event.id
                if wanted is None or wanted(event):
                    yield event
            lost = f"the monitor closed the connection ({ws.close_code} {ws.close_reason})".strip()
        except ConnectionClosed as exc:
            lost = f"connection lost ({exc.rcvd.code if exc.rcvd else 'no close frame'})"
        finally:
            await ws.close()
        if not reconnect:
            raise MonitorUnavailable(f"{target}: {lost}")
        log.warning("disconnected from %s: %s; reconnecting", target, lost)
        outage_logged = True


_CLOSED = object()


class IngestClient:
    """Push audio to ``/ingest`` and read that stream's events (an async context manager).

    ``samples`` given to :meth:`send` as a numpy array are converted to the
    declared ``sample_format`` (float in [-1, 1] or int16; ``[n]`` or
    ``[n, channels]``); ``bytes`` are sent as they are. Entering the context
    sends the hello and waits for the server's ``stream`` open event, so a
    refusal (wrong token, bad format, monitor full) raises
    :class:`IngestRefused` right there; :attr:`stream_id` is then the id the
    server assigned (the requested name, or it with a suffix when taken).
    A monitor with a token refuses a wrong ``token`` at the handshake
    (:class:`AccessDenied`); ``ca_file`` verifies a ``wss://`` monitor.

    A call with one party per channel: ``split=True`` (or ``roles=[...]``, one
    name per channel) makes the server open one stream per channel
    (``<stream>:left``, ``<stream>:right``, ...), all with ``call`` (default:
    the assigned name); :meth:`events` then yields every party's events and
    :attr:`stream_id` is the first party's. ``call``/``role`` without a split
    tag the one stream as a party of a call sent on its own connection.
    """

    def __init__(
        self,
        url: str = DEFAULT_INGEST_URL,
        stream: str = "python",
        sample_rate: int = 16000,
        sample_format: str = "s16le",
        token: str | None = None,
        *,
        channels: int = 1,
        max_frame_bytes: int = 8192,
        open_timeout_s: float = 5.0,
        event_buffer: int = 10_000,
        ca_file: str | Path | None = None,
        split: bool = False,
        roles: Sequence[str] | None = None,
        call: str | None = None,
        role: str | None = None,
    ) -> None:
        if sample_format not in ("s16le", "f32le"):
            raise ValueError(f"sample_format must be 's16le' or 'f32le', got {sample_format!r}")
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        self.url = _check_url(url, "/ingest")
        self._ssl = client_ssl_context(self.url, ca_file)
        self.stream = stream
        self.sample_rate = int(sample_rate)
        self.sample_format = sample_format
        self.channels = int(channels)
        self.token = token
        self.max_frame_bytes = int(max_frame_bytes)
        self.open_timeout_s = float(open_timeout_s)
        self.split = bool(split or roles is not None)
        self.roles = None if roles is None else list(roles)
        self.call = call
        self.role = role
        self.stream_id: str | None = None
        #: Events the buffer could not keep because nobody read them (oldest dropped first).
        self.events_dropped = 0
        self._event_buffer = int(event_buffer)
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._ws: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._ended = False

    async def __aenter__(self) -> IngestClient:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def close_code(self) -> int | None:
        return None if self._ws is None else self._ws.close_code

    @property
    def close_reason(self) -> str | None:
        return None if self._ws is None else self._ws.close_reason

    async def open(self) -> None:
        """Connect, say hello and wait for the ``stream`` open event; IngestRefused if refused."""
        from websockets.exceptions import ConnectionClosed

        self._ws = await _open(self.url, _auth_headers(self.token), self.open_timeout_s, None, self._ssl)
        hello = {"type": "hello", "stream": self.stream, "sample_rate": self.sample_rate,
                 "format": self.sample_format, "channels": self.channels}
        extra = {"split": self.split or None, "roles": self.roles, "call": self.call, "role": self.role}
        hello.update({key: value for key, value in extra.items() if value is not None})
        try:
            await self._ws.send(json.dumps(hello))
            first = await asyncio.wait_for(self._ws.recv(), self.open_timeout_s)
        except ConnectionClosed:
            raise IngestRefused(self._ws.close_code, self._ws.close_reason or "") from None
        except asyncio.TimeoutError:
            await self._ws.close()
            raise MonitorUnavailable(f"{self.url} accepted the connection but sent no stream event") from None
        event = read_event(first)
        if isinstance(event, StreamEvent):
            self.stream_id = event.stream
        self._put(event)
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            async for message in self._ws:
                self._put(read_event(message))
        except ConnectionClosed:
            pass
        finally:
            self._queue.put_nowait(_CLOSED)

    def _put(self, event: AnyEvent) -> None:
        if self._queue.qsize() >= self._event_buffer:
            self._queue.get_nowait()
            self.events_dropped += 1
        self._queue.put_nowait(event)

    def _encode(self, samples: np.ndarray | bytes | bytearray | memoryview) -> bytes:
        if isinstance(samples, (bytes, bytearray, memoryview)):
            return bytes(samples)
        try:
            import numpy as np
        except ImportError:  # pragma: no cover - numpy is an optional dependency of the client
            raise TypeError("sending arrays needs numpy (pip install 'serstream-client[audio]'); "
                            "or send the samples as bytes") from None
        data = np.asarray(samples)
        if data.ndim == 2 and data.shape[1] != self.channels:
            raise ValueError(f"samples have {data.shape[1]} channels, the stream was opened with {self.channels}")
        if data.ndim not in (1, 2):
            raise ValueError(f"samples must be [n] or [n, channels], got shape {data.shape}")
        if self.sample_format == "s16le":
            if data.dtype != np.int16:
                data = np.round(np.clip(np.asarray(data, dtype=np.float64), -1.0, 1.0) * 32767.0)
            return np.ascontiguousarray(data, dtype="<i2").tobytes()
        if data.dtype == np.int16:
            data = data.astype(np.float32) / 32768.0
        return np.ascontiguousarray(data, dtype="<f4").tobytes()

    async def send(self, samples: np.ndarray | bytes | bytearray | memoryview) -> None:
        """Send audio; waits while the server applies backpressure. IngestRefused once closed."""
        from websockets.exceptions import ConnectionClosed

        if self._ws is None:
            raise ClientError("IngestClient is not open; use `async with IngestClient(...)` or await open()")
        payload = self._encode(samples)
        frame = self.channels * (2 if self.sample_format == "s16le" else 4)
        step = max(frame, self.max_frame_bytes - self.max_frame_bytes % frame)
        try:
            for start in range(0, len(payload), step):
                await self._ws.send(payload[start:start + step])
        except ConnectionClosed:
            raise IngestRefused(self._ws.close_code, self._ws.close_reason or "connection closed") from None

    async def end(self) -> None:
        """No more audio: the server finishes the stream, sends its last events and closes."""
        from websockets.exceptions import ConnectionClosed

        if self._ws is None or self._ended:
            return
        self._ended = True
        try:
            await self._ws.send(json.dumps({"type": "end"}))
        except ConnectionClosed:
            pass

    async def events(self) -> AsyncIterator[AnyEvent]:
        """This stream's events until the server closes the connection."""
        while True:
            item = await self._queue.get()
            if item is _CLOSED:
                self._queue.put_nowait(_CLOSED)  # later iterators end at once too
                return
            yield item

    async def abort(self) -> None:
        """Close the connection now, without ending the stream first (the server drops what it holds)."""
        if self._ws is None:
            return
        await self._ws.close()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)

    async def close(self, timeout: float = 10.0) -> None:
        """End the stream (if not yet), wait up to ``timeout`` for the server to close, then close."""
        if self._ws is None:
            return
        await self.end()
        if self._reader is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._reader), timeout)
            except asyncio.TimeoutError:
                pass
        await self._ws.close()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)


def push_file(
    url: str,
    path: str | Path,
    stream: str,
    realtime: bool = True,
    *,
    token: str | None = None,
    chunk_s: float = 0.02,
    timeout_s: float = 30.0,
    ca_file: str | Path | None = None,
) -> list[AnyEvent]:
    """Push an audio file to ``/ingest`` (synchronously) and return the stream's events.

    The file is sent at its own rate and channel count as f32le, in
    ``chunk_s`` blocks, paced in real time unless ``realtime`` is False (then
    as fast as the server takes it). Returns when the server has sent the
    stream's ``stream`` closed event (or after ``timeout_s`` past the end).
    """
    try:
        import soundfile as sf  # type: ignore[import-untyped]
    except ImportError:  # pragma: no cover - soundfile is an optional dependency of the client
        raise OSError("push_file needs soundfile (pip install 'serstream-client[audio]')") from None

    try:
        audio_file = sf.SoundFile(str(path))
    except (RuntimeError, OSError) as exc:
        raise OSError(f"cannot read audio file {path}: {' '.join(str(exc).split())}") from None

    async def run() -> list[AnyEvent]:
        collected: list[AnyEvent] = []
        with audio_file:
            client = IngestClient(url, stream, int(audio_file.samplerate), "f32le", token,
                                  channels=int(audio_file.channels), ca_file=ca_file)
            async with client:
                async def gather() -> None:
                    async for event in client.events():
                        collected.append(event)

                reader = asyncio.create_task(gather())
                block = max(1, int(round(chunk_s * audio_file.samplerate)))
                loop = asyncio.get_running_loop()
                started = loop.time()
                sent = 0
                while True:
                    data = audio_file.read(block, dtype="float32", always_2d=True)
                    if data.shape[0] == 0:
                        break
                    if realtime:
                        due = started + (sent + data.shape[0]) / audio_file.samplerate
                        delay = due - loop.time()
                        if delay > 0:
                            await asyncio.sleep(delay)
                    await client.send(data if client.channels > 1 else data[:, 0])
                    sent += data.shape[0]
                await client.end()
                try:
                    await asyncio.wait_for(reader, timeout_s)
                except asyncio.TimeoutError:
                    reader.cancel()
        return collected

    return asyncio.run(run())
