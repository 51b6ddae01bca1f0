"""One Asterisk AudioSocket connection as a pure state machine: bytes in, decisions out.

AudioSocket (Asterisk's ``AudioSocket()`` application, its channel driver and
ARI ``externalMedia`` with ``encapsulation=audiosocket``) is a TCP stream of
messages, each a 3-byte header and a payload:

* byte 0: the type; bytes 1-2: the payload length, unsigned big-endian;
* ``0x00`` hangup (socket closure is also a hangup), ``0x01`` the call's
  UUID (16 bytes, binary), ``0x03`` a DTMF digit (one ASCII byte),
  ``0x10`` signed linear 16-bit mono audio at 8 kHz, little-endian (host
  order on Asterisk), and ``0x11`` to ``0x16`` the same at 12, 16, 24, 32,
  44.1 and 48 kHz (the higher rates of current Asterisk), ``0xff`` an error
  (payload: an optional application code; Asterisk's are bit flags).

No sockets, no clocks, no threads: the adapter (:mod:`serstream.sources.audiosocket`)
hands every received chunk to :meth:`AudioSocketSession.feed` with the time,
calls :meth:`~AudioSocketSession.poll` now and then for the timeouts and
:meth:`~AudioSocketSession.eof` when the peer closes, and carries out what
comes back. So every rule below is testable with plain bytes, including a
message split at every byte boundary.

What comes back:

* :class:`Start`: open the monitor stream (first audio after the UUID; again,
  with ``restart``, when the audio type changes to another rate);
* :class:`Audio`: samples to push (float32 at ``sample_rate``);
* :class:`Rejected`: a message dropped and counted (the connection goes on);
* :class:`Ended`: the connection is over; close the stream with ``reason``.
  ``cause`` names the counted trouble, None for a normal end.

Causes (each counted in :attr:`AudioSocketSession.rejects`):
``unknown_type`` (skipped), ``odd_length`` (audio that is not whole samples,
dropped), and, ending the connection, ``audio_before_uuid``, ``bad_uuid``
(not 16 bytes), ``uuid_changed``, ``peer_error`` (the peer sent ``0xff``),
``truncated`` (closed inside a message: a length beyond the data),
``stalled`` (part of a message, then nothing for ``partial_timeout_s``),
``idle`` (no message for ``idle_timeout_s`` after the UUID: a call that
never hangs up) and ``no_uuid`` (the same before any UUID).
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass
from typing import Final, Mapping

import numpy as np
import numpy.typing as npt

from serstream.codecs import CODECS

__all__ = [
    "HEADER_BYTES",
    "KIND_HANGUP",
    "KIND_UUID",
    "KIND_DTMF",
    "KIND_ERROR",
    "AUDIO_RATES",
    "ASTERISK_ERRORS",
    "CAUSES",
    "ENDING_CAUSES",
    "SessionConfig",
    "SessionState",
    "Start",
    "Audio",
    "Rejected",
    "Ended",
    "Output",
    "AudioSocketSession",
    "message",
]

HEADER_BYTES: Final = 3
KIND_HANGUP: Final = 0x00
KIND_UUID: Final = 0x01
KIND_DTMF: Final = 0x03
KIND_ERROR: Final = 0xFF
#: Audio message type -> sample rate (signed linear 16-bit little-endian mono).
AUDIO_RATES: Final[Mapping[int, int]] = {
    0x10: 8000, 0x11: 12000, 0x12: 16000, 0x13: 24000, 0x14: 32000, 0x15: 44100, 0x16: 48000,
}
#: Asterisk's error codes (single byte, bit flags), for the close reason.
ASTERISK_ERRORS: Final[Mapping[int, str]] = {
    0x01: "hangup of calling party", 0x02: "frame forwarding error", 0x04: "memory (allocation) error",
}
#: Causes that drop one message; the connection goes on.
_SKIP_CAUSES: Final = ("unknown_type", "odd_length")
#: Causes that end the connection.
ENDING_CAUSES: Final = (
    "audio_before_uuid", "bad_uuid", "uuid_changed", "peer_error", "truncated", "stalled", "idle", "no_uuid",
)
#: Every cause a session counts.
CAUSES: Final = _SKIP_CAUSES + ENDING_CAUSES

_S16LE = CODECS["s16le"]


def message(kind: int, payload: bytes = b"") -> bytes:
    """One AudioSocket message (header + payload); ValueError beyond 65,535 payload bytes.

    Used by tests and tools that play the Asterisk side; the session never sends.
    """
    if not 0 <= kind <= 0xFF:
        raise ValueError(f"message type must be a byte, got {kind}")
    if len(payload) > 0xFFFF:
        raise ValueError(f"payload of {len(payload)} bytes does not fit the 16-bit length")
    return bytes((kind, len(payload) >> 8, len(payload) & 0xFF)) + payload


@dataclass(frozen=True)
class SessionConfig:
    """Timeouts and the speed cap of one connection."""

    idle_timeout_s: float = 10.0  # no whole message for this long: the call is closed ("idle"/"no_uuid")
    partial_timeout_s: float = 5.0  # part of a message, then nothing for this long: closed ("stalled")
    max_speed: float | None = 2.0  # audio intake cap, times real time, after burst_s; None: no cap
    burst_s: float = 5.0  # seconds of audio a peer may send ahead of that cap

    def __post_init__(self) -> None:
        if not self.idle_timeout_s > 0:
            raise ValueError(f"idle timeout must be > 0 s, got {self.idle_timeout_s}")
        if not self.partial_timeout_s > 0:
            raise ValueError(f"partial-message timeout must be > 0 s, got {self.partial_timeout_s}")
        if self.max_speed is not None and not self.max_speed >= 1:
            raise ValueError(f"max speed must be >= 1 (times real time) or off, got {self.max_speed}")
        if not self.burst_s >= 0:
            raise ValueError(f"burst must be >= 0 s, got {self.burst_s}")


class SessionState(enum.Enum):
    AWAIT_UUID = "await_uuid"
    IDENTIFIED = "identified"
    ENDED = "ended"


@dataclass(frozen=True)
class Start:
    """Open the stream of ``call_uuid`` at ``sample_rate``; ``restart``: close the current one first."""

    call_uuid: uuid.UUID
    sample_rate: int
    restart: bool = False


@dataclass(frozen=True)
class Audio:
    """Samples to push into the open stream (float32 mono in [-1, 1])."""

    sample_rate: int
    samples: npt.NDArray[np.float32]


@dataclass(frozen=True)
class Rejected:
    """One message dropped and counted; ``count`` is this session's count of ``cause`` so far."""

    cause: str
    message: str
    count: int


@dataclass(frozen=True)
class Ended:
    """The connection is over: close it and the stream (``reason``); ``cause`` None: a normal end."""

    reason: str
    cause: str | None = None
    message: str = ""


Output = Start | Audio | Rejected | Ended


class AudioSocketSession:
    """The protocol state of one connection (see the module docstring).

    ``now`` is seconds on any monotonic clock the caller chooses; the
    session was created at ``now`` (the idle timer starts then).
    """

    def __init__(self, config: SessionConfig, now: float) -> None:
        self.config = config
        self.state = SessionState.AWAIT_UUID
        self.call_uuid: uuid.UUID | None = None
        self.sample_rate: int | None = None
        self._buffer = bytearray()
        self._last_bytes = now
        self._last_message = now
        self._audio_started: float | None = None
        self._paced_until = now
        self.rejects: dict[str, int] = {}
        self.messages = 0
        self.bytes = 0
        self.samples = 0  # audio samples decoded (at whatever rate they came)
        self.audio_seconds = 0.0  # stream time received, the speed cap's measure
        self.dtmf = 0
        self.end: Ended | None = None

    # ------------------------------------------------------------------ input

    @property
    def ended(self) -> bool:
        return self.state is SessionState.ENDED

    @property
    def pending_bytes(self) -> int:
        """Bytes of an incomplete message waiting for the rest."""
        return len(self._buffer)

    def feed(self, data: bytes | bytearray | memoryview, now: float) -> list[Output]:
        """Bytes as they came off the socket (any split); what to do about them."""
        if self.ended or not data:
            return []
        self.bytes += len(data)
        self._last_bytes = now
        buf = self._buffer
        buf += data
        out: list[Output] = []
        offset = 0
        while len(buf) - offset >= HEADER_BYTES:
            kind = buf[offset]
            length = (buf[offset + 1] << 8) | buf[offset + 2]
            end = offset + HEADER_BYTES + length
            if end > len(buf):
                break
            payload = bytes(buf[offset + HEADER_BYTES:end])
            offset = end
            self.messages += 1
            self._last_message = now
            self._handle(kind, payload, now, out)
            if self.ended:
                break
        if self.ended:
            buf.clear()
        else:
            del buf[:offset]
        return out

    def eof(self, now: float) -> list[Output]:
        """The peer closed its side: a normal end, or ``truncated`` inside a message."""
        if self.ended:
            return []
        if self._buffer:
            return [self._finish("truncated", self._partial_text("connection closed"))]
        return [self._finish_ok("closed")]

    def poll(self, now: float) -> list[Output]:
        """The timeouts: ``stalled`` (part of a message), ``idle``/``no_uuid`` (no message)."""
        if self.ended:
            return []
        cfg = self.config
        since = max(self._paced_until, self._last_bytes)
        if self._buffer and now - since >= cfg.partial_timeout_s:
            return [self._finish("stalled", self._partial_text(f"nothing for {cfg.partial_timeout_s:g} s"))]
        quiet = now - max(self._paced_until, self._last_message)
        if quiet >= cfg.idle_timeout_s:
            if self.call_uuid is None:
                return [self._finish("no_uuid", f"no UUID message within {cfg.idle_timeout_s:g} s")]
            return [self._finish("idle", f"no message for {cfg.idle_timeout_s:g} s and no hangup")]
        return []

    def pace_delay(self, now: float) -> float:
        """Seconds to stop reading so the audio stays under ``max_speed`` after the burst.

        The caller simply does not read the socket meanwhile (TCP slows the
        peer); the timeouts do not run while the session asked for the pause.
        """
        speed = self.config.max_speed
        if speed is None or self._audio_started is None:
            return 0.0
        ahead = self.audio_seconds - self.config.burst_s - (now - self._audio_started) * speed
        if ahead <= 0:
            return 0.0
        delay = ahead / speed
        self._paced_until = max(self._paced_until, now + delay)
        return delay

    def hold(self, until: float) -> None:
        """The caller stops reading until ``until`` (back-pressure); the timeouts wait as well."""
        self._paced_until = max(self._paced_until, until)

    # ------------------------------------------------------------------ messages

    def _handle(self, kind: int, payload: bytes, now: float, out: list[Output]) -> None:
        rate = AUDIO_RATES.get(kind)
        if rate is not None:
            self._audio(rate, payload, now, out)
        elif kind == KIND_UUID:
            self._uuid(payload, out)
        elif kind == KIND_HANGUP:
            out.append(self._finish_ok("hangup"))
        elif kind == KIND_DTMF:
            self.dtmf += 1  # ignored: an emotion monitor has no use for key presses
        elif kind == KIND_ERROR:
            out.append(self._finish("peer_error", _error_text(payload)))
        else:
            out.append(self._reject("unknown_type", f"message type 0x{kind:02x} ({len(payload)} bytes) is not "
                                    "AudioSocket; skipped"))

    def _uuid(self, payload: bytes, out: list[Output]) -> None:
        if len(payload) != 16:
            out.append(self._finish("bad_uuid", f"UUID message of {len(payload)} bytes (a UUID is 16)"))
            return
        given = uuid.UUID(bytes=bytes(payload))
        if self.call_uuid is None:
            self.call_uuid = given
            self.state = SessionState.IDENTIFIED
        elif given != self.call_uuid:
            out.append(self._finish("uuid_changed", f"a second UUID {given} on the connection of {self.call_uuid}"))

    def _audio(self, rate: int, payload: bytes, now: float, out: list[Output]) -> None:
        call = self.call_uuid
        if call is None:
            out.append(self._finish("audio_before_uuid", "audio before the UUID message; refused"))
            return
        if len(payload) % 2:
            out.append(self._reject("odd_length", f"audio message of {len(payload)} bytes is not whole 16-bit "
                                    "samples; dropped"))
            return
        if not payload:
            return  # no samples, so no say in the rate either
        if rate != self.sample_rate:
            out.append(Start(call, rate, restart=self.sample_rate is not None))
            self.sample_rate = rate
        if self._audio_started is None:
            self._audio_started = now
        samples = _S16LE.decode(payload)
        self.samples += int(samples.size)
        self.audio_seconds += samples.size / rate
        out.append(Audio(rate, samples))

    # ------------------------------------------------------------------ endings

    def _reject(self, cause: str, text: str) -> Rejected:
        count = self.rejects.get(cause, 0) + 1
        self.rejects[cause] = count
        return Rejected(cause, text, count)

    def _finish(self, cause: str, text: str) -> Ended:
        self.rejects[cause] = self.rejects.get(cause, 0) + 1
        reason = {"peer_error": "error", "stalled": "stalled", "idle": "idle", "no_uuid": "no uuid",
                  "truncated": "truncated"}.get(cause, "protocol error")
        return self._set_end(Ended(reason, cause, text))

    def _finish_ok(self, reason: str) -> Ended:
        return self._set_end(Ended(reason))

    def _set_end(self, end: Ended) -> Ended:
        self.state = SessionState.ENDED
        self.end = end
        self._buffer.clear()
        return end

    def _partial_text(self, what: str) -> str:
        buf = self._buffer
        if len(buf) < HEADER_BYTES:
            return f"{what} after {len(buf)} of the 3 header bytes"
        length = (buf[1] << 8) | buf[2]
        return (f"{what} inside a message of type 0x{buf[0]:02x}: its header says {length} payload bytes, "
                f"{len(buf) - HEADER_BYTES} came")


def _error_text(payload: bytes) -> str:
    if not payload:
        return "the peer reported an error (no code)"
    code = payload[0]
    names = [name for bit, name in ASTERISK_ERRORS.items() if code & bit]
    return f"the peer reported error 0x{code:02x}" + (f" ({', '.join(names)})" if names else "")
