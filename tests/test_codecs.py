"""Tests for serstream.codecs: the one registry RTP and /ingest decode with."""

from __future__ import annotations

import numpy as np
import pytest

from serstream.codecs import (
    CODECS,
    CodecError,
    ingest_codec,
    ingest_formats,
    rtp_codec,
    rtp_encodings,
)
from serstream.rtp.g711 import encode_alaw, encode_ulaw
from serstream.rtp.payload import SUPPORTED_ENCODINGS, PayloadFormat, decode_payload


def test_registry_names_each_codec_once_with_its_sample_width() -> None:
    assert rtp_encodings() == ("PCMU", "PCMA", "L16")
    assert ingest_formats() == ("s16le", "f32le")
    assert {name: c.bytes_per_sample for name, c in CODECS.items()} == {
        "pcmu": 1, "pcma": 1, "l16": 2, "s16le": 2, "f32le": 4}
    # The RTP payload module's table is a view of the registry, not a second table.
    assert SUPPORTED_ENCODINGS == {"PCMU": 1, "PCMA": 1, "L16": 2}
    assert [ingest_codec(f).stream_codec for f in ingest_formats()] == ["pcm_s16le", "pcm_f32le"]


def test_byte_order_is_per_codec() -> None:
    data = np.array([0x4000, -0x8000, 1], dtype=">i2").tobytes()
    assert rtp_codec("l16").decode(data).tolist() == [0.5, -1.0, 1 / 32768]
    # The same bytes read little-endian are different numbers.
    assert ingest_codec("s16le").decode(data).tolist() != [0.5, -1.0, 1 / 32768]
    little = np.array([0x4000, -0x8000, 1], dtype="<i2").tobytes()
    assert ingest_codec("s16le").decode(little).tolist() == [0.5, -1.0, 1 / 32768]
    floats = np.array([0.25, -1.0, 0.125], dtype="<f4").tobytes()
    out = ingest_codec("f32le").decode(floats)
    assert out.dtype == np.float32 and out.tolist() == [0.25, -1.0, 0.125]


def test_g711_decoders_round_trip_within_their_step() -> None:
    tone = (0.5 * np.sin(np.arange(800) * 2 * np.pi * 440 / 8000)).astype(np.float32)
    for name, encode in (("PCMU", encode_ulaw), ("PCMA", encode_alaw)):
        decoded = rtp_codec(name).decode(encode(tone))
        assert decoded.dtype == np.float32 and decoded.shape == tone.shape
        assert float(np.max(np.abs(decoded - tone))) < 0.02, name
        # decode_payload goes through the same registry entry.
        assert np.array_equal(decode_payload(PayloadFormat(name, 8000, 1), encode(tone)), decoded)


def test_frames_counts_whole_sample_frames() -> None:
    assert rtp_codec("PCMU").frames(160) == 160
    assert rtp_codec("L16").frames(640, channels=2) == 160
    assert ingest_codec("f32le").frames(20, channels=2) == 2


def test_unknown_names_get_one_line_errors_listing_the_known_ones() -> None:
    with pytest.raises(CodecError, match=r"RTP encoding opus is not supported \(supported: PCMU, PCMA, L16\)"):
        rtp_codec("opus")
    with pytest.raises(CodecError, match=r"format 's24le' is not supported \(use s16le or f32le\)"):
        ingest_codec("s24le")
    # Ingest names are not RTP names and vice versa.
    with pytest.raises(CodecError):
        rtp_codec("s16le")
    with pytest.raises(CodecError):
        ingest_codec("L16")
