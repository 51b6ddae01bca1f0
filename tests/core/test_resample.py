"""Tests for serstream.core.resample.StreamResampler."""

import numpy as np
import pytest

from serstream.core.resample import StreamResampler


def _tone(freq: float, rate: int, seconds: float) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_equal_rates_pass_blocks_through_without_copy():
    resampler = StreamResampler(16000)
    block = _tone(440, 16000, 0.1)
    assert resampler.passthrough
    assert resampler.process(block) is block
    assert resampler.flush().size == 0


def test_48k_to_16k_keeps_length_and_frequency_across_blocks():
    resampler = StreamResampler(48000)
    tone = _tone(1000, 48000, 2.0)
    pieces = [resampler.process(tone[i:i + 480]) for i in range(0, tone.size, 480)]
    pieces.append(resampler.flush())
    out = np.concatenate(pieces)
    assert out.dtype == np.float32
    assert abs(out.size - tone.size // 3) <= 1
    spectrum = np.abs(np.fft.rfft(out[2000:-2000]))
    peak_hz = np.argmax(spectrum) * 16000 / (out.size - 4000)
    assert abs(peak_hz - 1000) < 5
    assert resampler.samples_in == tone.size and resampler.samples_out == out.size


def test_block_size_does_not_change_the_output():
    tone = _tone(300, 44100, 1.0)
    whole = StreamResampler(44100)
    one_shot = np.concatenate([whole.process(tone), whole.flush()])
    chunked = StreamResampler(44100)
    rng = np.random.default_rng(1)
    cuts = np.sort(rng.choice(tone.size, 40, replace=False))
    parts = [chunked.process(p) for p in np.split(tone, cuts)]
    parts.append(chunked.flush())
    np.testing.assert_allclose(np.concatenate(parts), one_shot, atol=1e-5)


def test_upsampling_8k_to_16k_doubles_length():
    resampler = StreamResampler(8000, quality="MQ")
    out = np.concatenate([resampler.process(_tone(200, 8000, 1.0)), resampler.flush()])
    assert abs(out.size - 16000) <= 1


@pytest.mark.parametrize("rate", [0, -16000, 7999, 384001, 44100.0, True, "16000", None])
def test_bad_rates_raise_a_clear_value_error(rate):
    with pytest.raises(ValueError, match="sample rate"):
        StreamResampler(rate)


def test_bad_quality_and_shape_raise():
    with pytest.raises(ValueError, match="quality"):
        StreamResampler(48000, quality="VHQ-ish")
    with pytest.raises(ValueError, match="1-D"):
        StreamResampler(48000).process(np.zeros((10, 2), dtype=np.float32))


@pytest.mark.parametrize("rate", [8000, 32000, 48000])
def test_integer_ratios_hold_back_almost_nothing(rate):
    # A click in the first 20 ms block comes out of that same block's output,
    # at its own time: live telephony cannot afford soxr's ~90 ms stream delay.
    resampler = StreamResampler(rate)
    block = np.zeros(rate // 50, dtype=np.float32)
    block[rate // 100] = 1.0  # at 10 ms
    out = resampler.process(block)
    assert 320 - 32 <= out.size <= 320  # at most 2 ms held back
    assert abs(int(np.argmax(np.abs(out))) - 160) <= 1


@pytest.mark.parametrize("rate", [8000, 48000])
def test_integer_ratio_output_is_block_size_independent_and_exact_in_length(rate):
    tone = _tone(300, rate, 1.0)[: rate - 7]  # a length that is not a multiple of anything handy
    whole = StreamResampler(rate)
    one_shot = np.concatenate([whole.process(tone), whole.flush()])
    chunked = StreamResampler(rate)
    cuts = np.sort(np.random.default_rng(2).choice(tone.size, 50, replace=False))
    parts = [chunked.process(p) for p in np.split(tone, cuts)] + [chunked.flush()]
    np.testing.assert_allclose(np.concatenate(parts), one_shot, atol=1e-5)
    assert one_shot.size == tone.size * 16000 // rate
    middle = one_shot[1000:-1000]
    reference = _tone(300, 16000, 1.0)[1000 : 1000 + middle.size]
    np.testing.assert_allclose(middle, reference, atol=0.02)


@pytest.mark.parametrize("rate", [8000, 48000])
def test_integer_ratio_matches_the_textbook_filter_over_odd_blocks(rate):
    # The polyphase streaming filter must equal one whole-signal pass of
    # zero-stuff -> FIR -> decimate (scipy's upfirdn), group delay removed.
    from scipy.signal import upfirdn

    from serstream.core.resample import _IntegerRatioFir

    fir = _IntegerRatioFir(rate, 16000)
    signal = np.random.default_rng(7).standard_normal(rate // 2).astype(np.float32)
    reference = upfirdn(fir.taps, signal.astype(np.float64), up=fir.up)[fir.delay:][:: fir.down]
    resampler = StreamResampler(rate)
    cuts = np.cumsum([1, 17, 159, 160, 333, 2, 480])
    parts = [resampler.process(p) for p in np.split(signal, cuts)]
    parts.append(resampler.flush())
    out = np.concatenate(parts)
    assert out.size == signal.size * 16000 // rate
    np.testing.assert_allclose(out, reference[: out.size].astype(np.float32), atol=1e-5)
