"""A per-SSRC jitter buffer: RTP packets in any order in, frames in order out.

Pure: the caller passes the arrival time ``now`` (seconds, any monotonic
clock) and owns the socket. In-order packets leave at once, so there is no
added latency while the network behaves; a packet that arrives ahead of a
gap is held until the gap fills, until more than ``depth_packets`` are held,
or until it has waited ``max_delay_s``. Then the missing packets are declared
lost and a silence frame stands in for them, its duration taken from the RTP
timestamps (so stream time stays true to the sender's clock). A talkspurt
after suppressed silence (marker bit set, timestamp jump, no sequence gap) is
preceded by silence as long as the pause; silence is capped at
``max_silence_s`` per gap, enough for a VAD to see the pause.

Sequence numbers are extended past their 16-bit wrap (and timestamps compared
modulo 2**32), so a long call crosses the wrap without a hiccup. A jump of
more than ``max_gap`` ahead or ``max_misorder`` back is either a sender
restart or a stray packet; as in RFC 3550 Appendix A.1 the buffer only resyncs
(counted in ``resets``) when the next packet continues the jump, and otherwise
drops the packet (counted in ``late`` if it was behind, ``stray`` if ahead).

Every packet pushed is accounted for exactly once::

    received == emitted + duplicates + late + stray + pending

``reordered`` is not part of that sum: it counts the packets that arrived
after one with a higher sequence number and were still put back in place.
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass
from typing import Callable

from serstream.rtp.packet import RtpPacket

__all__ = ["JitterConfig", "JitterStats", "Frame", "JitterBuffer"]

_SEQ_MOD = 1 << 16
_TS_MOD = 1 << 32
# Lost ranges remembered to tell a late packet from a duplicate; older ones are
# forgotten (a packet that old counts as a duplicate, and is dropped either way).
_LOST_RANGES_KEPT = 64


@dataclass(frozen=True)
class JitterConfig:
    """How long the buffer waits for a gap to fill, and what counts as a restart."""

    depth_packets: int = 4  # packets held behind a gap before the gap is declared lost
    max_delay_s: float | None = 0.1  # longest a held packet waits for a gap (None: no limit)
    max_gap: int = 1000  # a jump further ahead than this is a restart candidate
    max_misorder: int = 100  # a jump further back than this is a restart candidate
    max_silence_s: float = 2.0  # cap on the silence inserted for one gap

    def __post_init__(self) -> None:
        if self.depth_packets < 0:
            raise ValueError(f"depth_packets must be >= 0, got {self.depth_packets}")
        if self.max_delay_s is not None and self.max_delay_s < 0:
            raise ValueError(f"max_delay_s must be >= 0 or None, got {self.max_delay_s}")
        if not 0 < self.max_gap < _SEQ_MOD // 2:
            raise ValueError(f"max_gap must be in 1-{_SEQ_MOD // 2 - 1}, got {self.max_gap}")
        if not 0 < self.max_misorder < _SEQ_MOD // 2:
            raise ValueError(
                f"max_misorder must be in 1-{_SEQ_MOD // 2 - 1}, got {self.max_misorder}"
            )
        if self.max_silence_s < 0:
            raise ValueError(f"max_silence_s must be >= 0, got {self.max_silence_s}")


@dataclass
class JitterStats:
    """Packet counters since the buffer was created."""

    received: int = 0  # packets pushed
    emitted: int = 0  # packets that left as audio frames
    lost: int = 0  # packets never received, replaced by silence
    duplicates: int = 0  # packets already emitted or already held, dropped
    late: int = 0  # packets whose slot was declared lost, or too far behind, dropped
    stray: int = 0  # jumps far ahead not confirmed by the next packet, dropped
    resets: int = 0  # resyncs after a confirmed sequence jump (sender restart)
    reordered: int = 0  # packets used although one with a higher sequence came first (not a drop)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class Frame:
    """One unit of output, in sequence order.

    ``packet`` is None for silence: it stands in for ``lost`` missing packets,
    or (``lost == 0``) for a pause the sender left in its timestamps.
    ``duration`` is in RTP timestamp units.
    """

    sequence: int  # 16-bit sequence number (of the first missing packet, for silence)
    timestamp: int  # RTP timestamp of the first sample
    duration: int
    packet: RtpPacket | None
    lost: int = 0


def _signed32(value: int) -> int:
    return ((value + (_TS_MOD >> 1)) % _TS_MOD) - (_TS_MOD >> 1)


class JitterBuffer:
    """Reorders one SSRC's packets; see the module docstring.

    ``duration_of(packet)`` gives a packet's length in RTP timestamp units (the
    caller knows the payload format); ``clock_rate`` converts the silence cap.
    """

    def __init__(
        self,
        clock_rate: int,
        duration_of: Callable[[RtpPacket], int],
        config: JitterConfig = JitterConfig(),
    ) -> None:
        if clock_rate <= 0:
            raise ValueError(f"clock_rate must be > 0, got {clock_rate}")
        self.config = config
        self.stats = JitterStats()
        self._duration_of = duration_of
        self._max_silence = int(config.max_silence_s * clock_rate)
        self._started = False
        self._run_start = 0  # extended sequence of the first packet since (re)start
        self._next = 0  # extended sequence expected next
        self._held: dict[int, tuple[RtpPacket, float]] = {}
        self._lost_ranges: deque[tuple[int, int]] = deque(maxlen=_LOST_RANGES_KEPT)
        self._candidate: RtpPacket | None = None  # far jump waiting for confirmation
        self._prev_end: int | None = None  # RTP timestamp just past the last emitted packet
        self._prev_duration = 0

    @property
    def pending(self) -> int:
        """Packets received but neither emitted nor dropped yet."""
        return len(self._held) + (self._candidate is not None)

    def push(self, packet: RtpPacket, now: float) -> list[Frame]:
        """Take one packet that arrived at ``now``; return the frames it releases."""
        self.stats.received += 1
        frames: list[Frame] = []
        if not self._started:
            self._restart(packet.sequence)
        delta = self._delta(packet.sequence)
        if delta > self.config.max_gap or delta < -self.config.max_misorder:
            self._far_jump(packet, now, frames)
            return frames
        # The stream carried on where it was: a far packet was not a restart.
        self._drop_candidate()
        extended = self._next + delta
        if extended < self._next:
            if extended < self._run_start or self._declared_lost(extended):
                self.stats.late += 1
            else:
                self.stats.duplicates += 1
            return frames
        if extended in self._held:
            self.stats.duplicates += 1
            return frames
        if self._held and extended < max(self._held):
            self.stats.reordered += 1
        self._held[extended] = (packet, now)
        self._drain(frames)
        self._release_overflow(now, frames)
        return frames

    def poll(self, now: float) -> list[Frame]:
        """Release packets that have waited ``max_delay_s`` for a gap to fill."""
        frames: list[Frame] = []
        self._release_overflow(now, frames)
        return frames

    def flush(self, now: float) -> list[Frame]:
        """Release everything held (gaps between held packets count as lost)."""
        del now  # nothing here depends on time; kept for a uniform interface
        frames: list[Frame] = []
        while self._held:
            self._release_earliest(frames)
        self._drop_candidate()
        return frames

    # -- internals -----------------------------------------------------------

    def _restart(self, sequence: int) -> None:
        self._started = True
        self._run_start = self._next = sequence
        self._held.clear()
        self._lost_ranges.clear()
        self._prev_end = None
        self._prev_duration = 0

    def _delta(self, sequence: int) -> int:
        """Signed distance of a 16-bit sequence number from the one expected next."""
        return ((sequence - self._next + (_SEQ_MOD >> 1)) % _SEQ_MOD) - (_SEQ_MOD >> 1)

    def _drop_candidate(self) -> None:
        if self._candidate is None:
            return
        if self._delta(self._candidate.sequence) < 0:
            self.stats.late += 1
        else:
            self.stats.stray += 1
        self._candidate = None

    def _far_jump(self, packet: RtpPacket, now: float, frames: list[Frame]) -> None:
        candidate = self._candidate
        if candidate is not None and packet.sequence == (candidate.sequence + 1) % _SEQ_MOD:
            # Two packets agree on the new numbering: the sender restarted.
            self._candidate = None
            while self._held:
                self._release_earliest(frames)
            self.stats.resets += 1
            self._restart(candidate.sequence)
            self._held[self._next] = (candidate, now)
            self._held[self._next + 1] = (packet, now)
            self._drain(frames)
            return
        self._drop_candidate()
        self._candidate = packet

    def _declared_lost(self, extended: int) -> bool:
        return any(start <= extended < end for start, end in self._lost_ranges)

    def _drain(self, frames: list[Frame]) -> None:
        """Emit held packets for as long as they continue the sequence."""
        while self._next in self._held:
            packet, _ = self._held.pop(self._next)
            self._emit(packet, 0, frames)

    def _release_earliest(self, frames: list[Frame]) -> None:
        """Give up on the gap before the earliest held packet, then drain."""
        earliest = min(self._held)
        missing = earliest - self._next
        self._lost_ranges.append((self._next, earliest))
        self.stats.lost += missing
        packet, _ = self._held.pop(earliest)
        self._emit(packet, missing, frames)
        self._drain(frames)

    def _release_overflow(self, now: float, frames: list[Frame]) -> None:
        while len(self._held) > self.config.depth_packets:
            self._release_earliest(frames)
        max_delay = self.config.max_delay_s
        if max_delay is None:
            return
        while self._held and min(arrival for _, arrival in self._held.values()) <= now - max_delay:
            self._release_earliest(frames)

    def _emit(self, packet: RtpPacket, missing: int, frames: list[Frame]) -> None:
        """Emit ``packet``, preceded by silence for ``missing`` packets or a timestamp pause."""
        if self._prev_end is not None:
            gap = _signed32(packet.timestamp - self._prev_end)
            if missing:
                # Trust the timestamps unless they contradict the sequence numbers.
                silence = gap if gap > 0 else missing * self._prev_duration
            elif packet.marker:
                # RFC 3551 §4.1: the marker opens a talkspurt after the sender
                # suppressed silence; the timestamp jump is that pause. Without
                # the marker, a jump is sender sloppiness and is not padded.
                silence = max(gap, 0)
            else:
                silence = 0
            silence = min(silence, self._max_silence)
            if silence > 0:
                frames.append(
                    Frame(
                        sequence=self._next % _SEQ_MOD,
                        timestamp=self._prev_end,
                        duration=silence,
                        packet=None,
                        lost=missing,
                    )
                )
        duration = self._duration_of(packet)
        frames.append(Frame(packet.sequence, packet.timestamp, duration, packet))
        self.stats.emitted += 1
        self._next += missing + 1
        self._prev_end = (packet.timestamp + duration) % _TS_MOD
        self._prev_duration = duration
