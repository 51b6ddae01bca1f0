"""Tests for serstream.core.audio: sanitising, down-mixing and PCM conversion."""

import numpy as np
import pytest

from serstream.core.audio import float_to_pcm16, pcm16_to_float, pcm_u8_to_float, sanitize, to_mono


def test_sanitize_replaces_non_finite_counts_them_and_clips():
    block = np.array([0.5, np.nan, np.inf, -np.inf, 2.0, -3.0, -0.25], dtype=np.float32)
    clean, bad = sanitize(block)
    assert bad == 3
    assert clean.dtype == np.float32
    np.testing.assert_array_equal(clean, [0.5, 0.0, 0.0, 0.0, 1.0, -1.0, -0.25])


def test_sanitize_leaves_the_callers_array_alone_and_converts_float64():
    block = np.array([np.nan, 1.5], dtype=np.float64)
    clean, bad = sanitize(block)
    assert bad == 1 and clean.dtype == np.float32
    assert np.isnan(block[0]) and block[1] == 1.5


def test_sanitize_of_clean_audio_counts_nothing():
    block = np.linspace(-1, 1, 101, dtype=np.float32)
    clean, bad = sanitize(block)
    assert bad == 0
    np.testing.assert_array_equal(clean, block)


def test_sanitize_rejects_integer_pcm():
    with pytest.raises(ValueError, match="floating point"):
        sanitize(np.zeros(4, dtype=np.int16))


def test_to_mono_averages_channels():
    stereo = np.array([[1.0, 0.0], [0.5, -0.5], [0.2, 0.4]], dtype=np.float32)
    np.testing.assert_allclose(to_mono(stereo), [0.5, 0.0, 0.3], rtol=1e-6)
    assert to_mono(stereo).dtype == np.float32


def test_to_mono_passes_mono_through_and_rejects_bad_shapes():
    mono = np.arange(5, dtype=np.float32)
    assert to_mono(mono) is mono
    np.testing.assert_array_equal(to_mono(mono[:, None]), mono)
    with pytest.raises(ValueError):
        to_mono(np.zeros((2, 2, 2), dtype=np.float32))
    with pytest.raises(ValueError):
        to_mono(np.zeros((4, 0), dtype=np.float32))


def test_pcm16_from_bytes_and_array_agree_and_scale():
    ints = np.array([0, 16384, -32768, 32767], dtype=np.int16)
    from_bytes = pcm16_to_float(ints.astype("<i2").tobytes())
    from_array = pcm16_to_float(ints)
    np.testing.assert_array_equal(from_bytes, from_array)
    np.testing.assert_allclose(from_bytes, [0.0, 0.5, -1.0, 32767 / 32768])


def test_pcm16_rejects_odd_byte_counts_and_wrong_dtypes():
    with pytest.raises(ValueError, match="even number of bytes"):
        pcm16_to_float(b"\x00\x01\x02")
    with pytest.raises(ValueError, match="int16"):
        pcm16_to_float(np.zeros(3, dtype=np.int32))


def test_float_to_pcm16_round_trips_and_clips():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, 1000).astype(np.float32)
    back = pcm16_to_float(float_to_pcm16(x))
    assert np.max(np.abs(back - x)) <= 1 / 32768
    np.testing.assert_array_equal(float_to_pcm16(np.array([2.0, -2.0, 1.0, np.nan])), [32767, -32768, 32767, 0])


def test_pcm_u8_centres_on_128():
    np.testing.assert_allclose(pcm_u8_to_float(bytes([128, 255, 0])), [0.0, 127 / 128, -1.0])
    with pytest.raises(ValueError):
        pcm_u8_to_float(np.zeros(2, dtype=np.int8))
