"""Tests for serstream.rtp.packet: RFC 3550 header parsing, reject causes, build_rtp."""

from __future__ import annotations

import struct

import pytest

from serstream.rtp.packet import RtpError, build_rtp, is_rtcp, parse_rtp

PAYLOAD = bytes(range(1, 161))


def header(first: int, second: int, sequence: int = 1, timestamp: int = 160, ssrc: int = 0x1234) -> bytes:
    return struct.pack("!BBHII", first, second, sequence, timestamp, ssrc)


def cause_of(data: bytes) -> str:
    with pytest.raises(RtpError) as info:
        parse_rtp(data)
    return info.value.cause


def test_round_trip_every_header_field() -> None:
    data = build_rtp(
        PAYLOAD,
        payload_type=96,
        sequence=65535,
        timestamp=0xFFFFFFFF,
        ssrc=0xDEADBEEF,
        marker=True,
        csrcs=(1, 0xFFFFFFFF),
        extension=(0xBEDE, b"\x10\xaa\x00\x00"),
        padding=3,
    )
    packet = parse_rtp(data)
    assert packet.version == 2
    assert packet.padding and packet.extension and packet.marker
    assert packet.payload_type == 96
    assert packet.sequence == 65535
    assert packet.timestamp == 0xFFFFFFFF
    assert packet.ssrc == 0xDEADBEEF
    assert packet.csrcs == (1, 0xFFFFFFFF)
    assert packet.extension_profile == 0xBEDE
    assert packet.extension_data == b"\x10\xaa\x00\x00"
    # Padding and extension are not part of the payload.
    assert packet.payload == PAYLOAD


def test_minimal_packet_has_no_optional_parts() -> None:
    packet = parse_rtp(build_rtp(b"\x7f", payload_type=0, sequence=7, timestamp=8, ssrc=9))
    assert packet.csrcs == ()
    assert packet.extension_profile is None and packet.extension_data == b""
    assert not packet.padding and not packet.extension and not packet.marker
    assert packet.payload == b"\x7f"


def test_header_bits_match_rfc_layout() -> None:
    data = build_rtp(
        b"\x00", payload_type=8, sequence=0x0102, timestamp=0x03040506, ssrc=0x0708090A, marker=True
    )
    assert data[:12] == bytes([0x80, 0x88, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0A])


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_accepts_any_bytes_like_and_copies_payload(kind: type) -> None:
    buffer = bytearray(build_rtp(PAYLOAD, payload_type=0, sequence=1, timestamp=2, ssrc=3))
    packet = parse_rtp(kind(buffer))
    buffer[12:] = bytes(len(PAYLOAD))  # a socket adapter reusing its buffer
    assert packet.payload == PAYLOAD
    assert isinstance(packet.payload, bytes)


@pytest.mark.parametrize("size", [0, 1, 11])
def test_shorter_than_fixed_header_is_truncated(size: int) -> None:
    assert cause_of(build_rtp(PAYLOAD, payload_type=0, sequence=1, timestamp=2, ssrc=3)[:size]) == "truncated"


@pytest.mark.parametrize("version", [0, 1, 3])
def test_other_versions_are_rejected(version: int) -> None:
    assert cause_of(header(version << 6, 0) + PAYLOAD) == "bad_version"


@pytest.mark.parametrize("packet_type", [192, 200, 201, 202, 203, 204, 205, 206, 207, 223])
def test_rtcp_on_a_muxed_port_is_classified(packet_type: int) -> None:
    sender_report = header(0x80, packet_type) + bytes(16)
    assert is_rtcp(sender_report)
    assert cause_of(sender_report) == "rtcp"


@pytest.mark.parametrize("second_byte", [191, 224, 0x80 | 0, 96])
def test_neighbours_of_the_rtcp_range_are_rtp(second_byte: int) -> None:
    data = header(0x80, second_byte) + PAYLOAD
    assert not is_rtcp(data)
    assert parse_rtp(data).payload_type == second_byte & 0x7F


def test_csrc_list_beyond_packet() -> None:
    # CC = 15 needs 60 bytes of CSRCs; only 8 follow the header.
    assert cause_of(header(0x80 | 15, 0) + bytes(8)) == "csrc_overflow"


def test_csrc_list_exactly_filling_packet_leaves_no_payload() -> None:
    assert cause_of(header(0x80 | 2, 0) + bytes(8)) == "empty_payload"


def test_extension_header_cut_off() -> None:
    assert cause_of(header(0x90, 0) + b"\xbe\xde") == "extension_overflow"


def test_extension_data_beyond_packet() -> None:
    # Extension claims 10 words (40 bytes); 8 bytes follow.
    assert cause_of(header(0x90, 0) + struct.pack("!HH", 0xBEDE, 10) + bytes(8)) == "extension_overflow"


def test_zero_padding_count() -> None:
    assert cause_of(header(0xA0, 0) + PAYLOAD + b"\x00") == "bad_padding"


def test_padding_longer_than_packet_body() -> None:
    assert cause_of(header(0xA0, 0) + b"\x01\x02\xff") == "bad_padding"


def test_padding_flag_without_any_byte_after_header() -> None:
    assert cause_of(header(0xA0, 0)) == "bad_padding"


def test_padding_consuming_everything_is_empty_payload() -> None:
    assert cause_of(header(0xA0, 0) + b"\x00\x00\x03") == "empty_payload"


def test_header_only_is_empty_payload() -> None:
    assert cause_of(header(0x80, 0)) == "empty_payload"


def test_error_carries_cause_and_one_line_message() -> None:
    with pytest.raises(RtpError) as info:
        parse_rtp(header(0x40, 0) + PAYLOAD)
    error = info.value
    assert error.cause == "bad_version"
    assert "version 1" in error.message
    assert str(error).startswith("bad_version: ") and "\n" not in str(error)
    assert isinstance(error, ValueError)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"payload_type": 128},
        {"sequence": 65536},
        {"timestamp": -1},
        {"ssrc": 1 << 32},
        {"csrcs": tuple(range(16))},
        {"extension": (1, b"abc")},
        {"padding": 256},
    ],
)
def test_build_rejects_out_of_range_fields(kwargs: dict) -> None:
    fields = {"payload_type": 0, "sequence": 0, "timestamp": 0, "ssrc": 0} | kwargs
    with pytest.raises(ValueError):
        build_rtp(PAYLOAD, **fields)
