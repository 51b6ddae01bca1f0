"""One FreeSWITCH ``mod_audio_fork`` connection as a pure state machine: frames in, call decisions out.

No sockets, no clocks: the asyncio handler in :mod:`serstream.sources.fork`
reads the WebSocket and passes each message here with its arrival time.

The protocol (drachtio's ``mod_audio_fork``; docs/telephony.md has the page):
``uuid_audio_fork <uuid> start <wss-url> <mono|mixed|stereo> <8k|16k> [metadata]``
opens a WebSocket (subprotocol ``audio.drachtio.org``) to the URL, sends the
metadata, if any, as the first text message, then binary frames of 16-bit
signed PCM in the host's byte order (little-endian on every machine
FreeSWITCH runs on), one channel for ``mono`` (the caller) and ``mixed``
(both parties summed), two interleaved for ``stereo`` (caller, then callee).
The frames say nothing of their rate or mix, so the server learns them from
the URL query (``?mix=stereo&rate=16k``) or the metadata (``{"mix":
"stereo", "sampleRate": 16000}``); the query wins where both say. Defaults:
``mono``, 8000 Hz (the module's own default rate).

Streams: ``fork:<call>`` (mono: role ``caller``; mixed: no role, both parties
are in it) or, for stereo, ``fork:<call>:caller`` and ``fork:<call>:callee``.
``<call>`` is the query's ``call``, else the metadata's ``call``/``callId``/
``uuid``/``callSid``, else the id the adapter passes in. The metadata's other
fields become the stream event's ``params``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Final, Mapping, MutableMapping

import numpy as np
import numpy.typing as npt

from serstream.codecs import CODECS

__all__ = [
    "CLOSE_PROTOCOL",
    "CLOSE_UNSUPPORTED",
    "SUBPROTOCOL",
    "MIXES",
    "REJECT_CAUSES",
    "ForkConfig",
    "Party",
    "OpenCall",
    "PartyAudio",
    "Rejected",
    "Stop",
    "Refuse",
    "ForkDecision",
    "parse_rate",
    "ForkSession",
]

CLOSE_PROTOCOL = 1002
CLOSE_UNSUPPORTED = 1003

#: The subprotocol mod_audio_fork offers (``MOD_AUDIO_FORK_SUBPROTOCOL_NAME`` changes it there).
SUBPROTOCOL: Final = "audio.drachtio.org"
#: Mix types and the parties (roles) each carries, in channel order.
MIXES: Final[Mapping[str, tuple[str | None, ...]]] = {
    "mono": ("caller",),
    "mixed": (None,),
    "stereo": ("caller", "callee"),
}
#: Causes of a dropped message (counted as ``rejected_<cause>``, reported once per connection).
REJECT_CAUSES: Final[tuple[str, ...]] = ("bad_frame", "oversized")

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,99}")
_CALL_KEYS = ("call", "callId", "callid", "call_id", "uuid", "callSid", "call_uuid")
_MIX_KEYS = ("mix", "mixType", "mix_type")
_RATE_KEYS = ("sampleRate", "sample_rate", "rate", "sampling", "samplingRate")
_MIN_RATE, _MAX_RATE = 8000, 64000
_CODEC = CODECS["s16le"]


def parse_rate(value: Any) -> int | None:
    """``8k``/``16k``/``8000``/16000 ... -> Hz; None unless a multiple of 8000 in 8000-64000 (the module's rule)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        text = value.strip().lower()
        match = re.fullmatch(r"([0-9]{1,3})k|([0-9]{4,5})", text)
        if match is None:
            return None
        value = int(match.group(1)) * 1000 if match.group(1) else int(text)
    if not isinstance(value, int) or not _MIN_RATE <= value <= _MAX_RATE or value % 8000:
        return None
    return value


@dataclass(frozen=True)
class ForkConfig:
    """Limits of one ``/fork`` connection."""

    max_frame_bytes: int = 1 << 20  # a larger binary message is dropped ("oversized")
    max_metadata_chars: int = 16384  # longer metadata is refused
    metadata_timeout_s: float = 10.0  # the first message must come this soon
    idle_timeout_s: float = 30.0  # no message for this long: the call is closed ("idle timeout")
    max_params: int = 32
    max_param_chars: int = 200
    max_speed: float | None = 8.0
    burst_s: float = 2.0


@dataclass(frozen=True)
class Party:
    """One party stream of the call: its base id and role (None: the mixed stream)."""

    stream_id: str
    role: str | None


@dataclass(frozen=True)
class OpenCall:
    """Open one stream per party (channel order), at ``sample_rate``, with ``params`` on the open event."""

    call: str
    mix: str
    sample_rate: int
    parties: tuple[Party, ...]
    params: Mapping[str, str]
    codec_name: str = _CODEC.stream_codec


@dataclass(frozen=True)
class PartyAudio:
    """Samples for each party, in the order of :attr:`OpenCall.parties` (float32, equal lengths)."""

    channels: tuple[npt.NDArray[np.float32], ...]


@dataclass(frozen=True)
class Rejected:
    cause: str
    message: str
    count: int
    report: bool


@dataclass(frozen=True)
class Stop:
    reason: str


@dataclass(frozen=True)
class Refuse:
    code: int
    reason: str
    cause: str


ForkDecision = OpenCall | PartyAudio | Rejected | Stop | Refuse


@dataclass
class ForkSession:
    """The protocol state of one connection.

    ``query``: the handshake URL's query, parsed (name -> first value);
    ``fallback_call``: the call id when neither query nor metadata names one.
    """

    config: ForkConfig
    now: float
    query: Mapping[str, str] = field(default_factory=dict)
    fallback_call: str = "fork"
    totals: MutableMapping[str, int] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    call: OpenCall | None = None
    stopped: bool = False
    frames: int = 0  # sample frames received (the speed cap's measure)
    _started_at: float = 0.0
    _last_message: float = 0.0

    def __post_init__(self) -> None:
        self._started_at = self.now
        self._last_message = self.now

    def _count(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n
        self.totals[key] = self.totals.get(key, 0) + n

    def _reject(self, cause: str, message: str) -> Rejected:
        key = f"rejected_{cause}"
        self._count(key)
        return Rejected(cause, message, self.counts[key], self.counts[key] == 1)

    def _refuse(self, code: int, reason: str, cause: str) -> Refuse:
        self._count(cause)
        self.stopped = True
        return Refuse(code, reason, cause)

    # ---------------------------------------------------------------- time

    @property
    def deadline(self) -> float:
        if self.call is None:
            return self._started_at + self.config.metadata_timeout_s
        return self._last_message + self.config.idle_timeout_s

    def expire(self, now: float) -> Refuse | Stop | None:
        if self.stopped or now < self.deadline:
            return None
        if self.call is None:
            return self._refuse(CLOSE_PROTOCOL, f"no message within {self.config.metadata_timeout_s:g} s",
                                "no_metadata")
        self._count("idle_timeouts")
        self.stopped = True
        return Stop("idle timeout")

    def resume(self, now: float) -> None:
        """The adapter was busy (a full ring held the socket unread) until ``now``: idle time counts from here."""
        self._last_message = max(self._last_message, now)

    def pace_delay(self, now: float) -> float:
        speed = self.config.max_speed
        if speed is None or self.call is None:
            return 0.0
        ahead_s = self.frames / self.call.sample_rate - self.config.burst_s - (now - self._started_at) * speed
        return ahead_s / speed if ahead_s > 0 else 0.0

    # ---------------------------------------------------------------- messages

    def receive(self, message: str | bytes, now: float) -> list[ForkDecision]:
        if self.stopped:
            raise RuntimeError("receive after the session stopped")
        self._last_message = now
        self._count("messages")
        decisions: list[ForkDecision] = []
        if self.call is None:
            opened = self._open(message if isinstance(message, str) else None)
            decisions.append(opened)
            if not isinstance(opened, OpenCall) or isinstance(message, str):
                return decisions
        if isinstance(message, str):
            # mod_audio_fork's send_text / stop <text>: application text, not audio.
            self._count("texts")
            return decisions
        decisions.append(self._audio(message))
        return decisions

    def _open(self, metadata: str | None) -> OpenCall | Refuse:
        meta: dict[str, Any] = {}
        if metadata is None:
            self._count("no_metadata_text")
        elif len(metadata) > self.config.max_metadata_chars:
            return self._refuse(CLOSE_PROTOCOL, f"metadata of {len(metadata)} characters exceeds "
                                                f"{self.config.max_metadata_chars}", "bad_metadata")
        elif metadata.strip():
            try:
                parsed = json.loads(metadata)
            except (ValueError, RecursionError):
                parsed = None
            if isinstance(parsed, dict):
                meta = parsed
            else:
                # Metadata is free text to mod_audio_fork; keep it, but it cannot set the format.
                self._count("metadata_not_json")
                meta = {"metadata": metadata}
        mix = self.query.get("mix") or _first(meta, _MIX_KEYS) or "mono"
        if not isinstance(mix, str) or mix.lower() not in MIXES:
            return self._refuse(CLOSE_UNSUPPORTED, f"mix {mix!r:.40} is not mono, mixed or stereo", "bad_format")
        mix = mix.lower()
        raw_rate = self.query.get("rate") or _first(meta, _RATE_KEYS) or 8000
        rate = parse_rate(raw_rate)
        if rate is None:
            return self._refuse(CLOSE_UNSUPPORTED, f"rate {raw_rate!r:.40} is not 8k-64k (e.g. 8k, 16k, 16000)",
                                "bad_format")
        call = self.query.get("call") or _first(meta, _CALL_KEYS) or self.fallback_call
        if isinstance(call, int) and not isinstance(call, bool):
            call = str(call)
        if not isinstance(call, str) or not _NAME.fullmatch(call):
            return self._refuse(CLOSE_PROTOCOL, "call id must be 1-100 letters, digits and ._:@+-", "bad_metadata")
        roles = MIXES[mix]
        parties = tuple(
            Party(f"fork:{call}" if mix != "stereo" else f"fork:{call}:{role}", role) for role in roles
        )
        self.call = OpenCall(call=call, mix=mix, sample_rate=rate, parties=parties, params=self._params(meta))
        self._count("calls")
        return self.call

    def _params(self, meta: Mapping[str, Any]) -> dict[str, str]:
        limit = self.config.max_param_chars
        params: dict[str, str] = {}
        for key, value in meta.items():
            if key in _MIX_KEYS or key in _RATE_KEYS:
                continue
            if len(params) >= self.config.max_params:
                self._count("params_dropped")
                continue
            text = value if isinstance(value, str) else _as_text(value)
            params[str(key)[:limit]] = text[:limit]
        return params

    def _audio(self, frame: bytes) -> ForkDecision:
        call = self.call
        assert call is not None
        if len(frame) > self.config.max_frame_bytes:
            return self._reject("oversized", f"binary frame of {len(frame)} bytes exceeds "
                                             f"{self.config.max_frame_bytes}; dropped")
        width = _CODEC.bytes_per_sample * len(call.parties)
        if len(frame) % width:
            return self._reject("bad_frame", f"binary frame of {len(frame)} bytes is not a whole number of "
                                             f"{width}-byte sample frames; dropped")
        samples = _CODEC.decode(frame).reshape(-1, len(call.parties))
        self.frames += samples.shape[0]
        self._count("frames")
        self._count("bytes", len(frame))
        return PartyAudio(tuple(np.ascontiguousarray(samples[:, i]) for i in range(len(call.parties))))


def _first(meta: Mapping[str, Any], keys: tuple[str, ...]) -> Any:
    for key in keys:
        value = meta.get(key)
        if value is not None and value != "":
            return value
    return None


def _as_text(value: Any) -> str:
    """A parameter value that is not a string, as compact JSON (a nesting too deep for it: ``"..."``)."""
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    except (ValueError, RecursionError):
        return "..."
