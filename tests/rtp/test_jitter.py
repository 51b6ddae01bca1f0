"""Tests for serstream.rtp.jitter: reordering, loss, duplicates, wraparound, restarts."""

from __future__ import annotations

import pytest

from serstream.rtp.jitter import Frame, JitterBuffer, JitterConfig
from serstream.rtp.packet import RtpPacket

SAMPLES = 160  # 20 ms of 8 kHz G.711: one byte per sample


def packet(
    sequence: int, timestamp: int | None = None, marker: bool = False, size: int = SAMPLES
) -> RtpPacket:
    """A packet whose payload names its sequence number, so the output order is visible."""
    if timestamp is None:
        timestamp = (sequence * SAMPLES) % (1 << 32)
    return RtpPacket(
        version=2,
        padding=False,
        extension=False,
        marker=marker,
        payload_type=0,
        sequence=sequence % 65536,
        timestamp=timestamp,
        ssrc=1,
        csrcs=(),
        extension_profile=None,
        extension_data=b"",
        payload=bytes([sequence % 256]) * size,
    )


def make(**config) -> JitterBuffer:
    return JitterBuffer(8000, lambda p: len(p.payload), JitterConfig(**config))


def feed(buffer: JitterBuffer, packets: list[RtpPacket], start: float = 0.0) -> list[Frame]:
    frames: list[Frame] = []
    for i, p in enumerate(packets):
        frames += buffer.push(p, start + i * 0.001)
    return frames


def sequences(frames: list[Frame]) -> list[int | str]:
    """Emitted sequence numbers, with silence shown as 'lost:N' or 'pause'."""
    return [f.packet.sequence if f.packet else (f"lost:{f.lost}" if f.lost else "pause") for f in frames]


def assert_accounted(buffer: JitterBuffer) -> None:
    s = buffer.stats
    assert s.received == s.emitted + s.duplicates + s.late + s.stray + buffer.pending


def test_in_order_packets_leave_immediately() -> None:
    buffer = make()
    for sequence in range(10, 20):
        frames = buffer.push(packet(sequence), 0.0)
        assert sequences(frames) == [sequence]
        assert frames[0].duration == SAMPLES and frames[0].timestamp == sequence * SAMPLES
    assert buffer.stats.lost == 0 and buffer.pending == 0


def test_reordered_packet_is_put_back_in_place() -> None:
    buffer = make()
    frames = feed(buffer, [packet(1), packet(3), packet(4), packet(2), packet(5)])
    assert sequences(frames) == [1, 2, 3, 4, 5]
    assert buffer.stats.lost == 0
    assert_accounted(buffer)


def test_gap_is_declared_lost_when_depth_is_exceeded() -> None:
    buffer = make(depth_packets=2, max_delay_s=None)
    frames = feed(buffer, [packet(1), packet(4), packet(5)])
    assert sequences(frames) == [1]  # 4 and 5 wait for 2 and 3
    frames = buffer.push(packet(6), 0.1)
    assert sequences(frames) == ["lost:2", 4, 5, 6]
    silence = frames[0]
    assert silence.duration == 2 * SAMPLES  # from the timestamps
    assert silence.sequence == 2 and silence.timestamp == 2 * SAMPLES
    assert buffer.stats.lost == 2
    assert_accounted(buffer)


def test_gap_is_declared_lost_after_max_delay() -> None:
    buffer = make(depth_packets=10, max_delay_s=0.06)
    assert sequences(feed(buffer, [packet(1), packet(3)])) == [1]
    assert buffer.poll(0.05) == []  # packet 3 arrived at 0.001: waited 0.049 s
    assert sequences(buffer.poll(0.062)) == ["lost:1", 3]
    assert buffer.stats.lost == 1


def test_packet_after_its_gap_was_given_up_is_late() -> None:
    buffer = make(depth_packets=1, max_delay_s=None)
    feed(buffer, [packet(1), packet(3), packet(4)])  # 2 declared lost
    assert buffer.push(packet(2), 1.0) == []
    assert buffer.stats.late == 1 and buffer.stats.duplicates == 0
    assert_accounted(buffer)


def test_packet_from_before_the_first_one_is_late() -> None:
    buffer = make()
    feed(buffer, [packet(5), packet(6)])
    assert buffer.push(packet(4), 1.0) == []
    assert buffer.stats.late == 1


def test_duplicates_of_emitted_and_held_packets_are_dropped() -> None:
    buffer = make()
    frames = feed(buffer, [packet(1), packet(2), packet(2), packet(4), packet(4), packet(1)])
    assert sequences(frames) == [1, 2]
    assert buffer.stats.duplicates == 3
    assert sequences(buffer.push(packet(3), 1.0)) == [3, 4]
    assert_accounted(buffer)


def test_sequence_wraparound_in_order_and_reordered() -> None:
    buffer = make()
    in_order = [65533, 65534, 65535, 0, 1, 2, 3]
    frames = feed(buffer, [packet(s, timestamp=i * SAMPLES) for i, s in enumerate(in_order)])
    assert sequences(frames) == in_order
    buffer = make()
    shuffled = [65533, 65534, 0, 65535, 1, 3, 2]
    frames = feed(buffer, [packet(s, timestamp=((s + 3) % 65536) * SAMPLES) for s in shuffled])
    assert sequences(frames) == [65533, 65534, 65535, 0, 1, 2, 3]
    assert buffer.stats.lost == 0 and buffer.stats.resets == 0


def test_loss_across_sequence_and_timestamp_wrap() -> None:
    buffer = make(depth_packets=0, max_delay_s=None)
    near_end = (1 << 32) - SAMPLES  # the second packet's timestamp wraps to 0
    frames = feed(buffer, [packet(65535, timestamp=near_end), packet(2, timestamp=2 * SAMPLES)])
    assert sequences(frames) == [65535, "lost:2", 2]
    assert frames[1].duration == 2 * SAMPLES
    assert frames[1].sequence == 0 and frames[1].timestamp == 0


def test_silence_falls_back_to_packet_size_when_timestamps_disagree() -> None:
    buffer = make(depth_packets=0, max_delay_s=None)
    # Timestamps go backwards across the gap: they cannot give a duration.
    frames = feed(buffer, [packet(1, timestamp=10_000), packet(4, timestamp=5_000)])
    assert sequences(frames) == [1, "lost:2", 4]
    assert frames[1].duration == 2 * SAMPLES


def test_silence_is_capped() -> None:
    buffer = make(depth_packets=0, max_delay_s=None, max_silence_s=0.5)
    frames = feed(buffer, [packet(1), packet(3, timestamp=3 * SAMPLES + 80_000)])
    assert frames[1].lost == 1 and frames[1].duration == 4000  # 0.5 s at 8 kHz


def test_marker_after_suppressed_silence_gets_its_pause() -> None:
    buffer = make()
    frames = feed(buffer, [packet(1), packet(2, timestamp=2 * SAMPLES + 4000, marker=True)])
    assert sequences(frames) == [1, "pause", 2]
    assert frames[1].duration == 4000 and frames[1].lost == 0
    assert buffer.stats.lost == 0


def test_timestamp_jump_without_marker_adds_no_silence() -> None:
    buffer = make()
    frames = feed(buffer, [packet(1), packet(2, timestamp=50_000)])
    assert sequences(frames) == [1, 2]


def test_confirmed_far_jump_resets() -> None:
    buffer = make()
    feed(buffer, [packet(100), packet(101)])
    assert buffer.push(packet(30_000, timestamp=7), 1.0) == []  # waits for confirmation
    frames = buffer.push(packet(30_001, timestamp=7 + SAMPLES), 1.02)
    assert sequences(frames) == [30_000, 30_001]
    assert buffer.stats.resets == 1 and buffer.stats.lost == 0
    # The new numbering carries on; a packet of the old run is now late.
    assert buffer.push(packet(102), 1.04) == []
    assert sequences(buffer.push(packet(30_002, timestamp=7 + 2 * SAMPLES), 1.06)) == [30_002]
    assert buffer.stats.late == 1 and buffer.stats.resets == 1
    assert_accounted(buffer)


def test_reset_flushes_packets_held_from_the_old_run() -> None:
    buffer = make()
    feed(buffer, [packet(1), packet(3)])  # 3 waits for 2
    frames = feed(buffer, [packet(20_000), packet(20_001)], start=1.0)
    assert sequences(frames) == ["lost:1", 3, 20_000, 20_001]
    assert buffer.stats.resets == 1


def test_single_stray_packet_is_dropped_and_stream_continues() -> None:
    buffer = make()
    frames = feed(buffer, [packet(1), packet(2), packet(20_000), packet(3), packet(4)])
    assert sequences(frames) == [1, 2, 3, 4]
    assert buffer.stats.stray == 1 and buffer.stats.resets == 0 and buffer.stats.lost == 0
    assert_accounted(buffer)


def test_confirmed_jump_backwards_resets() -> None:
    # A sender restarting with a lower sequence number must not be dropped as late.
    buffer = make()
    feed(buffer, [packet(1000), packet(1001)])
    frames = feed(buffer, [packet(500, timestamp=0), packet(501, timestamp=SAMPLES)], start=1.0)
    assert sequences(frames) == [500, 501]
    assert buffer.stats.resets == 1 and buffer.stats.late == 0


def test_packet_far_behind_is_late_and_stream_continues() -> None:
    buffer = make(max_misorder=100)
    feed(buffer, [packet(1000), packet(1001)])
    frames = feed(buffer, [packet(800), packet(1002)], start=1.0)
    assert sequences(frames) == [1002]
    assert buffer.stats.late == 1 and buffer.stats.resets == 0 and buffer.stats.stray == 0
    assert_accounted(buffer)


def test_flush_releases_everything_held() -> None:
    buffer = make()
    feed(buffer, [packet(1), packet(3), packet(6), packet(20_000)])
    frames = buffer.flush(1.0)
    assert sequences(frames) == ["lost:1", 3, "lost:2", 6]
    assert buffer.pending == 0
    assert buffer.stats.stray == 1  # the unconfirmed far packet
    assert_accounted(buffer)
    assert buffer.flush(2.0) == []


def test_stream_continues_after_flush() -> None:
    buffer = make()
    feed(buffer, [packet(1), packet(2)])
    buffer.flush(1.0)
    assert sequences(buffer.push(packet(3), 1.1)) == [3]


@pytest.mark.parametrize(
    "config",
    [
        {"depth_packets": -1},
        {"max_delay_s": -0.1},
        {"max_gap": 0},
        {"max_gap": 40_000},
        {"max_misorder": 0},
        {"max_silence_s": -1},
    ],
)
def test_config_rejects_nonsense(config: dict) -> None:
    with pytest.raises(ValueError):
        JitterConfig(**config)


def test_clock_rate_must_be_positive() -> None:
    with pytest.raises(ValueError):
        JitterBuffer(0, lambda p: 1)


def test_reordered_packets_are_counted_but_not_as_drops() -> None:
    buffer = make(depth_packets=4, max_delay_s=None)
    # 2 before 1, and 6 before 4 and 5; 3 is lost once 8 overflows the depth, then comes late.
    order = [0, 2, 1, 6, 4, 5, 7, 8, 9, 10, 11, 3]
    frames = feed(buffer, [packet(s) for s in order])
    assert sequences(frames)[:3] == [0, 1, 2]
    s = buffer.stats
    assert s.reordered == 3  # 1, 4 and 5 arrived after a higher number and were still used
    assert (s.late, s.lost, s.duplicates) == (1, 1, 0)  # 3: declared lost, then late (not reordered)
    assert_accounted(buffer)
