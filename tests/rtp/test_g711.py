"""Tests for serstream.rtp.g711 against values of ITU-T G.711 and round-trip bounds."""

from __future__ import annotations

import numpy as np
import pytest

from serstream.rtp.g711 import (
    ALAW_TO_LINEAR,
    ULAW_TO_LINEAR,
    decode_alaw,
    decode_ulaw,
    encode_alaw,
    encode_ulaw,
)

ALL_CODES = bytes(range(256))
EVERY_INT16 = np.arange(-32768, 32768, dtype=np.int64)


@pytest.mark.parametrize(("code", "value"), [(0xFF, 0), (0x7F, 0), (0x00, -32124), (0x80, 32124)])
def test_ulaw_known_values(code: int, value: int) -> None:
    assert ULAW_TO_LINEAR[code] == value
    assert decode_ulaw(bytes([code]))[0] == np.float32(value / 32768)


@pytest.mark.parametrize(("code", "value"), [(0xD5, 8), (0x55, -8), (0xAA, 32256), (0x2A, -32256)])
def test_alaw_known_values(code: int, value: int) -> None:
    assert ALAW_TO_LINEAR[code] == value
    assert decode_alaw(bytes([code]))[0] == np.float32(value / 32768)


def test_ulaw_first_segments_match_g711_table() -> None:
    # G.711 Table 2a (14-bit units, here x4): segment 0 outputs 0, 2, ..., 30;
    # segment 1 starts at 33 with step 4. Positive codes count down from 0xFF.
    fourteen_bit = ULAW_TO_LINEAR[np.arange(0xFF, 0xDF, -1)] // 4
    assert list(fourteen_bit[:16]) == list(range(0, 31, 2))
    assert list(fourteen_bit[16:]) == list(range(33, 33 + 16 * 4, 4))


def test_alaw_first_segments_match_g711_table() -> None:
    # G.711 Table 1a (13-bit units, here x8): segment 0 outputs 1, 3, ..., 31;
    # segment 1 outputs 33, 35, ..., 63; segment 2 starts at 66 with step 4.
    positive = ALAW_TO_LINEAR[np.array([c ^ 0x55 for c in range(0x80, 0xB0)])] // 8
    assert list(positive[:16]) == list(range(1, 32, 2))
    assert list(positive[16:32]) == list(range(33, 64, 2))
    assert list(positive[32:48]) == list(range(66, 66 + 16 * 4, 4))


@pytest.mark.parametrize("table", [ULAW_TO_LINEAR, ALAW_TO_LINEAR])
def test_tables_are_symmetric_and_read_only(table: np.ndarray) -> None:
    # Flipping the sign bit negates the value in both laws.
    assert np.array_equal(table[:128].astype(np.int32), -table[128:].astype(np.int32))
    with pytest.raises(ValueError):
        table[0] = 1


@pytest.mark.parametrize("decode", [decode_ulaw, decode_alaw])
def test_decode_gives_float32_in_range(decode) -> None:
    samples = decode(ALL_CODES)
    assert samples.dtype == np.float32 and samples.shape == (256,)
    assert np.all(np.abs(samples) <= 1.0)
    assert decode(b"").shape == (0,)
    assert np.array_equal(decode(bytearray(ALL_CODES)), decode(memoryview(ALL_CODES)))


def test_ulaw_codes_survive_decode_encode() -> None:
    # 0x7F is u-law's negative zero; the encoder writes zero as 0xFF.
    expected = bytes(0xFF if code == 0x7F else code for code in range(256))
    assert encode_ulaw(decode_ulaw(ALL_CODES)) == expected


def test_alaw_codes_survive_decode_encode() -> None:
    assert encode_alaw(decode_alaw(ALL_CODES)) == ALL_CODES


@pytest.mark.parametrize(
    ("encode", "decode", "peak"), [(encode_ulaw, decode_ulaw, 32124), (encode_alaw, decode_alaw, 32256)]
)
def test_every_16_bit_input_lands_within_half_a_step(encode, decode, peak: int) -> None:
    # The step doubles per segment and is 1/16 of the segment's lower end, so
    # the error is at most |x|/32 plus the half step of the first segments.
    decoded = decode(encode(EVERY_INT16 / 32768)).astype(np.float64) * 32768
    error = np.abs(decoded - EVERY_INT16)
    inside = np.abs(EVERY_INT16) <= peak
    assert np.all(error[inside] <= np.abs(EVERY_INT16[inside]) / 32 + 8)
    # Beyond the largest level the output clips to it.
    assert np.all(np.abs(decoded[~inside]) == peak)


@pytest.mark.parametrize(("encode", "decode"), [(encode_ulaw, decode_ulaw), (encode_alaw, decode_alaw)])
def test_sine_round_trip_snr_is_telephone_quality(encode, decode) -> None:
    t = np.arange(8000) / 8000
    sine = 0.5 * np.sin(2 * np.pi * 440 * t)
    decoded = decode(encode(sine))
    snr_db = 10 * np.log10(np.sum(sine**2) / np.sum((decoded - sine) ** 2))
    # G.711 gives about 38 dB SNR over a wide range of levels.
    assert snr_db > 33


@pytest.mark.parametrize(("encode", "decode"), [(encode_ulaw, decode_ulaw), (encode_alaw, decode_alaw)])
def test_encoders_clip_and_zero_nan(encode, decode) -> None:
    decoded = decode(encode(np.array([5.0, -5.0, np.nan, np.inf, -np.inf, 0.0])))
    assert decoded[0] == decoded.max() > 0.98
    assert decoded[1] == decoded.min() < -0.98
    assert abs(decoded[2]) < 0.001
    assert decoded[3] == decoded[0] and decoded[4] == decoded[1]
    assert encode(np.zeros(0)) == b""


def test_encoders_accept_2d_and_lists() -> None:
    assert encode_ulaw([[0.1, -0.1], [0.2, -0.2]]) == encode_ulaw(np.array([0.1, -0.1, 0.2, -0.2]))
    assert len(encode_alaw(np.zeros((3, 4), dtype=np.float32))) == 12
