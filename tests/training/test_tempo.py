"""Pitch/tempo augmentation and the G.711 round trip of the channel augmentation: shapes, padding, reproducibility, and that each does its job."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from training.channel import mulaw_round_trip  # noqa: E402
from training.tempo import pitch_shift, time_stretch  # noqa: E402

SR = 16_000


def _batch(rows: int = 6, n: int = 16_000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Harmonic rows with different lengths, zero past their length."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n) / SR
    f0 = 100 + 200 * torch.rand(rows, 1, generator=g)
    x = sum(0.1 / k * torch.sin(2 * math.pi * k * f0 * t) for k in range(1, 6))
    x = x + 0.005 * torch.randn(rows, n, generator=g)
    lengths = torch.linspace(n // 2, n, rows).long()
    return x * (torch.arange(n)[None, :] < lengths[:, None]), lengths


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _peak_hz(signal: torch.Tensor) -> float:
    window = torch.hann_window(signal.numel(), dtype=signal.dtype)
    spectrum = torch.fft.rfft(signal * window).abs()
    return float(spectrum.argmax()) * SR / signal.numel()


OPS = {
    "pitch": lambda x, lens, g: pitch_shift(x, lens, g),
    "stretch": lambda x, lens, g: time_stretch(x, lens, g),
}


@pytest.mark.parametrize("name", sorted(OPS))
def test_shapes_padding_and_reproducibility(name: str) -> None:
    x, lengths = _batch()
    op = OPS[name]
    y1, l1 = op(x, lengths, _gen(5))
    y2, l2 = op(x, lengths, _gen(5))
    y3, _l3 = op(x, lengths, _gen(6))
    assert y1.dim() == 2 and y1.shape[0] == x.shape[0] and l1.shape == lengths.shape
    assert int(l1.max()) == y1.shape[1]
    assert torch.isfinite(y1).all() and y1.abs().max() <= 1.0
    pad = torch.arange(y1.shape[1])[None, :] >= l1[:, None]
    assert (y1[pad] == 0).all()
    assert torch.equal(y1, y2) and torch.equal(l1, l2)
    assert not torch.equal(y1, y3)
    assert torch.equal(x, _batch()[0])  # the input is never modified in place


def test_probability_zero_leaves_the_batch_alone() -> None:
    x, lengths = _batch()
    for op in (pitch_shift, time_stretch):
        y, out_lengths = op(x, lengths, _gen(), p=0.0)
        assert torch.equal(y, x) and torch.equal(out_lengths, lengths)


def test_mulaw_round_trip_is_g711() -> None:
    x = torch.tensor([0.0, 100 / 32768, -0.5, 32124 / 32768, 1.0])
    y = mulaw_round_trip(x)
    # G.711 decodes to 0, 104, -16764 and the top level 32124 (in 16-bit units)
    assert (y * 32768).round().tolist() == [0.0, 104.0, -16764.0, 32124.0, 32124.0]
    fine = torch.linspace(-0.9, 0.9, 1001)
    error = (mulaw_round_trip(fine) - fine).abs() / fine.abs().clamp(min=1e-2)
    assert error.max() < 0.07  # 8-bit companding: a few per cent relative error


def test_pitch_shift_moves_a_sine_and_keeps_its_length() -> None:
    n = SR
    t = torch.arange(n) / SR
    x = (0.3 * torch.sin(2 * math.pi * 440 * t)).repeat(2, 1)
    lengths = torch.tensor([n, 12_000])
    x[1, 12_000:] = 0
    for semitones in (2.0, -2.0):
        y, new_lengths = pitch_shift(x, lengths, _gen(), semitones=(semitones, semitones))
        assert y.shape == x.shape and torch.equal(new_lengths, lengths)
        expected = 440 * 2 ** (semitones / 12)
        for row in range(2):
            assert _peak_hz(y[row, : int(lengths[row])]) == pytest.approx(expected, abs=3.0)
        assert (y[1, 12_000:] == 0).all()


def test_time_stretch_changes_length_not_pitch() -> None:
    t = torch.arange(SR) / SR
    x = (0.3 * torch.sin(2 * math.pi * 300 * t))[None, :]
    lengths = torch.tensor([SR])
    y, new_lengths = time_stretch(x, lengths, _gen(), rates=(1.25, 1.25))
    assert int(new_lengths[0]) == round(SR / 1.25) and y.shape[1] == int(new_lengths[0])
    assert _peak_hz(y[0]) == pytest.approx(300.0, abs=3.0)
    slow, slow_lengths = time_stretch(x, lengths, _gen(), rates=(0.8, 0.8))
    assert int(slow_lengths[0]) == round(SR / 0.8)


def test_mulaw_round_trip_equals_the_monitors_g711_decoder() -> None:
    """Training's telephone channel and the monitor's RTP path must quantise alike (one G.711 law)."""
    np = pytest.importorskip("numpy")
    from serstream.rtp.g711 import decode_ulaw, encode_ulaw

    x = np.concatenate([np.linspace(-1.0, 1.0, 20001), np.random.default_rng(0).uniform(-1, 1, 5000)]).astype(np.float32)
    runtime = decode_ulaw(encode_ulaw(x))
    training = mulaw_round_trip(torch.from_numpy(x)).numpy()
    assert np.array_equal(runtime, training)
