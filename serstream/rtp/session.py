"""RTP demultiplexer: datagrams from one UDP port in, per-SSRC stream events out.

Pure (Sans-I/O): the UDP adapter hands each datagram with its source address
and arrival time to :meth:`RtpDemux.receive`, calls :meth:`RtpDemux.poll`
now and then (every 20-50 ms is plenty), and feeds the events it gets back
into the monitor. Nothing here raises on bad input: every datagram is either
accepted by a stream or counted in ``rejects`` under a stable cause, and a
:class:`RejectNotice` is returned the first time each cause is seen so the
caller logs one line per cause, not one per packet.

Each SSRC is one stream, with id ``rtp:<ssrc as 8 hex digits>`` and its own
:class:`~serstream.rtp.jitter.JitterBuffer`. Audio leaves as float32 mono at
the payload's own clock rate (the monitor's resampler takes it to 16 kHz).

A payload type change inside a stream: packets whose format has the stream's
clock rate are decoded with their own format in the same stream (a PCMU to
PCMA switch, or L16 mono to stereo, needs nothing downstream). A change of
clock rate closes the stream (reason ``"format_changed"``, its buffered audio
emitted first) and reopens it under the same id with the new format, so the
resampler downstream is rebuilt for the new rate.

Reject causes: those of :func:`~serstream.rtp.packet.parse_rtp`, plus
``bad_payload`` (not a whole number of sample frames), ``unknown_payload_type``
(not in the payload map), ``too_many_streams`` (a new SSRC beyond
``max_streams``, the guard against a flood of SSRCs) and ``flood`` (one SSRC
sending audio faster than ``max_speed`` times real time once its ``burst_s``
of credit is spent). RTCP on a muxed port is counted under ``rtcp`` but not
announced: it is normal traffic, not an error.

The flood guard is a token bucket per stream, in seconds of stream time: it
refills at ``max_speed`` seconds per second of arrival time, holds at most
``burst_s``, and each packet costs how far it moves the stream's clock forward
(its own duration plus any timestamp gap before it, which the jitter buffer
would fill with silence; a reordered or duplicate packet costs nothing). A
packet that costs more than the bucket holds is rejected before the jitter
buffer, so a runaway sender gets at most ``max_speed`` times real time of the
pipeline and the other streams keep theirs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import numpy.typing as npt

from serstream.rtp.jitter import Frame, JitterBuffer, JitterConfig, JitterStats
from serstream.rtp.packet import RtpError, RtpPacket, parse_rtp
from serstream.rtp.payload import (
    STATIC_PAYLOAD_TYPES,
    PayloadFormat,
    check_payload,
    decode_payload,
    payload_frames,
)

__all__ = [
    "DemuxConfig",
    "StreamOpened",
    "StreamAudio",
    "StreamClosed",
    "RejectNotice",
    "DemuxEvent",
    "RtpDemux",
    "stream_id_for",
]

# Causes that are expected traffic rather than faults: counted, never announced.
_QUIET_CAUSES = frozenset({"rtcp"})


@dataclass(frozen=True)
class DemuxConfig:
    """Limits of one RTP port."""

    idle_timeout_s: float = 5.0  # a stream with no packet for this long is closed
    max_streams: int = 64  # concurrent SSRCs; more are rejected ("too_many_streams")
    jitter: JitterConfig = field(default_factory=JitterConfig)
    max_speed: float | None = 2.0  # stream time per second of arrival, after the burst ("flood"); None: off
    burst_s: float = 5.0  # seconds of stream time a sender may run ahead of max_speed

    def __post_init__(self) -> None:
        if self.idle_timeout_s <= 0:
            raise ValueError(f"idle_timeout_s must be > 0, got {self.idle_timeout_s}")
        if self.max_streams < 1:
            raise ValueError(f"max_streams must be >= 1, got {self.max_streams}")
        if self.max_speed is not None and self.max_speed < 1:
            raise ValueError(f"max_speed must be >= 1 (times real time) or None, got {self.max_speed}")
        if self.burst_s <= 0:
            raise ValueError(f"burst_s must be > 0, got {self.burst_s}")


@dataclass(frozen=True)
class StreamOpened:
    """The first accepted packet of a new SSRC (or of a new clock rate)."""

    ssrc: int
    stream_id: str
    fmt: PayloadFormat
    addr: tuple[Any, ...]


@dataclass(frozen=True, eq=False)
class StreamAudio:
    """Decoded audio in stream order: float32 mono in [-1, 1] at ``rate`` Hz.

    Lost packets and suppressed-silence pauses are already filled with zeros.
    """

    stream_id: str
    samples: npt.NDArray[np.float32]
    rate: int


@dataclass(frozen=True)
class StreamClosed:
    """A stream ended: ``reason`` is "idle", "format_changed" or "shutdown".

    ``stats`` are the stream's final jitter-buffer counters.
    """

    stream_id: str
    reason: str
    stats: Mapping[str, int]


@dataclass(frozen=True)
class RejectNotice:
    """The first rejected packet of a cause; later ones are only counted."""

    cause: str
    message: str


DemuxEvent = StreamOpened | StreamAudio | StreamClosed | RejectNotice


def stream_id_for(ssrc: int) -> str:
    """The stream id of an SSRC: ``rtp:`` and 8 lowercase hex digits."""
    return f"rtp:{ssrc:08x}"


@dataclass
class _SsrcStream:
    ssrc: int
    stream_id: str
    fmt: PayloadFormat
    jitter: JitterBuffer
    last_seen: float
    credit_s: float = 0.0  # flood guard: seconds of stream time this sender may still advance
    credit_at: float = 0.0  # arrival time the credit was last topped up
    horizon: int | None = None  # RTP timestamp just past the furthest packet accepted


_TS_MOD = 1 << 32


def _signed32(value: int) -> int:
    return ((value + (_TS_MOD >> 1)) % _TS_MOD) - (_TS_MOD >> 1)


def _describe(addr: tuple[Any, ...]) -> str:
    return f"{addr[0]}:{addr[1]}" if len(addr) >= 2 else repr(addr)


class RtpDemux:
    """Splits one port's datagrams into streams by SSRC; see the module docstring."""

    def __init__(
        self,
        payload_map: Mapping[int, PayloadFormat] | None = None,
        config: DemuxConfig = DemuxConfig(),
    ) -> None:
        self.config = config
        self._payload_map = dict(STATIC_PAYLOAD_TYPES if payload_map is None else payload_map)
        self._streams: dict[int, _SsrcStream] = {}
        self._closed_totals = JitterStats()
        #: Datagrams given to :meth:`receive`.
        self.received = 0
        #: Datagrams taken by a stream (``received == accepted + sum(rejects.values())``).
        self.accepted = 0
        #: Rejected datagrams per cause.
        self.rejects: dict[str, int] = {}

    @property
    def stream_ids(self) -> tuple[str, ...]:
        """Ids of the open streams."""
        return tuple(stream.stream_id for stream in self._streams.values())

    def stream_stats(self) -> dict[str, dict[str, int]]:
        """Jitter-buffer counters of each open stream (lost, duplicates, late, ...)."""
        return {s.stream_id: s.jitter.stats.as_dict() for s in self._streams.values()}

    def totals(self) -> dict[str, int]:
        """Jitter-buffer counters summed over every stream, open or closed."""
        totals = self._closed_totals.as_dict()
        for stream in self._streams.values():
            for key, value in stream.jitter.stats.as_dict().items():
                totals[key] += value
        return totals

    def receive(
        self, data: bytes | bytearray | memoryview, addr: tuple[Any, ...], now: float
    ) -> list[DemuxEvent]:
        """Take one datagram from ``addr`` that arrived at ``now``; never raises on bad data."""
        self.received += 1
        events: list[DemuxEvent] = []
        try:
            packet = parse_rtp(data)
            fmt = self._payload_map.get(packet.payload_type)
            if fmt is None:
                raise RtpError(
                    "unknown_payload_type",
                    f"payload type {packet.payload_type} is not in the payload map "
                    f"(known: {sorted(self._payload_map)}); add it with PT=ENCODING/RATE[/CHANNELS]",
                )
            check_payload(fmt, packet.payload)
        except RtpError as error:
            self._reject(error, addr, events)
            return events

        stream = self._streams.get(packet.ssrc)
        if stream is not None and fmt.rate != stream.fmt.rate:
            self._close(stream, "format_changed", now, events)
            stream = None
        if stream is None:
            if len(self._streams) >= self.config.max_streams:
                self._reject(
                    RtpError(
                        "too_many_streams",
                        f"new SSRC {packet.ssrc:08x} beyond the limit of "
                        f"{self.config.max_streams} concurrent streams",
                    ),
                    addr,
                    events,
                )
                return events
            stream = self._open(packet, fmt, addr, now, events)

        stream.last_seen = now
        if not self._within_speed(stream, packet, fmt, now):
            self._reject(
                RtpError(
                    "flood",
                    f"SSRC {packet.ssrc:08x} sends faster than {self.config.max_speed:g}x real time "
                    f"beyond a {self.config.burst_s:g} s burst; its excess packets are dropped",
                ),
                addr,
                events,
            )
            return events
        self.accepted += 1
        self._emit_audio(stream, stream.jitter.push(packet, now), events)
        return events

    def poll(self, now: float) -> list[DemuxEvent]:
        """Release audio that waited long enough for a gap; close streams idle past the timeout."""
        events: list[DemuxEvent] = []
        for stream in list(self._streams.values()):
            if now - stream.last_seen > self.config.idle_timeout_s:
                self._close(stream, "idle", now, events)
            else:
                self._emit_audio(stream, stream.jitter.poll(now), events)
        return events

    def close_all(self, now: float, reason: str = "shutdown") -> list[DemuxEvent]:
        """Flush and close every stream (the port is going away)."""
        events: list[DemuxEvent] = []
        for stream in list(self._streams.values()):
            self._close(stream, reason, now, events)
        return events

    # -- internals -----------------------------------------------------------

    def _within_speed(self, stream: _SsrcStream, packet: RtpPacket, fmt: PayloadFormat, now: float) -> bool:
        """Flood guard: charge the packet's advance of the stream clock; False when over the limit."""
        speed = self.config.max_speed
        if speed is None:
            return True
        burst = self.config.burst_s
        duration = payload_frames(fmt, len(packet.payload))
        end = (packet.timestamp + duration) % _TS_MOD
        if stream.horizon is None:
            advance = duration
        else:
            advance = _signed32(end - stream.horizon)
            if advance < -int(burst * fmt.rate):
                # Far behind the furthest packet: the sender restarted its clock; start over from here.
                advance = duration
                stream.horizon = None
        # A timestamp gap becomes at most max_silence_s of inserted silence (jitter buffer).
        cost = max(0, min(advance, duration + int(self.config.jitter.max_silence_s * fmt.rate))) / fmt.rate
        stream.credit_s = min(burst, stream.credit_s + max(0.0, now - stream.credit_at) * speed)
        stream.credit_at = now
        # A full bucket lets any one packet through, so a burst_s below one packet cannot block a stream.
        if cost > stream.credit_s and stream.credit_s < burst:
            return False
        stream.credit_s -= cost
        if stream.horizon is None or advance > 0:
            stream.horizon = end
        return True

    def _reject(self, error: RtpError, addr: tuple[Any, ...], events: list[DemuxEvent]) -> None:
        first = error.cause not in self.rejects
        self.rejects[error.cause] = self.rejects.get(error.cause, 0) + 1
        if first and error.cause not in _QUIET_CAUSES:
            events.append(
                RejectNotice(
                    error.cause,
                    f"rejected RTP packet from {_describe(addr)}: {error.cause}: {error.message} "
                    "(further packets with this cause are counted, not reported)",
                )
            )

    def _open(
        self,
        packet: RtpPacket,
        fmt: PayloadFormat,
        addr: tuple[Any, ...],
        now: float,
        events: list[DemuxEvent],
    ) -> _SsrcStream:
        payload_map = self._payload_map

        def duration_of(p: RtpPacket) -> int:
            return payload_frames(payload_map[p.payload_type], len(p.payload))

        stream = _SsrcStream(
            ssrc=packet.ssrc,
            stream_id=stream_id_for(packet.ssrc),
            fmt=fmt,
            jitter=JitterBuffer(fmt.rate, duration_of, self.config.jitter),
            last_seen=now,
            credit_s=self.config.burst_s,
            credit_at=now,
        )
        self._streams[packet.ssrc] = stream
        events.append(StreamOpened(packet.ssrc, stream.stream_id, fmt, tuple(addr)))
        return stream

    def _close(self, stream: _SsrcStream, reason: str, now: float, events: list[DemuxEvent]) -> None:
        self._emit_audio(stream, stream.jitter.flush(now), events)
        del self._streams[stream.ssrc]
        stats = stream.jitter.stats.as_dict()
        for key, value in stats.items():
            setattr(self._closed_totals, key, getattr(self._closed_totals, key) + value)
        events.append(StreamClosed(stream.stream_id, reason, stats))

    def _emit_audio(self, stream: _SsrcStream, frames: list[Frame], events: list[DemuxEvent]) -> None:
        if not frames:
            return
        pieces = [
            np.zeros(frame.duration, dtype=np.float32)
            if frame.packet is None
            else decode_payload(self._payload_map[frame.packet.payload_type], frame.packet.payload)
            for frame in frames
        ]
        samples = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        if samples.size:
            events.append(StreamAudio(stream.stream_id, samples, stream.fmt.rate))
