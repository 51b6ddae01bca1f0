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
(not in the payload map) and ``too_many_streams`` (a new SSRC beyond
``max_streams``, the flood guard). RTCP on a muxed port is counted under
``rtcp`` but not announced: it is normal traffic, not an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Union

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

    def __post_init__(self) -> None:
        if self.idle_timeout_s <= 0:
            raise ValueError(f"idle_timeout_s must be > 0, got {self.idle_timeout_s}")
        if self.max_streams < 1:
            raise ValueError(f"max_streams must be >= 1, got {self.max_streams}")


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


DemuxEvent = Union[StreamOpened, StreamAudio, StreamClosed, RejectNotice]


def stream_id_for(ssrc: int) -> str:
    """The stream id of an SSRC: ``rtp:`` and 8 lowercase hex digits."""
    return f"rtp:{ssrc:08x}"


@dataclass
class _Stream:
    ssrc: int
    stream_id: str
    fmt: PayloadFormat
    jitter: JitterBuffer
    last_seen: float


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
        self._streams: dict[int, _Stream] = {}
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

        self.accepted += 1
        stream.last_seen = now
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
    ) -> _Stream:
        payload_map = self._payload_map

        def duration_of(p: RtpPacket) -> int:
            return payload_frames(payload_map[p.payload_type], len(p.payload))

        stream = _Stream(
            ssrc=packet.ssrc,
            stream_id=stream_id_for(packet.ssrc),
            fmt=fmt,
            jitter=JitterBuffer(fmt.rate, duration_of, self.config.jitter),
            last_seen=now,
        )
        self._streams[packet.ssrc] = stream
        events.append(StreamOpened(packet.ssrc, stream.stream_id, fmt, tuple(addr)))
        return stream

    def _close(self, stream: _Stream, reason: str, now: float, events: list[DemuxEvent]) -> None:
        self._emit_audio(stream, stream.jitter.flush(now), events)
        del self._streams[stream.ssrc]
        stats = stream.jitter.stats.as_dict()
        for key, value in stats.items():
            setattr(self._closed_totals, key, getattr(self._closed_totals, key) + value)
        events.append(StreamClosed(stream.stream_id, reason, stats))

    def _emit_audio(self, stream: _Stream, frames: list[Frame], events: list[DemuxEvent]) -> None:
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
