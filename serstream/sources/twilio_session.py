"""One Twilio Media Streams connection as a pure state machine: JSON text in, call decisions out.

No sockets, no clocks, no event loop: the asyncio handler in
:mod:`serstream.sources.twilio` reads the WebSocket and hands each message,
with the time it arrived, to a :class:`TwilioSession`; what comes back says
which party streams to open, what audio to push where, what to count and
report, and when to close. So every rule below is testable (and fuzzable)
without a server.

The protocol is Twilio's (docs/telephony.md has the page): ``connected``,
then one ``start`` (``start.callSid``, ``start.streamSid``, ``start.tracks``,
``start.mediaFormat`` ``{encoding: "audio/x-mulaw", sampleRate: 8000,
channels: 1}``, ``start.customParameters``), then ``media`` messages
(``media.track``, ``media.chunk``, ``media.timestamp`` in milliseconds since
the stream started, as a string, ``media.payload`` base64), ``dtmf`` and
``mark`` along the way, and ``stop`` at the end. The Telnyx variant (snake
case: ``stream_id``, ``start.call_control_id``, ``start.media_format``
``{encoding: "PCMU", sample_rate: 8000, channels: 1}``) is read by the same
code; where it names no ``tracks``, a track's stream opens at its first
``media`` message.

Each track is its own party stream of the call: ``twilio:<callSid>:inbound``
(role ``inbound``) and ``twilio:<callSid>:outbound`` (role ``outbound``).
Audio is placed on the stream clock by ``media.timestamp``: time 0 is the
stream start, a gap before a chunk is filled with silence (at most
``max_gap_s`` per gap; a longer jump moves the track's origin, counted in
``clock_jumps``), a chunk that overlaps audio already placed loses the
overlap, and one that lies wholly in the past (late or duplicate) is dropped.
So both parties' clocks stay aligned with the call's, whatever the chunking.

Every message is either used or counted under a stable cause
(:data:`REJECT_CAUSES`); a :class:`Rejected` decision says whether this is
the first of its cause on this connection (``report``), so the adapter
reports each cause once.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
from dataclasses import dataclass, field
from typing import Any, Final, Mapping, MutableMapping, Sequence

import numpy as np
import numpy.typing as npt

from serstream.codecs import CODECS, Codec

__all__ = [
    "CLOSE_NORMAL",
    "CLOSE_PROTOCOL",
    "CLOSE_UNSUPPORTED",
    "CLOSE_POLICY",
    "TRACKS",
    "REJECT_CAUSES",
    "ENCODINGS",
    "TwilioConfig",
    "StartCall",
    "OpenTrack",
    "TrackAudio",
    "Rejected",
    "Stop",
    "Refuse",
    "Decision",
    "TwilioSession",
    "twilio_signature",
    "signature_ok",
]

CLOSE_NORMAL = 1000
CLOSE_PROTOCOL = 1002
CLOSE_UNSUPPORTED = 1003
CLOSE_POLICY = 1008

#: The tracks a Media Stream can carry; each becomes one party stream (its ``role``).
TRACKS: Final[tuple[str, ...]] = ("inbound", "outbound")

#: Causes of a dropped message (each counted as ``rejected_<cause>`` and reported once per connection).
REJECT_CAUSES: Final[tuple[str, ...]] = (
    "bad_json",  # not JSON, not an object, or no "event" string
    "oversized",  # a text message longer than max_message_chars
    "binary",  # Twilio sends text only
    "unknown_event",
    "media_before_start",
    "bad_media",  # media without a usable track, timestamp or payload
    "bad_base64",  # the payload does not decode
    "unknown_track",  # a track the start did not announce
    "late_chunk",  # wholly before audio already placed (late or duplicate)
    "second_start",
)

#: ``mediaFormat.encoding`` (Twilio) or ``media_format.encoding`` (Telnyx) -> codec registry name.
ENCODINGS: Final[Mapping[str, str]] = {
    "audio/x-mulaw": "pcmu",
    "audio/x-alaw": "pcma",
    "pcmu": "pcmu",
    "pcma": "pcma",
}

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,99}")
_DIGITS = re.compile(r"[0-9]{1,12}")
_MIN_RATE, _MAX_RATE = 8000, 48000


@dataclass(frozen=True)
class TwilioConfig:
    """Limits of one ``/twilio`` connection."""

    max_message_chars: int = 65536  # a longer text message is dropped ("oversized"); media is ~0.3 kB
    max_chunk_s: float = 5.0  # a payload longer than this is dropped ("bad_media")
    max_gap_s: float = 10.0  # silence filled for one timestamp gap; a longer jump moves the origin
    start_timeout_s: float = 10.0  # the start must come this soon after the handshake
    idle_timeout_s: float = 30.0  # no message for this long: the call is closed ("idle timeout")
    max_params: int = 32  # customParameters kept on the stream event (more are counted, left out)
    max_param_chars: int = 200  # longer names or values are cut to this
    max_speed: float | None = 8.0  # intake cap, times real time, after burst_s (None: no cap)
    burst_s: float = 2.0
    #: The server's token; a stream whose handshake carried none must name it in
    #: ``customParameters.token`` (``<Parameter name="token" .../>``): Twilio's
    #: ``<Stream url>`` takes no query string and Twilio sets no headers.
    token: str | None = None
    #: The Twilio account's auth token: every handshake must then carry a valid
    #: ``X-Twilio-Signature`` (HMAC-SHA1 of ``public_url``, else ``wss://<Host><path>``).
    auth_token: str | None = None
    public_url: str | None = None

    def __post_init__(self) -> None:
        if self.max_message_chars < 256:
            raise ValueError(f"max_message_chars must be >= 256, got {self.max_message_chars}")
        for name in ("max_chunk_s", "max_gap_s", "start_timeout_s", "idle_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_speed is not None and self.max_speed < 1:
            raise ValueError(f"max_speed must be >= 1 (times real time) or None, got {self.max_speed}")


# ---------------------------------------------------------------- decisions


@dataclass(frozen=True)
class StartCall:
    """Open the call: one party stream per track in ``tracks`` (more may follow as :class:`OpenTrack`)."""

    call: str
    stream_sid: str
    dialect: str  # "twilio" | "telnyx": the stream id prefix
    tracks: tuple[str, ...]
    codec: Codec
    sample_rate: int
    params: Mapping[str, str]

    def stream_id(self, track: str) -> str:
        """The base stream id of ``track`` (the monitor may add a ``-N`` suffix)."""
        return f"{self.dialect}:{self.call}:{track}"


@dataclass(frozen=True)
class OpenTrack:
    """Open ``track``'s party stream now (a Telnyx stream that named no tracks: at its first media)."""

    track: str


@dataclass(frozen=True)
class TrackAudio:
    """Push ``samples`` (float32 mono, ``silence`` zero frames at the head) to ``track``'s stream."""

    track: str
    samples: npt.NDArray[np.float32]
    silence: int


@dataclass(frozen=True)
class Rejected:
    """A message dropped and counted; ``report`` is True the first time ``cause`` happens here."""

    cause: str
    message: str
    count: int  # this connection's count of ``cause`` so far
    report: bool
    track: str | None = None


@dataclass(frozen=True)
class Stop:
    """Close every party stream with ``reason`` and then the connection (1000)."""

    reason: str


@dataclass(frozen=True)
class Refuse:
    """Close the connection with ``code``/``reason`` (any open party streams too); counted as ``cause``."""

    code: int
    reason: str
    cause: str


Decision = StartCall | OpenTrack | TrackAudio | Rejected | Stop | Refuse


@dataclass
class _Track:
    """Where one track's audio stands on its stream clock (frames at the call's sample rate)."""

    position: int = 0  # frames placed so far (silence included)
    origin: int = 0  # frames the timestamp clock is ahead of the stream clock (after long jumps)
    opened: bool = False


def _str_field(obj: Mapping[str, Any], *names: str) -> str | None:
    for name in names:
        value = obj.get(name)
        if isinstance(value, str) and value:
            return value
    return None


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------- the session


@dataclass
class TwilioSession:
    """The protocol state of one connection (see the module docstring).

    ``counts``: a mapping the session adds every count to (the handler's
    totals; a fresh dict by default). ``self.counts`` holds this connection's
    own. Times are seconds on any monotonic clock the caller chooses.
    ``authenticated``: the handshake already carried the right token (the
    server checked it), so the start need not.
    """

    config: TwilioConfig
    now: float
    totals: MutableMapping[str, int] = field(default_factory=dict)
    authenticated: bool = False
    counts: dict[str, int] = field(default_factory=dict)
    call: StartCall | None = None
    stopped: bool = False
    _tracks: dict[str, _Track] = field(default_factory=dict)
    _started_at: float = 0.0
    _last_message: float = 0.0

    def __post_init__(self) -> None:
        self._started_at = self.now
        self._last_message = self.now

    def _count(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n
        self.totals[key] = self.totals.get(key, 0) + n

    def _reject(self, cause: str, message: str, track: str | None = None) -> Rejected:
        key = f"rejected_{cause}"
        self._count(key)
        count = self.counts[key]
        return Rejected(cause, message, count, count == 1, track)

    def _refuse(self, code: int, reason: str, cause: str) -> Refuse:
        self._count(cause)
        self.stopped = True
        return Refuse(code, reason, cause)

    # ---------------------------------------------------------------- time

    @property
    def deadline(self) -> float:
        """When the connection times out unless a message comes first (start or idle timeout)."""
        if self.call is None:
            return self._started_at + self.config.start_timeout_s
        return self._last_message + self.config.idle_timeout_s

    def expire(self, now: float) -> Refuse | Stop | None:
        """Past :attr:`deadline`: no start (refused, ``no_start``) or an idle call (``idle_timeouts``)."""
        if self.stopped or now < self.deadline:
            return None
        if self.call is None:
            return self._refuse(CLOSE_PROTOCOL, f"no start within {self.config.start_timeout_s:g} s", "no_start")
        self._count("idle_timeouts")
        self.stopped = True
        return Stop("idle timeout")

    def resume(self, now: float) -> None:
        """The adapter was busy (a full ring held the socket unread) until ``now``: idle time counts from here."""
        self._last_message = max(self._last_message, now)

    def pace_delay(self, now: float) -> float:
        """Seconds to wait before reading on, so the intake stays under ``max_speed`` after the burst."""
        speed = self.config.max_speed
        if speed is None or self.call is None or not self._tracks:
            return 0.0
        ahead_s = (max(t.position for t in self._tracks.values()) / self.call.sample_rate
                   - self.config.burst_s - (now - self._started_at) * speed)
        return ahead_s / speed if ahead_s > 0 else 0.0

    # ---------------------------------------------------------------- messages

    def receive(self, message: str | bytes, now: float) -> list[Decision]:
        """One WebSocket message; the decisions to carry out, in order."""
        if self.stopped:
            raise RuntimeError("receive after the session stopped")
        self._last_message = now
        self._count("messages")
        if not isinstance(message, str):
            return [self._reject("binary", f"binary message of {len(message)} bytes ignored: "
                                           "Twilio Media Streams send JSON text")]
        if len(message) > self.config.max_message_chars:
            return [self._reject("oversized", f"text message of {len(message)} characters exceeds "
                                              f"{self.config.max_message_chars}; dropped")]
        try:
            obj = json.loads(message)
        except (ValueError, RecursionError):
            return [self._reject("bad_json", "message is not valid JSON; dropped")]
        if not isinstance(obj, dict) or not isinstance(obj.get("event"), str):
            return [self._reject("bad_json", 'message is not a JSON object with an "event" string; dropped')]
        event = obj["event"]
        if event == "media":
            return self._media(obj)
        if event == "start":
            return [self._start(obj)]
        if event == "stop":
            self._count("stops")
            self.stopped = True
            return [Stop("stop")]
        if event in ("connected", "dtmf", "mark"):
            self._count(event)
            return []
        return [self._reject("unknown_event", f"unknown event {_short(event)} ignored")]

    def _start(self, obj: Mapping[str, Any]) -> Decision:
        if self.call is not None:
            return self._reject("second_start", "a second start message on one stream ignored")
        start = obj.get("start")
        if not isinstance(start, dict):
            return self._refuse(CLOSE_PROTOCOL, "start message lacks its 'start' object", "bad_start")
        telnyx = "media_format" in start or "call_control_id" in start or "stream_id" in obj
        call = _str_field(start, "callSid", "call_control_id", "call_sid")
        stream_sid = _str_field(start, "streamSid") or _str_field(obj, "streamSid", "stream_id") or call
        if call is None or not _NAME.fullmatch(call):
            return self._refuse(CLOSE_PROTOCOL, "start lacks a usable callSid (1-100 letters, digits, ._:@+-)",
                                "bad_start")
        fmt = start.get("mediaFormat", start.get("media_format"))
        if not isinstance(fmt, dict):
            return self._refuse(CLOSE_PROTOCOL, "start lacks its mediaFormat", "bad_start")
        encoding = fmt.get("encoding")
        codec_name = ENCODINGS.get(encoding.lower()) if isinstance(encoding, str) else None
        if codec_name is None:
            return self._refuse(CLOSE_UNSUPPORTED, f"encoding {_short(encoding)} is not supported "
                                                   "(audio/x-mulaw, audio/x-alaw, PCMU, PCMA)", "unknown_encoding")
        rate = fmt.get("sampleRate", fmt.get("sample_rate", 8000))
        if isinstance(rate, str) and _DIGITS.fullmatch(rate):
            rate = int(rate)
        if isinstance(rate, bool) or not isinstance(rate, int) or not _MIN_RATE <= rate <= _MAX_RATE:
            return self._refuse(CLOSE_UNSUPPORTED, f"sampleRate {_short(rate)} is not supported "
                                                   f"({_MIN_RATE}-{_MAX_RATE})", "unknown_encoding")
        channels = fmt.get("channels", 1)
        if channels != 1 or isinstance(channels, bool):
            return self._refuse(CLOSE_UNSUPPORTED, f"channels {_short(channels)} is not supported (1)",
                                "unknown_encoding")
        raw_tracks = start.get("tracks")
        tracks: list[str] = []
        if raw_tracks is not None:
            if not isinstance(raw_tracks, list) or not all(isinstance(t, str) for t in raw_tracks):
                return self._refuse(CLOSE_PROTOCOL, "start 'tracks' must be a list of track names", "bad_start")
            for name in raw_tracks:
                track = _track_name(name)
                if track is None:
                    return self._refuse(CLOSE_PROTOCOL, f"unknown track {_short(name)} in start "
                                                        "(inbound, outbound)", "bad_start")
                if track not in tracks:
                    tracks.append(track)
        raw_params = start.get("customParameters", start.get("custom_parameters"))
        given = raw_params.pop("token", None) if isinstance(raw_params, dict) else None
        expected = self.config.token
        if expected is not None and not self.authenticated and not (
            isinstance(given, str) and hmac.compare_digest(expected.encode("utf-8"), given.encode("utf-8"))
        ):
            return self._refuse(CLOSE_POLICY, "invalid token", "refused_token")
        params = self._params(raw_params)
        self.call = StartCall(
            call=call, stream_sid=stream_sid or call, dialect="telnyx" if telnyx else "twilio",
            tracks=tuple(tracks), codec=CODECS[codec_name], sample_rate=rate, params=params,
        )
        self._count("starts")
        for track in tracks:
            self._tracks[track] = _Track(opened=True)
        return self.call

    def _params(self, raw: Any) -> dict[str, str]:
        if not isinstance(raw, dict):
            if raw is not None:
                self._count("params_dropped")
            return {}
        limit = self.config.max_param_chars
        params: dict[str, str] = {}
        for key, value in raw.items():
            if len(params) >= self.config.max_params:
                self._count("params_dropped")
                continue
            text = value if isinstance(value, str) else _as_text(value)
            params[str(key)[:limit]] = text[:limit]
        return params

    def _media(self, obj: Mapping[str, Any]) -> list[Decision]:
        call = self.call
        if call is None:
            return [self._reject("media_before_start", "media before the start message dropped")]
        media = obj.get("media")
        if not isinstance(media, dict):
            return [self._reject("bad_media", "media message lacks its 'media' object; dropped")]
        raw_track = media.get("track", "inbound")
        track = _track_name(raw_track) if isinstance(raw_track, str) else None
        if track is None:
            return [self._reject("bad_media", f"media track {_short(raw_track)} is not inbound or outbound; dropped")]
        state = self._tracks.get(track)
        decisions: list[Decision] = []
        if state is None:
            if call.tracks:
                return [self._reject("unknown_track", f"media for track {track!r}, which the start did not "
                                                      "announce, dropped", track)]
            state = self._tracks[track] = _Track(opened=True)
            decisions.append(OpenTrack(track))
        stamp = media.get("timestamp")
        if isinstance(stamp, str) and _DIGITS.fullmatch(stamp):
            stamp = int(stamp)
        if isinstance(stamp, bool) or not isinstance(stamp, int) or not 0 <= stamp < 10**12:
            return decisions + [self._reject("bad_media", f"media timestamp {_short(stamp)} is not a whole "
                                                          "number of milliseconds; dropped", track)]
        payload = media.get("payload")
        if not isinstance(payload, str):
            return decisions + [self._reject("bad_media", "media payload is not a string; dropped", track)]
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            return decisions + [self._reject("bad_base64", "media payload is not valid base64; dropped", track)]
        codec = call.codec
        frames = len(data) // codec.bytes_per_sample
        if frames * codec.bytes_per_sample != len(data) or frames > self.config.max_chunk_s * call.sample_rate:
            return decisions + [self._reject("bad_media", f"media payload of {len(data)} bytes is not a whole "
                                                          f"number of samples of at most {self.config.max_chunk_s:g} "
                                                          "s; dropped", track)]
        placed = self._place(state, stamp, frames, call.sample_rate)
        if placed is None:
            return decisions + [self._reject("late_chunk", f"media chunk at {stamp} ms lies before audio already "
                                                           "placed (late or duplicate); dropped", track)]
        silence, skip = placed
        samples = codec.decode(data)
        if skip:
            samples = samples[skip:]
        if silence:
            samples = np.concatenate((np.zeros(silence, dtype=np.float32), samples))
        self._count("chunks")
        return decisions + [TrackAudio(track, samples, silence)]

    def _place(self, state: _Track, stamp_ms: int, frames: int, rate: int) -> tuple[int, int] | None:
        """(silence frames before, frames to skip at the head) for a chunk at ``stamp_ms``; None: late."""
        target = (stamp_ms * rate + 500) // 1000 - state.origin
        tolerance = max(1, rate // 1000)  # timestamps are whole milliseconds
        delta = target - state.position
        silence = skip = 0
        if delta > tolerance:
            limit = int(self.config.max_gap_s * rate)
            if delta > limit:
                state.origin += delta - limit
                self._count("clock_jumps")
                delta = limit
            silence = delta
            self._count("gaps")
            self._count("gap_frames", delta)
        elif delta < -tolerance:
            if target + frames <= state.position + tolerance:
                return None
            skip = state.position - target
            self._count("overlap_frames", skip)
        state.position += silence + frames - skip
        return silence, skip


def twilio_signature(auth_token: str, url: str, params: Mapping[str, str] | None = None) -> str:
    """Twilio's request signature: base64 HMAC-SHA1, keyed by the auth token, of the URL + sorted name/values.

    A WebSocket handshake has no POST parameters, so for ``/twilio`` it is the URL alone.
    """
    text = url + "".join(name + value for name, value in sorted((params or {}).items()))
    digest = hmac.new(auth_token.encode("utf-8"), text.encode("utf-8"), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def signature_ok(auth_token: str, urls: Sequence[str], given: str | None) -> bool:
    """``given`` is the signature of one of ``urls`` (constant-time comparisons)."""
    if not given:
        return False
    expected = [twilio_signature(auth_token, url).encode("ascii") for url in urls]
    return any(hmac.compare_digest(e, given.encode("utf-8", "replace")) for e in expected)


def _track_name(name: str) -> str | None:
    """``inbound``/``outbound`` (also ``inbound_track``/``outbound_track``, as dtmf and Telnyx say)."""
    base = name[:-6] if name.endswith("_track") else name
    return base if base in TRACKS else None


def _as_text(value: Any) -> str:
    """A parameter value that is not a string, as compact JSON (a nesting too deep for it: ``"..."``)."""
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    except (ValueError, RecursionError):
        return "..."
