"""RTP over real UDP sockets into a real monitor: several SSRCs on one port, with trouble.

The tests' own sender (``build_rtp`` + a UDP socket on loopback) sends three
streams at once, PCMU, PCMA and L16/16000 (dynamic payload type 96), one with
reordered packets, one with duplicates, one with missing packets, and
malformed datagrams in between. Each SSRC must become its own monitor stream
with its own events and counters, and the bad datagrams must be counted and
reported once per cause without disturbing the streams.
"""

from __future__ import annotations

import argparse
import socket
import time
from typing import Any

import numpy as np
import pytest

from serstream.cli import UserError, _rtp_sources, build_parser
from serstream.monitor import Monitor, MonitorConfig, SourceError
from serstream.rtp import build_payload_map, build_rtp, encode_alaw, encode_ulaw
from serstream.sources.base import Source
from serstream.sources.rtp import RtpSource, RtpSourceConfig, parse_listen_address
from tests.audio import speech_with_pauses
from tests.net.conftest import Collector, wait_until

PAYLOAD_MAP = build_payload_map(["96=L16/16000/1"])
PACKET_MS = 20


def packets_for(audio: np.ndarray, ssrc: int, payload_type: int, rate: int) -> list[bytes]:
    """``audio`` (float32 at ``rate``) as 20 ms RTP packets of the payload type's encoding."""
    step = rate * PACKET_MS // 1000
    out = []
    for i, start in enumerate(range(0, audio.size - step + 1, step)):
        block = audio[start:start + step]
        if payload_type == 0:
            payload = encode_ulaw(block)
        elif payload_type == 8:
            payload = encode_alaw(block)
        else:
            payload = (np.clip(block, -1, 1) * 32767).astype(">i2").tobytes()
        out.append(build_rtp(payload, payload_type=payload_type, sequence=(1000 + i) % 65536,
                             timestamp=(5000 + i * step) % (1 << 32), ssrc=ssrc, marker=i == 0))
    return out


def send_interleaved(sock: socket.socket, port: int, streams: list[list[bytes]], extra: dict[int, list[bytes]]) -> int:
    """One packet of each stream per round (about 10x real time); ``extra[round]`` goes out before it."""
    sent = 0
    rounds = max(len(s) for s in streams)
    for r in range(rounds):
        for datagram in extra.get(r, []):
            sock.sendto(datagram, ("127.0.0.1", port))
            sent += 1
        for stream in streams:
            if r < len(stream):
                sock.sendto(stream[r], ("127.0.0.1", port))
                sent += 1
        time.sleep(0.002)
    return sent


@pytest.fixture()
def monitor(model: Any) -> Any:
    collector = Collector()
    mon = Monitor(model, MonitorConfig(stats_interval_s=0.5), collector)
    mon.start()
    yield mon, collector
    mon.stop(drain=False)


def test_each_ssrc_is_its_own_stream_and_trouble_is_counted(monitor: Any) -> None:
    mon, collector = monitor
    source = RtpSource(mon, "127.0.0.1", 0, PAYLOAD_MAP, RtpSourceConfig(idle_timeout_s=0.6))
    source.start()
    speech8 = speech_with_pauses(((0.4, 2.0),), tail_s=1.0, rate=8000, seed=1)
    speech16 = speech_with_pauses(((0.4, 2.0),), tail_s=1.0, rate=16000, seed=2)

    reordered = packets_for(speech8, 0xA, 0, 8000)
    n_packets = len(reordered)
    swapped = list(range(5, n_packets - 2, 10))
    for i in swapped:  # swap neighbours: the jitter buffer must put them back
        reordered[i], reordered[i + 1] = reordered[i + 1], reordered[i]

    with_duplicates = packets_for(speech8, 0xB, 8, 8000)
    duplicated = list(range(3, n_packets - 2, 7))
    for offset, i in enumerate(duplicated):
        with_duplicates.insert(i + offset + 1, with_duplicates[i + offset])

    with_gaps = packets_for(speech16, 0xC, 96, 16000)
    missing = [20, 21, 60, 100, 140]
    with_gaps = [p for i, p in enumerate(with_gaps) if i not in missing]

    good = reordered[0]
    malformed = {
        "truncated": good[:7],
        "bad_version": bytes([good[0] & 0x3F | 0x40]) + good[1:],
        "unknown_payload_type": bytes([good[0], 99]) + good[2:],
        "csrc_overflow": bytes([good[0] | 0x0F]) + good[1:20],
    }
    extra = {r: [malformed[cause] for cause in malformed] for r in (10, 50, 90)}

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sent = send_interleaved(sock, source.port, [reordered, with_duplicates, with_gaps], extra)
    ids = ("rtp:0000000a", "rtp:0000000b", "rtp:0000000c")
    wait_until(lambda: all(collector.of(i, "stream", state="closed") for i in ids), 20, "the three streams to close")
    source.stop()

    stats = source.stats()
    closed = stats["closed"]
    assert stats["received"] + stats["kernel_drops"] == sent
    assert stats["kernel_drops"] == 0
    assert stats["received"] == stats["accepted"] + sum(stats["rejects"].values())
    assert stats["rejects"] == {cause: 3 for cause in malformed}

    a, b, c = (closed[i] for i in ids)
    assert (a["lost"], a["late"], a["duplicates"], a["samples"]) == (0, 0, 0, n_packets * 160)
    assert (a["reordered"], b["reordered"], c["reordered"]) == (len(swapped), 0, 0)
    assert (b["duplicates"], b["lost"], b["samples"]) == (len(duplicated), 0, n_packets * 160)
    assert (c["lost"], c["duplicates"], c["samples"]) == (len(missing), 0, n_packets * 320)

    for stream_id, codec, rate in zip(ids, ("pcmu", "pcma", "l16"), (8000, 8000, 16000)):
        opened = collector.of(stream_id, "stream", state="open")
        assert len(opened) == 1
        assert (opened[0]["source"], opened[0]["codec"], opened[0]["sample_rate"]) == ("rtp", codec, rate)
        assert collector.of(stream_id, "emotion"), f"{stream_id} got no emotion event"
        assert collector.of(stream_id, "stream", state="closed")[0]["reason"] == "idle"
        assert not collector.of(stream_id, "error"), "a malformed packet disturbed a stream"

    port_errors = collector.of(source.label, "error")
    assert sorted(e["code"] for e in port_errors) == sorted(malformed)
    assert all(e["count"] == 1 and "\n" not in e["message"] for e in port_errors)

    # The counters reach the monitor's stats (and so stats events and /metrics).
    drops = mon.stats()["drops"]
    assert drops["rtp_lost"] == len(missing) and drops["rtp_duplicates"] == len(duplicated)
    assert drops["rtp_rejected_truncated"] == 3 and drops["rtp_kernel_drops"] == 0
    wait_until(lambda: any(e["drops"].get("rtp_rejected_bad_version") == 3 for e in collector.of("*", "stats")),
               5, "a stats event with the RTP counters")


def test_a_flood_from_one_ssrc_is_dropped_counted_once_and_spares_a_live_call(monitor: Any) -> None:
    mon, collector = monitor
    config = RtpSourceConfig(idle_timeout_s=0.6, max_speed=2.0, burst_s=1.0)
    source = RtpSource(mon, "127.0.0.1", 0, None, config)
    source.start()
    call = packets_for(speech_with_pauses(((0.3, 1.5),), tail_s=0.6, rate=8000, seed=3), 0xD, 0, 8000)
    flood = packets_for(speech_with_pauses(((0.1, 20.0),), tail_s=0.1, rate=8000, seed=4), 0xF, 0, 8000)
    sent_flood = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        started = time.monotonic()
        for i, packet in enumerate(call):  # the call in real time, the flood at ten times that
            sock.sendto(packet, ("127.0.0.1", source.port))
            for datagram in flood[i * 10:(i + 1) * 10]:
                sock.sendto(datagram, ("127.0.0.1", source.port))
                sent_flood += 1
            time.sleep(max(0.0, started + (i + 1) * PACKET_MS / 1000 - time.monotonic()))
        elapsed = time.monotonic() - started
    wait_until(lambda: all(collector.of(i, "stream", state="closed") for i in ("rtp:0000000d", "rtp:0000000f")),
               20, "both streams to close")
    source.stop()
    stats = source.stats()
    assert stats["kernel_drops"] == 0
    call_stats, flood_stats = stats["closed"]["rtp:0000000d"], stats["closed"]["rtp:0000000f"]
    # The call got all its audio; the flood got a little over 2x real time, the rest was counted.
    assert (call_stats["lost"], call_stats["samples"]) == (0, len(call) * 160)
    assert collector.of("rtp:0000000d", "emotion"), "the live call got no estimates"
    assert 0 < stats["rejects"]["flood"] < sent_flood
    assert stats["rejects"]["flood"] + flood_stats["received"] == sent_flood
    assert flood_stats["samples"] <= (config.burst_s + config.max_speed * elapsed + 0.1) * 8000
    # Reported once, however many packets it dropped; in the monitor's drops as well.
    (notice,) = collector.of(source.label, "error")
    assert notice["code"] == "flood" and "0000000f" in notice["message"]
    assert mon.stats()["drops"]["rtp_rejected_flood"] == stats["rejects"]["flood"]


def test_rtcp_on_the_next_port_is_counted_and_ignored(monitor: Any) -> None:
    mon, collector = monitor
    source = RtpSource(mon, "127.0.0.1", 0, None, RtpSourceConfig(idle_timeout_s=0.5))
    assert source.rtcp_port == source.port + 1
    source.start()
    receiver_report = bytes([0x81, 201, 0, 7]) + bytes(28)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _ in range(5):
            sock.sendto(receiver_report, ("127.0.0.1", source.rtcp_port))
        sock.sendto(b"garbage", ("127.0.0.1", source.rtcp_port))
    wait_until(lambda: source.stats()["rtcp_packets"] == 6, 5, "the RTCP packets")
    source.stop()
    stats = source.stats()
    assert stats["rtcp_invalid"] == 1 and stats["received"] == 0
    assert mon.stream_ids == [] and not collector.of(type_="error")


def _port_with_free_predecessor() -> tuple[socket.socket, int]:
    """A bound UDP socket whose port - 1 was free a moment ago."""
    for _ in range(50):
        taken = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            probe.bind(("127.0.0.1", port - 1))
            return taken, port
        except OSError:
            taken.close()
        finally:
            probe.close()
    raise AssertionError("no UDP port with a free predecessor")


def test_a_port_in_use_is_a_one_line_error(monitor: Any) -> None:
    mon, _ = monitor
    taken, port = _port_with_free_predecessor()
    with taken:
        with pytest.raises(SourceError) as info:
            RtpSource(mon, "127.0.0.1", port, None, RtpSourceConfig(rtcp=False))
        message = str(info.value)
        assert f"UDP port {port}" in message and "already in use" in message and "\n" not in message
        # Its RTCP port (port + 1) taken: the error says so, and the RTP port is released again.
        with pytest.raises(SourceError, match="RTCP port"):
            RtpSource(mon, "127.0.0.1", port - 1, None, RtpSourceConfig())
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as again:
            again.bind(("127.0.0.1", port - 1))


def test_cli_parses_rtp_options_and_binds_several_ports(monitor: Any) -> None:
    mon, _ = monitor
    assert parse_listen_address("127.0.0.1:5004") == ("127.0.0.1", 5004)
    assert parse_listen_address("[::1]:6000") == ("::1", 6000)
    assert parse_listen_address("5006") == ("127.0.0.1", 5006)
    for bad in ("localhost:http", "1.2.3.4:70000", "::1:5004"):
        with pytest.raises(SourceError):
            parse_listen_address(bad)
    parser = build_parser()

    def args(*extra: str) -> argparse.Namespace:
        return parser.parse_args(["listen", *extra])

    assert args().rtp_max_speed == 2.0 and _rtp_sources(mon, args()) == []
    with pytest.raises(UserError, match="bad RTP option: max_speed"):
        _rtp_sources(mon, args("--rtp", "127.0.0.1:0", "--rtp-max-speed", "0.5"))
    with pytest.raises(UserError, match="bad RTP payload map"):
        _rtp_sources(mon, args("--rtp", "127.0.0.1:0", "--rtp-map", "96=OPUS/48000/2"))
    with pytest.raises(UserError, match="bad RTP address 'localhost:http'"):
        _rtp_sources(mon, args("--rtp", "127.0.0.1:0", "--rtp", "localhost:http"))
    sources = _rtp_sources(mon, args("--rtp", "127.0.0.1:0", "--rtp", "127.0.0.1:0", "--rtp-map", "96=L16/16000/1",
                                     "--rtp-max-speed", "0", "--no-rtcp"))
    rtp = [s for s in sources if isinstance(s, RtpSource)]
    try:
        assert len(rtp) == 2 and all(isinstance(s, Source) for s in sources)
        for s in rtp:
            s.start()
        assert len({s.port for s in rtp}) == 2 and all(s.running for s in rtp)
        assert all(s.payload_map[96].rate == 16000 for s in rtp)
        assert all(s.config.max_speed is None and s.rtcp_port is None for s in rtp)
        assert rtp[0].description == f"receiving RTP on 127.0.0.1:{rtp[0].port}"
    finally:
        for s in rtp:
            s.stop()
    assert not any(s.running for s in rtp)
