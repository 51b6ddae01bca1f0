"""Waveform augmentations: shapes, zero padding, reproducibility, and that each does its job."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from training.augment import (  # noqa: E402
    AugmentConfig,
    WaveAugment,
    add_noise,
    mulaw_roundtrip,
    pitch_shift,
    random_crop,
    random_gain,
    reverb,
    spec_augment,
    speed,
    telephony,
    time_stretch,
)

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
    "gain": lambda x, l, g: random_gain(x, l, g),
    "noise": lambda x, l, g: add_noise(x, l, g),
    "telephony": lambda x, l, g: telephony(x, l, g),
    "reverb": lambda x, l, g: reverb(x, l, g),
    "speed": lambda x, l, g: speed(x, l, g),
    "pitch": lambda x, l, g: pitch_shift(x, l, g),
    "stretch": lambda x, l, g: time_stretch(x, l, g),
    "crop": lambda x, l, g: random_crop(x, l, g, 12_000),
    "compose": lambda x, l, g: WaveAugment(AugmentConfig(crop_s=0.9))(x, l, g),
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
    if name != "telephony":  # the one op with no random parameter at p=1
        assert not torch.equal(y1, y3)
    assert torch.equal(x, _batch()[0])  # the input is never modified in place


def test_probability_zero_leaves_the_batch_alone() -> None:
    x, lengths = _batch()
    for op in (random_gain, add_noise, telephony, reverb, speed, pitch_shift, time_stretch):
        y, l = op(x, lengths, _gen(), p=0.0)
        assert torch.equal(y, x) and torch.equal(l, lengths)
    y, l = WaveAugment(AugmentConfig.disabled())(x, lengths, _gen())
    assert torch.equal(y, x) and torch.equal(l, lengths)


def test_gain_is_within_range() -> None:
    x, lengths = _batch()
    y, _ = random_gain(x, lengths, _gen(), db_range=(-6.0, -6.0))
    assert torch.allclose(y, x * 10 ** (-6 / 20), atol=1e-6)


@pytest.mark.parametrize("kind", ["white", "pink", "babble"])
def test_noise_snr_matches_the_request(kind: str) -> None:
    x, lengths = _batch(rows=8)
    y, _ = add_noise(x, lengths, _gen(), snr_db=(12.0, 12.0), kinds=(kind,))
    for row in range(x.shape[0]):
        n = int(lengths[row])
        signal, noise = x[row, :n], (y - x)[row, :n]
        snr = 10 * math.log10(float(signal.pow(2).sum() / noise.pow(2).sum()))
        assert snr == pytest.approx(12.0, abs=0.2)


def test_pink_noise_has_more_low_than_high_energy() -> None:
    x, lengths = _batch(rows=4)
    quiet = 1e-3 * (x != 0).float()
    y, _ = add_noise(quiet, lengths, _gen(), snr_db=(0, 0), kinds=("pink",))
    noise = y[0, : int(lengths[0])]
    power = torch.fft.rfft(noise).abs().pow(2)
    freqs = torch.fft.rfftfreq(noise.numel(), 1 / SR)
    low = power[(freqs > 100) & (freqs < 500)].mean()
    high = power[(freqs > 4000) & (freqs < 8000)].mean()
    assert low > 5 * high


def test_babble_uses_only_other_groups() -> None:
    n = 8000
    t = torch.arange(n) / SR
    x = 0.1 * torch.randn(4, n, generator=_gen(1))  # rows 0-2: one speaker (group 0), noise-like
    x[3] = 0.1 * torch.sin(2 * math.pi * 1000 * t)  # row 3: the only other speaker, a 1 kHz tone
    lengths = torch.full((4,), n)
    groups = torch.tensor([0, 0, 0, 1])
    y, _ = add_noise(x, lengths, _gen(), snr_db=(10, 10), kinds=("babble",), groups=groups)
    for row in (0, 1, 2):
        babble = (y - x)[row]
        assert babble.abs().max() > 0
        assert _peak_hz(babble) == pytest.approx(1000.0, abs=2.0)
        # all of it is the tone: its energy sits in the few bins around 1 kHz
        power = torch.fft.rfft(babble).abs().pow(2)
        freqs = torch.fft.rfftfreq(n, 1 / SR)
        assert power[(freqs > 980) & (freqs < 1020)].sum() / power.sum() > 0.95


def test_telephony_removes_energy_above_4khz_and_below_300hz() -> None:
    noise = 0.1 * torch.randn(3, SR, generator=_gen())
    lengths = torch.full((3,), SR)
    y, _ = telephony(noise, lengths, _gen())
    power = torch.fft.rfft(y).abs().pow(2)
    freqs = torch.fft.rfftfreq(SR, 1 / SR)
    total = power.sum()
    assert power[:, freqs > 4000].sum() / total < 1e-6
    assert power[:, freqs < 250].sum() / total < 1e-6
    assert power[:, (freqs > 500) & (freqs < 3000)].sum() / total > 0.7


def test_mulaw_roundtrip_is_g711() -> None:
    x = torch.tensor([0.0, 100 / 32768, -0.5, 32124 / 32768, 1.0])
    y = mulaw_roundtrip(x)
    # G.711 decodes to 0, 104, -16764 and the top level 32124 (in 16-bit units)
    assert (y * 32768).round().tolist() == [0.0, 104.0, -16764.0, 32124.0, 32124.0]
    fine = torch.linspace(-0.9, 0.9, 1001)
    error = (mulaw_roundtrip(fine) - fine).abs() / fine.abs().clamp(min=1e-2)
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


def test_speed_changes_pitch_and_length_together() -> None:
    t = torch.arange(SR) / SR
    x = (0.3 * torch.sin(2 * math.pi * 300 * t))[None, :]
    y, new_lengths = speed(x, torch.tensor([SR]), _gen(), factors=(1.1, 1.1))
    assert int(new_lengths[0]) == pytest.approx(SR / 1.1, abs=1)
    assert _peak_hz(y[0]) == pytest.approx(330.0, abs=3.0)


def test_reverb_adds_a_tail_and_keeps_the_level() -> None:
    x = torch.zeros(1, SR)
    x[0, 1000:1400] = 0.3 * torch.randn(400, generator=_gen())
    lengths = torch.tensor([SR])
    y, _ = reverb(x, lengths, _gen(), rt60=(0.5, 0.5), drr_db=(0.0, 0.0))
    assert y[0, 2000:6000].pow(2).sum() > 100 * x[0, 2000:6000].pow(2).sum() + 1e-6
    assert float(y.pow(2).mean().sqrt()) == pytest.approx(float(x.pow(2).mean().sqrt()), rel=0.05)


def test_random_crop_windows_long_rows_only() -> None:
    x = torch.arange(20, dtype=torch.float32).repeat(3, 1) + 1
    lengths = torch.tensor([20, 10, 5])
    x = x * (torch.arange(20)[None, :] < lengths[:, None])
    starts = set()
    for seed in range(20):
        y, new_lengths = random_crop(x, lengths, _gen(seed), max_len=8)
        assert y.shape == (3, 8) and new_lengths.tolist() == [8, 8, 5]
        assert torch.equal(y[0], torch.arange(8, dtype=torch.float32) + y[0, 0])  # a contiguous window
        assert torch.equal(y[2, :5], x[2, :5])
        starts.add(float(y[0, 0]))
    assert len(starts) > 3


def test_spec_augment_masks_inside_valid_frames() -> None:
    features = torch.randn(4, 40, 100, generator=_gen()) + 5.0
    frame_lengths = torch.tensor([100, 60, 30, 100])
    settings = dict(
        time_masks=2, freq_masks=2, max_time_width=10, max_freq_width=6, frame_lengths=frame_lengths
    )
    out = spec_augment(features, _gen(), **settings)
    assert out.shape == features.shape
    changed = out != features
    assert changed.any()
    for row, valid in enumerate(frame_lengths.tolist()):
        assert not changed[row, :, valid:].any()
    # masks fill with the row's own mean, so the masked cells are not zero (silence)
    assert (out[changed] > 3.0).all()
    assert torch.equal(out, spec_augment(features, _gen(), **settings))
