"""The Python client side of serstream: typed events, an event reader, and an audio pusher.

Reading events from a running monitor::

    import asyncio
    from serstream.client import EmotionEvent, events

    async def main():
        async for event in events("ws://127.0.0.1:8765/events"):
            if isinstance(event, EmotionEvent):
                print(event.stream, event.label, event.confidence)

    asyncio.run(main())

Pushing audio and reading that stream's events (``serstream serve``)::

    async with IngestClient("ws://127.0.0.1:8765/ingest", "call-17", 16000) as client:
        await client.send(samples)          # numpy float32/int16 or raw bytes
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

:func:`parse_event` never raises: a message of an unknown ``type``, of a
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Mapping, Union
from urllib.parse import urlencode, urlsplit, urlunsplit

import numpy as np

from serstream.contract import EVENT_SCHEMA_VERSION

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
    "parse_event",
    "events",
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


# --------------------------------------------------------------------------- events


@dataclass(frozen=True)
class Mood:
    """A stream's smoothed state (the ``smoothed`` field of an emotion event)."""

    label: str
    confidence: float
    probs: dict[str, float]
    arousal: float
    valence: float
    dominance: float


@dataclass(frozen=True, kw_only=True)
class BaseEvent:
    """Fields every event has; ``raw`` is the message as received (all fields, known or not)."""

    type: str
    v: int
    stream: str
    ts: float
    #: The bus-wide event number (``/events`` only; None for ``gap`` events and ``analyze`` output).
    id: int | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True, kw_only=True)
class EmotionEvent(BaseEvent):
    seq: int
    kind: str
    utterance: int
    t0: float
    t1: float
    label: str
    confidence: float
    probs: dict[str, float]
    arousal: float
    valence: float
    dominance: float
    smoothed: Mood
    latency_ms: float
    gender: dict[str, float] | None = None
    model: str | None = None


@dataclass(frozen=True, kw_only=True)
class SpeechEvent(BaseEvent):
    state: str
    t: float
    duration: float | None = None
    reason: str | None = None


@dataclass(frozen=True, kw_only=True)
class StreamEvent(BaseEvent):
    state: str
    source: str
    codec: str
    sample_rate: int
    channels: int
    detail: str | None = None
    reason: str | None = None


@dataclass(frozen=True, kw_only=True)
class StatsEvent(BaseEvent):
    uptime_s: float
    streams: int
    windows_per_s: float
    batches: dict[str, Any]
    queues: dict[str, int]
    drops: dict[str, int]
    latency_ms: dict[str, Any]
    device: str


@dataclass(frozen=True, kw_only=True)
class ErrorEvent(BaseEvent):
    code: str
    message: str
    count: int


@dataclass(frozen=True, kw_only=True)
class FileEvent(BaseEvent):
    file: str
    label: str
    probs: dict[str, float]
    arousal: float
    valence: float
    dominance: float
    segments: int | None = None
    duration_s: float | None = None


@dataclass(frozen=True, kw_only=True)
class GapEvent(BaseEvent):
    """Events this client will never receive: ``lost`` after id ``since`` (see docs/events.md).

    ``reason``: ``history`` (they left the server's history before the
    reconnect), ``overflow`` (this client read too slowly), ``restart`` (its
    last id is from an earlier run of the monitor; this run's history follows) or ``future`` (the
    server does not know ``since``: it restarted; its history follows).
    """

    reason: str
    lost: int
    since: int
    resume_from: int


@dataclass(frozen=True, kw_only=True)
class UnknownEvent(BaseEvent):
    """A message this client cannot read as a known event; ``problem`` says why."""

    problem: str


Event = Union[EmotionEvent, SpeechEvent, StreamEvent, StatsEvent, ErrorEvent, FileEvent, GapEvent, UnknownEvent]


class _Malformed(ValueError):
    pass


# Field kinds: what a JSON value must be to fill a dataclass field.
def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise _Malformed("a string")
    return value


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Malformed("an integer")
    return value


def _num(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Malformed("a number")
    return float(value)


def _obj(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Malformed("an object")
    return dict(value)


def _probs(value: Any) -> dict[str, float]:
    return {str(k): _num(v) for k, v in _obj(value).items()}


def _mood(value: Any) -> Mood:
    obj = _obj(value)
    try:
        return Mood(
            label=_str(obj["label"]), confidence=_num(obj["confidence"]), probs=_probs(obj["probs"]),
            arousal=_num(obj["arousal"]), valence=_num(obj["valence"]), dominance=_num(obj["dominance"]),
        )
    except KeyError as exc:
        raise _Malformed(f"an object with {exc.args[0]!r}") from None


_Spec = dict[str, tuple[Callable[[Any], Any], bool]]  # field -> (converter, required)

_SPECS: dict[str, tuple[type[BaseEvent], _Spec]] = {
    "emotion": (EmotionEvent, {
        "seq": (_int, True), "kind": (_str, True), "utterance": (_int, True), "t0": (_num, True),
        "t1": (_num, True), "label": (_str, True), "confidence": (_num, True), "probs": (_probs, True),
        "arousal": (_num, True), "valence": (_num, True), "dominance": (_num, True),
        "smoothed": (_mood, True), "latency_ms": (_num, True), "gender": (_probs, False),
        "model": (_str, False),
    }),
    "speech": (SpeechEvent, {
        "state": (_str, True), "t": (_num, True), "duration": (_num, False), "reason": (_str, False),
    }),
    "stream": (StreamEvent, {
        "state": (_str, True), "source": (_str, True), "codec": (_str, True), "sample_rate": (_int, True),
        "channels": (_int, True), "detail": (_str, False), "reason": (_str, False),
    }),
    "stats": (StatsEvent, {
        "uptime_s": (_num, True), "streams": (_int, True), "windows_per_s": (_num, True),
        "batches": (_obj, True), "queues": (_obj, True), "drops": (_obj, True), "latency_ms": (_obj, True),
        "device": (_str, True),
    }),
    "error": (ErrorEvent, {"code": (_str, True), "message": (_str, True), "count": (_int, True)}),
    "file": (FileEvent, {
        "file": (_str, True), "label": (_str, True), "probs": (_probs, True), "arousal": (_num, True),
        "valence": (_num, True), "dominance": (_num, True), "segments": (_int, False),
        "duration_s": (_num, False),
    }),
    "gap": (GapEvent, {
        "reason": (_str, True), "lost": (_int, True), "since": (_int, True), "resume_from": (_int, True),
    }),
}

_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning("%s", message)


def _unknown(raw: Mapping[str, Any], problem: str, warn_key: str) -> UnknownEvent:
    _warn_once(warn_key, f"serstream client: {problem} (shown once; such messages become UnknownEvent)")
    v = raw.get("v")
    ts = raw.get("ts")
    return UnknownEvent(
        type=raw.get("type") if isinstance(raw.get("type"), str) else "",
        v=v if isinstance(v, int) and not isinstance(v, bool) else 0,
        stream=raw.get("stream") if isinstance(raw.get("stream"), str) else "",
        ts=float(ts) if isinstance(ts, (int, float)) and not isinstance(ts, bool) else 0.0,
        id=_event_id(raw),
        raw=raw,
        problem=problem,
    )


def _event_id(raw: Mapping[str, Any]) -> int | None:
    """The event's bus number when it has a valid one (an integer >= 1), else None."""
    value = raw.get("id")
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else None


def parse_event(message: str | bytes | Mapping[str, Any]) -> Event:
    """One event from a JSON text (or an already decoded object); never raises."""
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
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        return _unknown(obj, f"an event without a valid schema version 'v' ({version!r})", "bad-version")
    if version > EVENT_SCHEMA_VERSION:
        # The versioning rule (docs/events.md): warn once, then read the fields we know;
        # if those no longer parse, the event falls through to UnknownEvent below.
        _warn_once(f"version-{version}", f"serstream client: events of schema version {version}; this client "
                   f"reads version {EVENT_SCHEMA_VERSION} and keeps the fields it knows (upgrade serstream)")
    spec = _SPECS.get(kind) if isinstance(kind, str) else None
    if spec is None:
        return _unknown(obj, f"an unknown event type {kind!r}", f"type-{kind!r}"[:80])
    cls, fields = spec
    values: dict[str, Any] = {}
    try:
        values["stream"] = _str(obj.get("stream"))
        values["ts"] = _num(obj.get("ts"))
    except _Malformed as exc:
        return _unknown(obj, f"a {kind} event whose 'stream' or 'ts' is not {exc}", f"malformed-{kind}")
    for name, (convert, required) in fields.items():
        if name not in obj or obj[name] is None:
            if required:
                return _unknown(obj, f"a {kind} event without {name!r}", f"malformed-{kind}")
            continue
        try:
            values[name] = convert(obj[name])
        except _Malformed as exc:
            return _unknown(obj, f"a {kind} event whose {name!r} is not {exc}", f"malformed-{kind}")
    return cls(type=kind, v=version, id=_event_id(obj), raw=obj, **values)  # type: ignore[return-value]


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


async def events(
    url: str = DEFAULT_EVENTS_URL,
    *,
    stream: str | None = None,
    reconnect: bool = True,
    max_backoff_s: float = 10.0,
    open_timeout_s: float = 5.0,
    token: str | None = None,
    ca_file: str | Path | None = None,
    since: int | None = None,
    resume: bool = True,
) -> AsyncIterator[Event]:
    """Every event from the monitor's ``/events`` (``stream``: one stream's events plus stats).

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
                event = parse_event(message)
                if event.id is not None:
                    last_id = event.id
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
        self.stream_id: str | None = None
        #: Events the buffer could not keep because nobody read them (oldest dropped first).
        self.events_dropped = 0
        self._event_buffer = int(event_buffer)
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._ws: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._ended = False

    async def __aenter__(self) -> "IngestClient":
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
        try:
            await self._ws.send(json.dumps(hello))
            first = await asyncio.wait_for(self._ws.recv(), self.open_timeout_s)
        except ConnectionClosed:
            raise IngestRefused(self._ws.close_code, self._ws.close_reason or "") from None
        except asyncio.TimeoutError:
            await self._ws.close()
            raise MonitorUnavailable(f"{self.url} accepted the connection but sent no stream event") from None
        event = parse_event(first)
        if isinstance(event, StreamEvent):
            self.stream_id = event.stream
        self._put(event)
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            async for message in self._ws:
                self._put(parse_event(message))
        except ConnectionClosed:
            pass
        finally:
            self._queue.put_nowait(_CLOSED)

    def _put(self, event: Event) -> None:
        if self._queue.qsize() >= self._event_buffer:
            self._queue.get_nowait()
            self.events_dropped += 1
        self._queue.put_nowait(event)

    def _encode(self, samples: np.ndarray | bytes | bytearray | memoryview) -> bytes:
        if isinstance(samples, (bytes, bytearray, memoryview)):
            return bytes(samples)
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

    async def events(self) -> AsyncIterator[Event]:
        """This stream's events until the server closes the connection."""
        while True:
            item = await self._queue.get()
            if item is _CLOSED:
                self._queue.put_nowait(_CLOSED)  # later iterators end at once too
                return
            yield item

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
) -> list[Event]:
    """Push an audio file to ``/ingest`` (synchronously) and return the stream's events.

    The file is sent at its own rate and channel count as f32le, in
    ``chunk_s`` blocks, paced in real time unless ``realtime`` is False (then
    as fast as the server takes it). Returns when the server has sent the
    stream's ``stream`` closed event (or after ``timeout_s`` past the end).
    """
    import soundfile as sf

    try:
        audio_file = sf.SoundFile(str(path))
    except (RuntimeError, OSError) as exc:
        raise OSError(f"cannot read audio file {path}: {' '.join(str(exc).split())}") from None

    async def run() -> list[Event]:
        collected: list[Event] = []
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
