"""Tests for serstream.rtp.session: RtpDemux events, rejects, limits and format changes."""

from __future__ import annotations

import numpy as np
import pytest

from serstream.rtp.g711 import decode_ulaw, encode_alaw, encode_ulaw
from serstream.rtp.jitter import JitterConfig
from serstream.rtp.packet import build_rtp
from serstream.rtp.payload import PayloadFormat, build_payload_map
from serstream.rtp.session import (
    DemuxConfig,
    RejectNotice,
    RtpDemux,
    StreamAudio,
    StreamClosed,
    StreamOpened,
    stream_id_for,
)

ADDR = ("192.0.2.10", 40000)
SSRC = 0x00C0FFEE
PCMU = PayloadFormat("PCMU", 8000, 1)


def tone(n: int, rate: int = 8000, freq: float = 300.0, start: int = 0) -> np.ndarray:
    return 0.5 * np.sin(2 * np.pi * freq * (start + np.arange(n)) / rate)


def pcmu_packet(sequence: int, ssrc: int = SSRC, payload_type: int = 0, marker: bool = False) -> bytes:
    return build_rtp(
        encode_ulaw(tone(160, start=sequence * 160)),
        payload_type=payload_type,
        sequence=sequence % 65536,
        timestamp=(sequence * 160) % (1 << 32),
        ssrc=ssrc,
        marker=marker,
    )


def of(events: list, kind: type) -> list:
    return [event for event in events if isinstance(event, kind)]


def audio(events: list, stream_id: str | None = None) -> np.ndarray:
    pieces = [e.samples for e in of(events, StreamAudio) if stream_id in (None, e.stream_id)]
    return np.concatenate(pieces) if pieces else np.zeros(0, np.float32)


def assert_counted(demux: RtpDemux) -> None:
    assert demux.received == demux.accepted + sum(demux.rejects.values())


def test_stream_id_is_ssrc_in_eight_hex_digits() -> None:
    assert stream_id_for(0xABC) == "rtp:00000abc"
    assert stream_id_for(0xFFFFFFFF) == "rtp:ffffffff"


def test_stream_lifecycle_open_audio_idle_close() -> None:
    demux = RtpDemux(config=DemuxConfig(idle_timeout_s=1.0))
    events = []
    for i in range(50):
        events += demux.receive(pcmu_packet(i), ADDR, now=i * 0.02)
    opened = of(events, StreamOpened)
    assert opened == [StreamOpened(SSRC, "rtp:00c0ffee", PCMU, ADDR)]
    samples = audio(events)
    assert samples.dtype == np.float32 and samples.shape == (50 * 160,)
    assert all(e.rate == 8000 and e.stream_id == "rtp:00c0ffee" for e in of(events, StreamAudio))
    # The audio is the sender's tone, within G.711 quantisation.
    assert np.max(np.abs(samples - tone(8000))) < 0.02
    assert demux.poll(1.5) == []  # last packet at 0.98 s: not idle yet
    closed = demux.poll(2.0)
    assert closed == [StreamClosed("rtp:00c0ffee", "idle", closed[0].stats)]
    assert closed[0].stats["emitted"] == 50 and closed[0].stats["lost"] == 0
    assert demux.stream_ids == ()
    assert demux.totals()["emitted"] == 50
    assert_counted(demux)


def test_reordered_and_lost_packets_become_ordered_audio_with_zeros() -> None:
    demux = RtpDemux(config=DemuxConfig(jitter=JitterConfig(depth_packets=2, max_delay_s=None)))
    events = []
    for t, sequence in enumerate([0, 2, 1, 3, 6, 7, 8, 9]):  # 4 and 5 never arrive
        events += demux.receive(pcmu_packet(sequence), ADDR, now=t * 0.02)
    samples = audio(events)
    expected = tone(10 * 160)
    expected[4 * 160 : 6 * 160] = 0.0
    assert samples.shape == expected.shape
    assert np.max(np.abs(samples - expected)) < 0.02
    assert demux.stream_stats()["rtp:00c0ffee"]["lost"] == 2


def test_poll_releases_audio_held_behind_a_gap() -> None:
    demux = RtpDemux(config=DemuxConfig(jitter=JitterConfig(depth_packets=8, max_delay_s=0.05)))
    demux.receive(pcmu_packet(0), ADDR, 0.0)
    assert of(demux.receive(pcmu_packet(2), ADDR, 0.04), StreamAudio) == []
    released = demux.poll(0.10)
    assert audio(released).shape == (2 * 160,)  # silence for 1, then 2
    assert np.all(audio(released)[:160] == 0.0)


def test_dynamic_l16_payload_type() -> None:
    demux = RtpDemux(build_payload_map(["96=L16/16000/1"]))
    signal = tone(320, rate=16000)
    payload = (signal * 32768).astype(">i2").tobytes()
    events = demux.receive(build_rtp(payload, payload_type=96, sequence=1, timestamp=0, ssrc=7), ADDR, 0.0)
    assert of(events, StreamOpened)[0].fmt == PayloadFormat("L16", 16000, 1)
    (chunk,) = of(events, StreamAudio)
    assert chunk.rate == 16000
    assert np.max(np.abs(chunk.samples - signal)) <= 1 / 32768


def test_unknown_payload_type_is_rejected_and_reported_once() -> None:
    demux = RtpDemux()
    events = []
    for i in range(5):
        events += demux.receive(pcmu_packet(i, payload_type=101), ADDR, i * 0.02)
    notices = of(events, RejectNotice)
    assert len(notices) == 1 and notices[0].cause == "unknown_payload_type"
    assert "payload type 101" in notices[0].message and ADDR[0] in notices[0].message
    assert "\n" not in notices[0].message
    assert demux.rejects == {"unknown_payload_type": 5}
    assert of(events, StreamOpened) == []
    assert_counted(demux)


def test_each_cause_is_reported_once_and_counted_every_time() -> None:
    demux = RtpDemux()
    bad = {
        "truncated": b"\x80\x00",
        "bad_version": b"\x40" + pcmu_packet(1)[1:],
        "bad_payload": build_rtp(b"\x00\x01\x02", payload_type=11, sequence=1, timestamp=0, ssrc=1),
    }
    events = []
    for _ in range(3):
        for data in bad.values():
            events += demux.receive(data, ADDR, 0.0)
    assert [n.cause for n in of(events, RejectNotice)] == list(bad)
    assert demux.rejects == {cause: 3 for cause in bad}
    assert_counted(demux)


def test_rtcp_is_counted_without_a_notice() -> None:
    demux = RtpDemux()
    receiver_report = bytes([0x81, 201, 0, 7]) + bytes(28)
    assert demux.receive(receiver_report, ADDR, 0.0) == []
    assert demux.rejects == {"rtcp": 1}
    assert_counted(demux)


def test_bad_packets_do_not_disturb_a_running_stream() -> None:
    demux = RtpDemux()
    events = []
    for i in range(20):
        events += demux.receive(pcmu_packet(i), ADDR, i * 0.02)
        runt = bytes([0x80, 0x00]) + bytes(i % 10)  # at most 11 bytes: truncated
        events += demux.receive(runt, ADDR, i * 0.02)
    assert audio(events).shape == (20 * 160,)
    assert demux.stream_stats()["rtp:00c0ffee"]["lost"] == 0
    assert demux.rejects == {"truncated": 20}


def test_interleaved_ssrcs_are_separate_streams() -> None:
    demux = RtpDemux()
    events = []
    for i in range(10):
        events += demux.receive(pcmu_packet(i, ssrc=1), ADDR, i * 0.02)
        events += demux.receive(pcmu_packet(1000 + i, ssrc=2), ("192.0.2.11", 5004), i * 0.02)
    assert [e.stream_id for e in of(events, StreamOpened)] == ["rtp:00000001", "rtp:00000002"]
    assert of(events, StreamOpened)[1].addr == ("192.0.2.11", 5004)
    assert audio(events, "rtp:00000001").shape == audio(events, "rtp:00000002").shape == (1600,)
    assert sorted(demux.stream_ids) == ["rtp:00000001", "rtp:00000002"]


def test_new_ssrcs_beyond_the_limit_are_rejected() -> None:
    demux = RtpDemux(config=DemuxConfig(max_streams=2, idle_timeout_s=1.0))
    events = []
    for ssrc in (1, 2, 3, 4):
        events += demux.receive(pcmu_packet(0, ssrc=ssrc), ADDR, 0.0)
    assert len(of(events, StreamOpened)) == 2
    assert [n.cause for n in of(events, RejectNotice)] == ["too_many_streams"]
    assert demux.rejects == {"too_many_streams": 2}
    # Existing streams keep working, and a slot frees when one goes idle.
    assert audio(demux.receive(pcmu_packet(1, ssrc=1), ADDR, 0.9)).size == 160
    closed = of(demux.poll(1.5), StreamClosed)
    assert [c.stream_id for c in closed] == ["rtp:00000002"]
    assert of(demux.receive(pcmu_packet(0, ssrc=3), ADDR, 1.6), StreamOpened)[0].ssrc == 3
    assert_counted(demux)


def test_payload_type_change_at_same_rate_stays_in_the_stream() -> None:
    demux = RtpDemux()
    events = demux.receive(pcmu_packet(0), ADDR, 0.0)
    pcma = build_rtp(encode_alaw(tone(160, start=160)), payload_type=8, sequence=1, timestamp=160, ssrc=SSRC)
    events += demux.receive(pcma, ADDR, 0.02)
    assert len(of(events, StreamOpened)) == 1 and of(events, StreamClosed) == []
    # Each packet is decoded with its own law.
    assert np.max(np.abs(audio(events) - tone(320))) < 0.02


def test_clock_rate_change_closes_and_reopens_the_stream() -> None:
    demux = RtpDemux(build_payload_map(["96=L16/16000/1"]))
    events = demux.receive(pcmu_packet(0), ADDR, 0.0)
    l16 = build_rtp(bytes(640), payload_type=96, sequence=1, timestamp=160, ssrc=SSRC)
    events += demux.receive(l16, ADDR, 0.02)
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["StreamOpened", "StreamAudio", "StreamClosed", "StreamOpened", "StreamAudio"]
    assert events[2].reason == "format_changed"
    assert events[3].fmt == PayloadFormat("L16", 16000, 1)
    assert events[4].rate == 16000 and events[4].samples.shape == (320,)
    assert demux.stream_ids == ("rtp:00c0ffee",)


def test_close_all_flushes_held_audio() -> None:
    demux = RtpDemux(config=DemuxConfig(jitter=JitterConfig(depth_packets=8, max_delay_s=None)))
    demux.receive(pcmu_packet(0), ADDR, 0.0)
    demux.receive(pcmu_packet(2), ADDR, 0.04)
    events = demux.close_all(0.1)
    assert audio(events).shape == (320,)
    (closed,) = of(events, StreamClosed)
    assert closed.reason == "shutdown" and closed.stats["lost"] == 1
    assert demux.stream_ids == ()


def test_duplicates_and_late_packets_are_counted_per_stream() -> None:
    demux = RtpDemux(config=DemuxConfig(jitter=JitterConfig(depth_packets=1, max_delay_s=None)))
    for t, sequence in enumerate([0, 1, 1, 3, 4, 2]):
        demux.receive(pcmu_packet(sequence), ADDR, t * 0.02)
    stats = demux.stream_stats()["rtp:00c0ffee"]
    assert (stats["duplicates"], stats["late"], stats["lost"]) == (1, 1, 1)
    assert demux.accepted == 6


@pytest.mark.parametrize("config", [{"idle_timeout_s": 0}, {"max_streams": 0}])
def test_config_rejects_nonsense(config: dict) -> None:
    with pytest.raises(ValueError):
        DemuxConfig(**config)


def test_decoded_audio_matches_the_codec() -> None:
    demux = RtpDemux()
    payload = bytes(range(160))
    events = demux.receive(build_rtp(payload, payload_type=0, sequence=0, timestamp=0, ssrc=1), ADDR, 0.0)
    assert np.array_equal(audio(events), decode_ulaw(payload))


def test_a_flood_from_one_ssrc_is_capped_counted_once_and_spares_the_others() -> None:
    config = DemuxConfig(max_speed=2.0, burst_s=1.0)
    demux = RtpDemux(config=config)
    events = []
    flood_sequence = 0
    ticks = 150  # 3 s of arrival time, one 20 ms tick each
    for tick in range(ticks):
        now = tick * 0.02
        events += demux.receive(pcmu_packet(tick, ssrc=1), ADDR, now)  # real time
        for _ in range(10):  # ten times real time
            events += demux.receive(pcmu_packet(flood_sequence, ssrc=2), ("192.0.2.66", 5004), now)
            flood_sequence += 1
    # The flood's stream time (its audio plus the silence standing in for its dropped packets) is
    # at least its burst and at most burst + speed x elapsed: 4 s here, where it sent 30 s.
    elapsed = (ticks - 1) * 0.02
    flood_seconds = audio(events, "rtp:00000002").size / 8000
    assert config.burst_s <= flood_seconds <= config.burst_s + config.max_speed * elapsed + 0.02
    flood_accepted = demux.accepted - ticks
    assert 0 < flood_accepted < ticks * 10 // 4
    assert demux.rejects == {"flood": ticks * 10 - flood_accepted}
    notices = of(events, RejectNotice)
    assert [n.cause for n in notices] == ["flood"] and "00000002" in notices[0].message
    assert "\n" not in notices[0].message
    # The well-behaved stream lost nothing and its audio is intact.
    assert demux.stream_stats()["rtp:00000001"]["lost"] == 0
    assert np.max(np.abs(audio(events, "rtp:00000001") - tone(ticks * 160))) < 0.02
    assert_counted(demux)


def test_timestamp_jumps_are_charged_as_the_silence_they_insert() -> None:
    # Every packet claims a 1 s pause before it (marker set): each would add 1 s of silence.
    demux = RtpDemux(config=DemuxConfig(max_speed=2.0, burst_s=3.0))
    for i in range(20):
        data = build_rtp(bytes(160), payload_type=0, sequence=i, timestamp=i * 8000, ssrc=3, marker=True)
        demux.receive(data, ADDR, i * 0.02)
    # The first packet costs 20 ms, each later one 1 s (its pause and itself): 3 s of credit and
    # 0.06 s earned let three of those through; the 0.04 s earned per packet never buys a fourth.
    assert demux.stream_stats()["rtp:00000003"]["emitted"] == 4
    assert demux.rejects == {"flood": 16}


def test_reordered_and_duplicate_packets_cost_no_credit() -> None:
    demux = RtpDemux(config=DemuxConfig(max_speed=1.0, burst_s=0.1, jitter=JitterConfig(max_delay_s=None)))
    order = [0, 2, 1, 1, 2, 3, 5, 4, 6]
    for t, sequence in enumerate(order):
        demux.receive(pcmu_packet(sequence), ADDR, t * 0.02)
    stats = demux.stream_stats()["rtp:00c0ffee"]
    assert demux.rejects == {}
    assert (stats["emitted"], stats["duplicates"], stats["reordered"]) == (7, 2, 2)


@pytest.mark.parametrize("config", [{"max_speed": 0.5}, {"burst_s": 0}])
def test_flood_guard_config_rejects_nonsense(config: dict) -> None:
    with pytest.raises(ValueError):
        DemuxConfig(**config)
