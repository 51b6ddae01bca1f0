"""Fuzz tests: parse_rtp and RtpDemux on random, mutated and corrupted datagrams.

Two parts: hypothesis properties (derandomized, so every run tries the same
examples) and a plain seeded loop of 100,000 datagrams built with numpy. The
invariants: only RtpError escapes parse_rtp, RtpDemux never raises, every
datagram is either accepted or counted under a reject cause, and every
accepted packet is emitted or counted by its stream's jitter buffer.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serstream.rtp.jitter import JitterConfig
from serstream.rtp.packet import RtpError, RtpPacket, build_rtp, parse_rtp
from serstream.rtp.payload import build_payload_map
from serstream.rtp.session import DemuxConfig, RejectNotice, RtpDemux, StreamAudio, StreamClosed

PARSE_CAUSES = {
    "truncated",
    "bad_version",
    "rtcp",
    "csrc_overflow",
    "extension_overflow",
    "bad_padding",
    "empty_payload",
}
DEMUX_CAUSES = PARSE_CAUSES | {"unknown_payload_type", "bad_payload", "too_many_streams", "flood"}
PAYLOAD_MAP = build_payload_map(["96=L16/16000/1", "97=L16/48000/2"])
FUZZ_SETTINGS = settings(
    derandomize=True,
    database=None,
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def parse_or_cause(data: bytes) -> RtpPacket | str:
    """The packet, or the reject cause; any other exception fails the test."""
    try:
        return parse_rtp(data)
    except RtpError as error:
        assert error.cause in PARSE_CAUSES, error
        assert "\n" not in str(error)
        return error.cause


def check_packet(packet: RtpPacket, data: bytes) -> None:
    assert packet.version == 2
    assert 0 <= packet.payload_type <= 127 and 0 <= packet.sequence <= 0xFFFF
    assert 1 <= len(packet.payload) <= len(data) - 12 - 4 * len(packet.csrcs)
    assert len(packet.csrcs) == data[0] & 0x0F


def check_accounting(demux: RtpDemux) -> None:
    assert set(demux.rejects) <= DEMUX_CAUSES
    assert demux.received == demux.accepted + sum(demux.rejects.values())
    totals = demux.totals()
    assert totals["received"] == demux.accepted
    settled = totals["emitted"] + totals["duplicates"] + totals["late"] + totals["stray"]
    pending = totals["received"] - settled
    assert pending >= 0
    if not demux.stream_ids:
        assert pending == 0


def check_events(events: list) -> None:
    for event in events:
        if isinstance(event, StreamAudio):
            assert event.samples.dtype == np.float32 and event.samples.ndim == 1
            assert event.samples.size == 0 or float(np.max(np.abs(event.samples))) <= 1.0
        elif isinstance(event, RejectNotice):
            assert event.cause in DEMUX_CAUSES and "\n" not in event.message


# -- hypothesis ---------------------------------------------------------------


@FUZZ_SETTINGS
@given(st.binary(max_size=300))
def test_parse_arbitrary_bytes(data: bytes) -> None:
    result = parse_or_cause(data)
    if isinstance(result, RtpPacket):
        check_packet(result, data)


packets = st.builds(
    dict,
    payload=st.binary(min_size=1, max_size=64),
    payload_type=st.integers(0, 63) | st.integers(96, 127),
    sequence=st.integers(0, 0xFFFF),
    timestamp=st.integers(0, 0xFFFFFFFF),
    ssrc=st.integers(0, 0xFFFFFFFF),
    marker=st.booleans(),
    csrcs=st.lists(st.integers(0, 0xFFFFFFFF), max_size=15).map(tuple),
    extension=st.none()
    | st.tuples(st.integers(0, 0xFFFF), st.binary(max_size=16).map(lambda b: b[: len(b) // 4 * 4])),
    padding=st.integers(0, 255),
)


@FUZZ_SETTINGS
@given(packets)
def test_build_then_parse_round_trips(fields: dict) -> None:
    packet = parse_rtp(build_rtp(**fields))
    assert packet.payload == fields["payload"]
    assert packet.csrcs == fields["csrcs"]
    assert (packet.payload_type, packet.sequence, packet.timestamp, packet.ssrc, packet.marker) == (
        fields["payload_type"],
        fields["sequence"],
        fields["timestamp"],
        fields["ssrc"],
        fields["marker"],
    )
    if fields["extension"] is None:
        assert packet.extension_profile is None
    else:
        assert (packet.extension_profile, packet.extension_data) == fields["extension"]


@FUZZ_SETTINGS
@given(
    packets,
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 7)), max_size=4),
    st.integers(0, 400),
)
def test_mutated_valid_packets(fields: dict, flips: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(build_rtp(**fields))
    for position, bit in flips:
        data[position % len(data)] ^= 1 << bit
    for candidate in (bytes(data), bytes(data[:cut])):
        result = parse_or_cause(candidate)
        if isinstance(result, RtpPacket):
            check_packet(result, candidate)


@FUZZ_SETTINGS
@given(st.lists(st.tuples(packets, st.binary(max_size=40), st.floats(0, 0.5)), max_size=30))
def test_demux_never_raises(script: list[tuple[dict, bytes, float]]) -> None:
    demux = RtpDemux(PAYLOAD_MAP, DemuxConfig(idle_timeout_s=1.0, max_streams=3))
    now = 0.0
    for fields, noise, step in script:
        now += step
        check_events(demux.receive(build_rtp(**fields), ("198.51.100.1", 5004), now))
        check_events(demux.receive(noise, ("198.51.100.2", 5004), now))
        check_events(demux.poll(now))
    check_accounting(demux)
    check_events(demux.close_all(now + 1))
    check_accounting(demux)


# -- seeded loop --------------------------------------------------------------

N_DATAGRAMS = 100_000
N_SSRCS = 80  # more than max_streams, so the flood guard is exercised
PAYLOAD_BYTES = 160  # a whole number of frames for every format in PAYLOAD_MAP
ROW = 12 + PAYLOAD_BYTES + 40  # room for a corrupted CSRC count or padding


def make_datagrams(rng: np.random.Generator) -> list[bytes]:
    """Valid packets of many SSRCs, then random bytes, bit flips, truncations and bad fields."""
    n = N_DATAGRAMS
    rows = rng.integers(0, 256, size=(n, ROW), dtype=np.uint8)
    lengths = np.full(n, 12 + PAYLOAD_BYTES)

    # Valid headers: per-SSRC sequence numbers in roughly increasing order,
    # with some reordering, repeats and gaps, and timestamps that follow them.
    ssrc_index = rng.integers(0, N_SSRCS, size=n)
    ssrcs = rng.integers(0, 1 << 32, size=N_SSRCS, dtype=np.uint64)[ssrc_index]
    rank = np.zeros(n, dtype=np.int64)
    for s in range(N_SSRCS):
        where = np.flatnonzero(ssrc_index == s)
        rank[where] = np.arange(where.size)
    wobble = np.where(rng.random(n) < 0.2, rng.integers(-3, 4, size=n), 0)
    sequence_base = rng.integers(0, 1 << 16, size=N_SSRCS)[ssrc_index]
    sequences = (sequence_base + rank + wobble) % (1 << 16)
    timestamps = (rng.integers(0, 1 << 32, size=N_SSRCS)[ssrc_index] + (rank + wobble) * 160) % (1 << 32)
    payload_types = rng.choice([0, 8, 10, 11, 96, 97, 101], size=n, p=[0.3, 0.2, 0.1, 0.1, 0.15, 0.1, 0.05])
    marker = (rng.random(n) < 0.02).astype(np.uint8) << 7
    rows[:, 0] = 0x80
    rows[:, 1] = marker | payload_types.astype(np.uint8)
    rows[:, 2:4] = sequences.astype(">u2").view(np.uint8).reshape(n, 2)
    rows[:, 4:8] = timestamps.astype(">u4").view(np.uint8).reshape(n, 4)
    rows[:, 8:12] = ssrcs.astype(">u4").view(np.uint8).reshape(n, 4)

    kind = rng.choice(5, size=n, p=[0.45, 0.1, 0.2, 0.1, 0.15])
    # kind 0: left valid. kind 1: random bytes of random length.
    random_rows = kind == 1
    lengths[random_rows] = rng.integers(0, ROW + 1, size=random_rows.sum())
    rows[random_rows] = rng.integers(0, 256, size=(random_rows.sum(), ROW), dtype=np.uint8)
    # kind 2: one to three bit flips, mostly in the header.
    flipped = np.flatnonzero(kind == 2)
    for _ in range(3):
        chosen = flipped[rng.random(flipped.size) < 0.7]
        in_header = rng.random(chosen.size) < 0.8
        positions = np.where(in_header, rng.integers(0, 12, chosen.size), rng.integers(0, ROW, chosen.size))
        rows[chosen, positions] ^= (1 << rng.integers(0, 8, chosen.size)).astype(np.uint8)
    # kind 3: truncated anywhere.
    cut = kind == 3
    lengths[cut] = rng.integers(0, 12 + PAYLOAD_BYTES, size=cut.sum())
    # kind 4: one header field set to random garbage: flags byte, PT byte, or a
    # long/short length (so CSRC, extension and padding fields disagree with it).
    corrupt = np.flatnonzero(kind == 4)
    field = rng.integers(0, 3, size=corrupt.size)
    rows[corrupt[field == 0], 0] = rng.integers(0, 256, size=(field == 0).sum(), dtype=np.uint8)
    rows[corrupt[field == 1], 1] = rng.integers(0, 256, size=(field == 1).sum(), dtype=np.uint8)
    lengths[corrupt[field == 2]] = rng.integers(12, ROW + 1, size=(field == 2).sum())
    rows[corrupt[field == 2], 0] = (0x80 | rng.integers(0, 64, size=(field == 2).sum())).astype(np.uint8)

    return [rows[i, : lengths[i]].tobytes() for i in range(n)]


def test_seeded_loop_of_100k_datagrams() -> None:
    rng = np.random.default_rng(20_250_311)
    datagrams = make_datagrams(rng)
    assert len(datagrams) >= 100_000

    parse_results: Counter[str] = Counter()
    for data in datagrams:
        result = parse_or_cause(data)
        parse_results["ok" if isinstance(result, RtpPacket) else result] += 1

    demux = RtpDemux(PAYLOAD_MAP, DemuxConfig(idle_timeout_s=2.0, jitter=JitterConfig(max_delay_s=0.05)))
    addresses = [("203.0.113.7", 5004), ("203.0.113.8", 6000)]
    closed = 0
    for i, data in enumerate(datagrams):
        now = i * 0.0002  # 20 s in all, so idle streams close and reopen
        events = demux.receive(data, addresses[i & 1], now)
        if i % 250 == 0:
            events += demux.poll(now)
        check_events(events)
        closed += sum(isinstance(e, StreamClosed) for e in events)
    check_accounting(demux)
    final = demux.close_all(N_DATAGRAMS * 0.0002)
    check_events(final)
    check_accounting(demux)

    assert demux.received == len(datagrams)
    # The demux saw exactly what parse_rtp saw.
    for cause in PARSE_CAUSES:
        assert demux.rejects.get(cause, 0) == parse_results[cause], cause
    later_rejects = sum(demux.rejects.get(c, 0) for c in DEMUX_CAUSES - PARSE_CAUSES)
    assert demux.accepted + later_rejects == parse_results["ok"]
    # The input really exercised every path.
    assert set(demux.rejects) == DEMUX_CAUSES
    assert closed > 0 and demux.accepted > N_DATAGRAMS // 4
    totals = demux.totals()
    assert totals["duplicates"] > 0 and totals["late"] > 0 and totals["lost"] > 0 and totals["stray"] > 0
