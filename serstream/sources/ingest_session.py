"""One ``/ingest`` connection as a pure state machine: messages in, decisions out.

No sockets, no clocks, no event loop: the asyncio handler in
:mod:`serstream.sources.ingest` reads the WebSocket, passes each message (and,
where it matters, the time) to an :class:`IngestSession`, and carries out what
comes back. So the protocol of docs/ingest.md (the hello, the token rules, the
close codes, the per-connection drop counts, the speed cap) is testable
without a server, and the handler stays a thin adapter.

States::

    AWAIT_HELLO --accept_hello--> HELLO_OK --opened--> OPEN --receive(end)--> ENDED
         \\______________________ refused (a Refuse was returned) ____________/

Each decision names the handler-wide counters it adds to (``counts``), so
every refusal and drop is counted in one place.
"""

from __future__ import annotations

import enum
import hmac
import json
import re
from dataclasses import dataclass, field
from typing import Any, Final, Mapping, Sequence

import numpy as np
import numpy.typing as npt

from serstream.codecs import Codec, CodecError, ingest_codec, ingest_formats
from serstream.core.parties import PartySplit, parse_roles, plan_parties

# HelloError fits its reason into a close frame, so the helper lives beside it in errors.py
from serstream.errors import MAX_CLOSE_REASON_BYTES, HelloError, fit_close_reason

__all__ = [
    "CLOSE_NORMAL",
    "CLOSE_PROTOCOL",
    "CLOSE_UNSUPPORTED",
    "CLOSE_INTERNAL",
    "CLOSE_POLICY",
    "CLOSE_TOO_BIG",
    "CLOSE_TRY_LATER",
    "FORMATS",
    "codec_name",
    "MAX_CLOSE_REASON_BYTES",
    "IngestConfig",
    "Hello",
    "HelloError",
    "fit_close_reason",
    "parse_hello",
    "is_end",
    "SessionState",
    "Refuse",
    "Audio",
    "End",
    "Dropped",
    "IngestSession",
]

# Close codes (RFC 6455 §7.4.1).
CLOSE_NORMAL = 1000
CLOSE_PROTOCOL = 1002
CLOSE_UNSUPPORTED = 1003
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL = 1011
CLOSE_TRY_LATER = 1013

#: The hello formats (from the codec registry, serstream/codecs.py).
FORMATS: Final[tuple[str, ...]] = ingest_formats()

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+/-]{0,99}")
# The other sources' id prefixes: an /ingest client must not take a phone call's stream id
# (the call would then get a -2 suffix and its users would read the wrong stream).
_RESERVED_PREFIXES = ("rtp:", "file:", "twilio:", "telnyx:", "fork:", "audiosocket:")
_MAX_RATE = 384_000
_MAX_CHANNELS = 8

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


def _short(value: Any, limit: int = 24) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class Hello:
    """A validated hello.

    ``split``: one stream per channel (the parties of a call, ids
    ``<stream>:<role>``) instead of one mixed stream; ``roles`` names the
    channels' parties (None: ``left``/``right``, :mod:`serstream.core.parties`).
    ``call``/``role`` tag the stream(s): without ``split`` the one stream is
    the party ``role`` of ``call``; with it every party stream has ``call``
    (default: the assigned base name).
    """

    stream: str
    sample_rate: int
    format: str
    channels: int
    token: str | None
    split: bool = False
    roles: tuple[str, ...] | None = None
    call: str | None = None
    role: str | None = None

    @property
    def codec(self) -> Codec:
        return ingest_codec(self.format)

    def parties(self, base: str) -> PartySplit:
        """The party streams of a split hello whose stream got the id ``base`` (``call`` defaults to it)."""
        return plan_parties(base, self.channels, self.roles, self.call)


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
        reserved = " or ".join(_RESERVED_PREFIXES)
        raise HelloError(CLOSE_UNSUPPORTED, f"stream names starting with {reserved} are reserved")
    rate = _int_field(obj, "sample_rate")
    if not 1000 <= rate <= _MAX_RATE:
        raise HelloError(CLOSE_UNSUPPORTED, f"sample_rate {rate} Hz is outside 1000-{_MAX_RATE}")
    fmt = obj.get("format", "s16le")
    if not isinstance(fmt, str) or fmt not in FORMATS:
        raise HelloError(CLOSE_UNSUPPORTED, f"format {_short(fmt)} is not supported (use {' or '.join(FORMATS)})")
    channels = _int_field(obj, "channels", 1)
    if not 1 <= channels <= _MAX_CHANNELS:
        raise HelloError(CLOSE_UNSUPPORTED, f"channels {channels} is outside 1-{_MAX_CHANNELS}")
    token = obj.get("token")
    if token is not None and not isinstance(token, str):
        raise HelloError(CLOSE_PROTOCOL, "hello 'token' must be a string")
    split, roles, call, role = _party_fields(obj, channels)
    return Hello(stream=stream, sample_rate=rate, format=str(fmt), channels=channels, token=token,
                 split=split, roles=roles, call=call, role=role)


def _party_fields(
    obj: Mapping[str, Any], channels: int
) -> tuple[bool, tuple[str, ...] | None, str | None, str | None]:
    """``split``, ``roles``, ``call`` and ``role`` of a hello (two-party calls), checked."""
    split = obj.get("split", False)
    if not isinstance(split, bool):
        raise HelloError(CLOSE_PROTOCOL, "hello 'split' must be true or false")
    raw_roles = obj.get("roles")
    roles: tuple[str, ...] | None = None
    if raw_roles is not None:
        if not isinstance(raw_roles, list):
            raise HelloError(CLOSE_PROTOCOL, "hello 'roles' must be a list of names, one per channel")
        split = True  # naming the channels' parties asks for them
    if split:
        if channels < 2:
            raise HelloError(CLOSE_UNSUPPORTED, "hello 'split' needs 'channels' of 2 or more (one party per channel)")
        try:
            roles = parse_roles(raw_roles, channels) if raw_roles is not None else None
        except ValueError as exc:
            raise HelloError(CLOSE_PROTOCOL, f"hello 'roles': {exc}") from None
    call = obj.get("call")
    if call is not None and (not isinstance(call, str) or not _NAME.fullmatch(call)):
        raise HelloError(CLOSE_PROTOCOL, "hello 'call' must be 1-100 characters: letters, digits and ._:@+/-")
    role = obj.get("role")
    if role is not None:
        if split:
            raise HelloError(CLOSE_PROTOCOL, "hello 'role' names a one-party stream; a split hello names 'roles'")
        try:
            (role,) = parse_roles([role], 1)
        except ValueError as exc:
            raise HelloError(CLOSE_PROTOCOL, f"hello 'role': {exc}") from None
    return split, roles, call, role


def is_end(message: str) -> bool:
    """True for the text ``{"type": "end"}`` (any JSON spelling of it, at most 200 characters)."""
    if len(message) > 200:
        return False
    try:
        obj = json.loads(message)
    except (ValueError, RecursionError):
        return False
    return isinstance(obj, dict) and obj.get("type") == "end"


def _token_ok(expected: str, given: str | None) -> bool:
    return given is not None and hmac.compare_digest(expected.encode("utf-8"), given.encode("utf-8"))


# ---------------------------------------------------------------- decisions


@dataclass(frozen=True)
class Refuse:
    """Close the connection with ``code`` and ``reason``; ``log`` names a once-logged cause."""

    code: int
    reason: str
    counts: Mapping[str, int] = field(default_factory=dict)
    log: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "reason", fit_close_reason(self.reason))


@dataclass(frozen=True)
class Audio:
    """Samples to push: float32 ``[frames, channels]`` (possibly 0 frames)."""

    samples: npt.NDArray[np.float32]
    counts: Mapping[str, int]


@dataclass(frozen=True)
class End:
    """The client sent ``{"type": "end"}``: finish the stream, send its last events, close 1000."""


@dataclass(frozen=True)
class Dropped:
    """A message dropped and counted; ``report`` is True the first time ``code`` happens here."""

    code: str  # bad_message | bad_frame (the error event's code)
    message: str
    count: int  # this connection's count of ``code`` so far
    report: bool
    counts: Mapping[str, int]


class SessionState(enum.Enum):
    AWAIT_HELLO = "await_hello"
    HELLO_OK = "hello_ok"
    OPEN = "open"
    ENDED = "ended"
    REFUSED = "refused"


class IngestSession:
    """The protocol state of one connection (see the module docstring).

    ``header_token``: the ``Authorization: Bearer`` value of the handshake
    (``""`` for another scheme, None when absent). Times are seconds on any
    monotonic clock the caller chooses.
    """

    def __init__(self, config: IngestConfig, header_token: str | None = None) -> None:
        self.config = config
        self.header_token = header_token
        self.state = SessionState.AWAIT_HELLO
        self.hello: Hello | None = None
        self.stream_id: str | None = None  # the first (or only) stream of this connection
        self.stream_ids: tuple[str, ...] = ()
        self.bad_messages = 0
        self.bad_frames = 0
        self.samples = 0  # sample frames pushed (the speed cap's measure)
        self.started = 0.0

    def _refuse(self, code: int, reason: str, counter: str | None, log: str | None = None) -> Refuse:
        self.state = SessionState.REFUSED
        return Refuse(code, reason, {counter: 1} if counter else {}, log)

    # ---------------------------------------------------------------- before the stream

    def check_handshake(self) -> Refuse | None:
        """A wrong ``Authorization`` token is refused before the hello is read."""
        token = self.config.token
        if token is not None and self.header_token is not None and not _token_ok(token, self.header_token):
            return self._refuse(CLOSE_POLICY, "invalid token", "refused_token", log="token")
        return None

    def hello_timed_out(self) -> Refuse:
        return self._refuse(CLOSE_PROTOCOL, f"no hello within {self.config.hello_timeout_s:g} s", "bad_hello")

    def accept_hello(self, message: str | bytes) -> Hello | Refuse:
        """The first message: a valid hello (and token), or the refusal to close with."""
        if self.state is not SessionState.AWAIT_HELLO:
            raise RuntimeError(f"accept_hello in state {self.state.value}")
        try:
            hello = parse_hello(message)
        except HelloError as exc:
            return self._refuse(exc.code, exc.reason, "bad_hello", log="hello")
        token = self.config.token
        if token is not None and self.header_token is None and not _token_ok(token, hello.token):
            return self._refuse(CLOSE_POLICY, "invalid token", "refused_token", log="token")
        self.hello = hello
        self.state = SessionState.HELLO_OK
        return hello

    @property
    def streams_wanted(self) -> int:
        """Streams this connection opens: one per channel when split, else one."""
        hello = self.hello
        return hello.channels if hello is not None and hello.split else 1

    def check_capacity(self, live_streams: int) -> Refuse | None:
        """Refuse (1013) when this connection's streams do not fit beside ``live_streams`` open ones."""
        if live_streams + self.streams_wanted > self.config.max_streams:
            return self._refuse(
                CLOSE_TRY_LATER, f"too many ingest streams (max {self.config.max_streams}); try later", "refused_busy"
            )
        return None

    def open_failed(self, reason: str) -> Refuse:
        """The monitor refused every candidate id (or is full, or stopping): 1013."""
        return self._refuse(CLOSE_TRY_LATER, reason[:120], "refused_busy")

    def opened(self, stream_id: str | Sequence[str], now: float) -> None:
        """The monitor opened this connection's stream (or, split, its party streams in channel order)."""
        if self.state is not SessionState.HELLO_OK:
            raise RuntimeError(f"opened in state {self.state.value}")
        ids = (stream_id,) if isinstance(stream_id, str) else tuple(stream_id)
        if not ids:
            raise ValueError("opened needs at least one stream id")
        self.stream_ids = ids
        self.stream_id = ids[0]
        self.started = now
        self.state = SessionState.OPEN

    # ---------------------------------------------------------------- the stream

    def receive(self, message: str | bytes) -> Audio | End | Dropped | Refuse:
        """One message after the hello."""
        hello = self.hello
        if self.state is not SessionState.OPEN or hello is None:
            raise RuntimeError(f"receive in state {self.state.value}")
        if isinstance(message, str):
            if is_end(message):
                self.state = SessionState.ENDED
                return End()
            self.bad_messages += 1
            return Dropped(
                "bad_message",
                f"text message of {len(message)} characters after the hello ignored: only binary "
                'audio and {"type": "end"} are expected',
                self.bad_messages, self.bad_messages == 1, {"bad_messages": 1},
            )
        size = len(message)
        limit = self.config.max_frame_bytes
        if size > limit:
            return self._refuse(CLOSE_TOO_BIG, f"frame of {size} bytes exceeds the limit of {limit}",
                                "oversized_frames")
        codec = hello.codec
        frame_bytes = codec.bytes_per_sample * hello.channels
        if size % frame_bytes:
            self.bad_frames += 1
            return Dropped(
                "bad_frame",
                f"binary message of {size} bytes is not a whole number of {frame_bytes}-byte sample frames; dropped",
                self.bad_frames, self.bad_frames == 1, {"bad_frames": 1, "bad_frame_bytes": size},
            )
        samples = codec.decode(message).reshape(-1, hello.channels)
        return Audio(samples, {"frames": 1, "bytes": size})

    def pushed(self, frames: int) -> None:
        """``frames`` sample frames went into the stream (the speed cap counts them)."""
        self.samples += frames

    def pace_delay(self, now: float) -> float:
        """Seconds to wait before reading on, so the intake stays under ``max_speed`` after the burst."""
        speed = self.config.max_speed
        hello = self.hello
        if speed is None or hello is None:
            return 0.0
        ahead_s = self.samples / hello.sample_rate - self.config.burst_s - (now - self.started) * speed
        return ahead_s / speed if ahead_s > 0 else 0.0


def codec_name(fmt: str) -> str:
    """The ``codec`` of the ``stream`` open event for an ingest format (``pcm_s16le``, ``pcm_f32le``)."""
    try:
        return ingest_codec(fmt).stream_codec
    except CodecError:
        raise ValueError(f"unknown ingest format {fmt!r}") from None
