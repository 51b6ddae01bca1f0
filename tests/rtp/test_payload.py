"""Tests for serstream.rtp.payload: payload type map, rtpmap parsing, payload decoding."""

from __future__ import annotations

import numpy as np
import pytest

from serstream.rtp.g711 import decode_alaw, decode_ulaw, encode_ulaw
from serstream.rtp.packet import RtpError
from serstream.rtp.payload import (
    STATIC_PAYLOAD_TYPES,
    PayloadFormat,
    build_payload_map,
    check_payload,
    decode_payload,
    parse_rtp_map,
    payload_frames,
)

PCMU = PayloadFormat("PCMU", 8000, 1)
PCMA = PayloadFormat("PCMA", 8000, 1)
L16_MONO = PayloadFormat("L16", 16000, 1)
L16_STEREO = PayloadFormat("L16", 44100, 2)


def test_static_payload_types_follow_rfc_3551() -> None:
    assert STATIC_PAYLOAD_TYPES[0] == PCMU
    assert STATIC_PAYLOAD_TYPES[8] == PCMA
    assert STATIC_PAYLOAD_TYPES[10] == PayloadFormat("L16", 44100, 2)
    assert STATIC_PAYLOAD_TYPES[11] == PayloadFormat("L16", 44100, 1)
    assert set(STATIC_PAYLOAD_TYPES) == {0, 8, 10, 11}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("96=L16/16000/1", (96, PayloadFormat("L16", 16000, 1))),
        ("97=l16/48000/2", (97, PayloadFormat("L16", 48000, 2))),
        ("98=PCMU/8000", (98, PayloadFormat("PCMU", 8000, 1))),
        ("99 PCMA/8000/1", (99, PayloadFormat("PCMA", 8000, 1))),
        ("a=rtpmap:127 L16/8000", (127, PayloadFormat("L16", 8000, 1))),
        (" 0=L16/8000 ", (0, PayloadFormat("L16", 8000, 1))),
    ],
)
def test_parse_rtp_map_forms(text: str, expected: tuple[int, PayloadFormat]) -> None:
    assert parse_rtp_map(text) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "expected PT=ENCODING/RATE"),
        ("L16/16000", "expected PT=ENCODING/RATE"),
        ("96=L16", "expected PT=ENCODING/RATE"),
        ("96=L16/16k", "expected PT=ENCODING/RATE"),
        ("128=L16/16000", "outside 0-127"),
        ("72=L16/16000", "clash with RTCP"),
        ("96=opus/48000/2", "encoding OPUS is not supported"),
        ("96=L16/0", "rate 0"),
        ("96=L16/16000/0", "0 channels"),
        ("96=L16/16000/9", "9 channels"),
    ],
)
def test_parse_rtp_map_errors_name_the_problem(text: str, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_rtp_map(text)
    message = str(info.value)
    assert fragment in message
    assert repr(text) in message and "\n" not in message


def test_build_payload_map_adds_and_overrides() -> None:
    payload_map = build_payload_map(["96=L16/16000/1", "0=L16/8000"])
    assert payload_map[96] == L16_MONO
    assert payload_map[0] == PayloadFormat("L16", 8000, 1)
    assert payload_map[8] == PCMA
    # The module-level static map is not modified.
    assert STATIC_PAYLOAD_TYPES[0] == PCMU


def test_l16_is_big_endian_signed() -> None:
    samples = decode_payload(L16_MONO, b"\x40\x00\x80\x00\x7f\xff\x00\x01")
    assert samples.dtype == np.float32
    assert samples.tolist() == [0.5, -1.0, 32767 / 32768, 1 / 32768]


def test_l16_stereo_is_averaged_to_mono() -> None:
    left = np.array([0.5, -0.25], dtype=">f8")
    right = np.array([0.0, -0.75], dtype=">f8")
    interleaved = (np.stack([left, right], axis=1).ravel() * 32768).astype(">i2").tobytes()
    assert decode_payload(L16_STEREO, interleaved).tolist() == [0.25, -0.5]


def test_g711_payloads_use_their_law() -> None:
    data = bytes(range(256))
    assert np.array_equal(decode_payload(PCMU, data), decode_ulaw(data))
    assert np.array_equal(decode_payload(PCMA, data), decode_alaw(data))


def test_g711_stereo_is_averaged() -> None:
    data = encode_ulaw(np.array([0.5, 0.5, -0.25, -0.25]))
    decoded = decode_payload(PayloadFormat("PCMU", 8000, 2), data)
    assert decoded.shape == (2,)
    assert np.allclose(decoded, decode_ulaw(data)[::2])


@pytest.mark.parametrize(
    ("fmt", "size"), [(L16_MONO, 3), (L16_MONO, 1), (L16_STEREO, 6), (PayloadFormat("PCMA", 8000, 2), 5)]
)
def test_partial_sample_frames_are_bad_payload(fmt: PayloadFormat, size: int) -> None:
    for check in (check_payload, decode_payload):
        with pytest.raises(RtpError) as info:
            check(fmt, bytes(size))
        assert info.value.cause == "bad_payload"
        assert str(fmt) in info.value.message


def test_payload_frames_counts_sample_frames() -> None:
    assert payload_frames(PCMU, 160) == 160
    assert payload_frames(L16_MONO, 640) == 320
    assert payload_frames(L16_STEREO, 640) == 160
