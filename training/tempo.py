"""Batch-level augmentations on padded waveforms, applied after the split, to training data only.

Every function takes ``x: Tensor[B, N]`` (float, 16 kHz, rows zero-padded past
``lengths: Tensor[B]``) and a ``torch.Generator``, picks each row with
probability ``p``, and returns ``(x, lengths)``: padding stays zero and the
same generator state gives the same output. Ops that change duration
(:func:`speed`, :func:`time_stretch`, :func:`random_crop`) return new lengths
and may change ``N``.

What each one models:

- :func:`random_gain`: recording level (the corpora differ by 10+ dB).
- :func:`add_noise`: white, pink or babble noise at a random SNR; babble is the
  sum of 3-5 other rows of the batch (other training speakers), shifted.
- :func:`telephony`: 300-3400 Hz band, 8 kHz, G.711 mu-law round trip, so RTP
  calls are not out of domain.
- :func:`reverb`: synthetic room impulse responses (decaying noise plus early
  reflections) by FFT convolution.
- :func:`speed` (pitch and tempo), :func:`pitch_shift` (pitch only: resample,
  then a phase vocoder restores the duration), :func:`time_stretch` (tempo only).
- :func:`random_crop`: a random window of at most ``max_len`` samples.
- :func:`spec_augment`: time and frequency masks on ``[B, M, T]`` features.

:class:`WaveAugment` composes the waveform ops with per-op probabilities from
an :class:`AugmentConfig`. Random numbers are drawn on the generator's device,
so a CPU generator drives CUDA tensors too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "AugmentConfig",
    "WaveAugment",
    "add_noise",
    "mulaw_roundtrip",
    "pitch_shift",
    "random_crop",
    "random_gain",
    "reverb",
    "spec_augment",
    "speed",
    "telephony",
    "time_stretch",
]

SAMPLE_RATE = 16_000
NOISE_KINDS = ("white", "pink", "babble")

# Phase-vocoder analysis: 32 ms window, 10 ms hop (69 % overlap) at 16 kHz; the
# usual 75 % costs a third more for a difference augmentation does not need.
_PV_N_FFT = 512
_PV_HOP = 160
_PV_CHUNK = 8


# --------------------------------------------------------------------------- helpers


def _rand(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> Tensor:
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def _randn(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> Tensor:
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


def _uniform(
    low: float, high: float, n: int, generator: torch.Generator, device: torch.device
) -> Tensor:
    return low + (high - low) * _rand((n,), generator, device)


def _pick_rows(n: int, p: float, generator: torch.Generator, device: torch.device) -> Tensor:
    """Indices of the rows an op applies to (each row independently with probability p)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"probability {p} is outside [0, 1]")
    return torch.nonzero(_rand((n,), generator, device) < p).flatten()


def _valid(lengths: Tensor, n: int) -> Tensor:
    """[B, n] bool: True on real samples, False on padding."""
    return torch.arange(n, device=lengths.device)[None, :] < lengths[:, None]


def _zero_padding(x: Tensor, lengths: Tensor) -> Tensor:
    # masked_fill, not a multiply by the bool mask: the multiply converts the mask
    # to float first, which costs several times the arithmetic itself.
    return x.masked_fill(~_valid(lengths, x.shape[1]), 0.0)


def _check(x: Tensor, lengths: Tensor) -> None:
    if x.dim() != 2 or lengths.dim() != 1 or lengths.shape[0] != x.shape[0]:
        raise ValueError(
            f"expected x [B, N] and lengths [B], got {tuple(x.shape)} and {tuple(lengths.shape)}"
        )
    if lengths.numel() and (int(lengths.max()) > x.shape[1] or int(lengths.min()) < 0):
        raise ValueError("lengths must lie in [0, N]")


def _put_rows(x: Tensor, rows: Tensor, values: Tensor) -> Tensor:
    out = x.clone()
    out[rows] = values.to(x.dtype)
    return out


def _assemble(
    x: Tensor, lengths: Tensor, rows: Tensor, new_rows: Tensor, new_lengths: Tensor
) -> tuple[Tensor, Tensor]:
    """Rebuild a batch where ``rows`` changed duration; the width fits the longest row."""
    lengths_out = lengths.clone()
    lengths_out[rows] = new_lengths.to(lengths.dtype)
    width = int(lengths_out.max()) if lengths_out.numel() else 0
    out = torch.zeros((x.shape[0], width), dtype=x.dtype, device=x.device)
    keep = min(width, x.shape[1])
    out[:, :keep] = x[:, :keep]
    new_keep = min(width, new_rows.shape[1])
    out[rows] = 0.0
    out[rows, :new_keep] = new_rows[:, :new_keep].to(x.dtype)
    return _zero_padding(out, lengths_out), lengths_out


def _rms(x: Tensor, lengths: Tensor) -> Tensor:
    power = _zero_padding(x * x, lengths).sum(dim=1) / lengths.clamp(min=1)
    return power.sqrt()


# --------------------------------------------------------------------------- gain and noise


def random_gain(
    x: Tensor,
    lengths: Tensor,
    generator: torch.Generator,
    p: float = 1.0,
    db_range: tuple[float, float] = (-24.0, 12.0),
) -> tuple[Tensor, Tensor]:
    """Scale chosen rows by a gain drawn uniformly in dB; clipped to [-1, 1] like an ADC."""
    _check(x, lengths)
    rows = _pick_rows(x.shape[0], p, generator, x.device)
    if rows.numel() == 0:
        return x, lengths
    gain_db = _uniform(*db_range, rows.numel(), generator, x.device)
    gained = (x[rows] * (10.0 ** (gain_db / 20.0))[:, None]).clamp(-1.0, 1.0)
    return _put_rows(x, rows, gained), lengths


def _pink(n_rows: int, n: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """Noise with a 1/f power spectrum, shaped from white noise in the frequency domain."""
    white = _randn((n_rows, n), generator, device)
    spectrum = torch.fft.rfft(white, dim=1)
    bins = torch.arange(spectrum.shape[1], device=device, dtype=white.dtype)
    spectrum = spectrum / bins.clamp(min=1.0).sqrt()
    return torch.fft.irfft(spectrum, n=n, dim=1)


def _babble(
    x: Tensor,
    lengths: Tensor,
    rows: Tensor,
    generator: torch.Generator,
    groups: Tensor | None,
    n_sources: tuple[int, int],
) -> tuple[Tensor, Tensor]:
    """Sum of other rows, each at unit power and circularly shifted.

    Each source row is first tiled over the batch width (so a short utterance
    repeats instead of leaving silent gaps), then rolled by a random offset.
    Returns (noise [R, N], ok [R]); ``ok`` is False where no other row could
    serve (a batch of one, or every other row from the same group/speaker);
    rows with fewer usable others than asked get as many as there are.
    """
    batch, n = x.shape
    device = x.device
    n_rows = rows.numel()
    k_max = min(n_sources[1], batch)
    scores = _rand((n_rows, batch), generator, device)
    itself = torch.arange(batch, device=device)[None, :] == rows[:, None]
    unusable = itself | (lengths[None, :] <= 0)
    if groups is not None:
        groups = groups.to(device)
        unusable |= groups[None, :] == groups[rows][:, None]
    scores = scores.masked_fill(unusable, -1.0)
    top, sources = scores.topk(k_max, dim=1)
    wanted = torch.randint(
        n_sources[0], n_sources[1] + 1, (n_rows,), generator=generator, device=generator.device
    ).to(device)
    use = (torch.arange(k_max, device=device)[None, :] < wanted[:, None]) & (top >= 0)
    period = lengths.clamp(min=1)
    tiled = x.gather(1, torch.arange(n, device=device)[None, :] % period[:, None])
    tiled = tiled / tiled.pow(2).mean(dim=1, keepdim=True).add(1e-12).sqrt()
    shifts = (_rand((k_max,), generator, device) * n).long().tolist()
    noise = torch.zeros((n_rows, n), dtype=x.dtype, device=device)
    for k, shift in enumerate(shifts):
        voice = torch.roll(tiled.index_select(0, sources[:, k]), shifts=shift, dims=1)
        noise += voice * use[:, k : k + 1]
    return noise, use.any(dim=1)


def add_noise(
    x: Tensor,
    lengths: Tensor,
    generator: torch.Generator,
    p: float = 1.0,
    snr_db: tuple[float, float] = (5.0, 30.0),
    kinds: tuple[str, ...] = NOISE_KINDS,
    groups: Tensor | None = None,
    babble_sources: tuple[int, int] = (3, 5),
) -> tuple[Tensor, Tensor]:
    """Add noise at an SNR drawn uniformly in ``snr_db`` (measured over each row's real samples).

    ``kinds`` is drawn uniformly per row. Babble sums ``babble_sources`` other
    rows of the batch; pass ``groups`` (speaker ids as ints) to keep a speaker
    out of their own babble. A row with no usable other row gets pink noise.
    Silent rows stay silent (no signal power to set an SNR against).
    """
    _check(x, lengths)
    unknown = set(kinds) - set(NOISE_KINDS)
    if not kinds or unknown:
        raise ValueError(f"noise kinds must be drawn from {NOISE_KINDS}, got {kinds}")
    rows = _pick_rows(x.shape[0], p, generator, x.device)
    if rows.numel() == 0:
        return x, lengths
    n_rows, n = rows.numel(), x.shape[1]
    device = x.device
    kind_index = torch.randint(
        len(kinds), (n_rows,), generator=generator, device=generator.device
    ).to(device)
    snr = _uniform(*snr_db, n_rows, generator, device)
    noise = torch.zeros((n_rows, n), dtype=x.dtype, device=device)
    want = {kind: kind_index == i for i, kind in enumerate(kinds)}
    pink_rows = want.get("pink", torch.zeros(n_rows, dtype=torch.bool, device=device)).clone()
    if "babble" in want and bool(want["babble"].any()):
        sel = torch.nonzero(want["babble"]).flatten()
        babble, ok = _babble(x, lengths, rows[sel], generator, groups, babble_sources)
        noise[sel] = babble.to(x.dtype)
        pink_rows[sel[~ok]] = True
    if "white" in want and bool(want["white"].any()):
        sel = torch.nonzero(want["white"]).flatten()
        noise[sel] = _randn((sel.numel(), n), generator, device).to(x.dtype)
    if bool(pink_rows.any()):
        sel = torch.nonzero(pink_rows).flatten()
        noise[sel] = _pink(sel.numel(), n, generator, device).to(x.dtype)

    sub, sub_len = x[rows], lengths[rows]
    noise = _zero_padding(noise, sub_len)
    signal_power = _rms(sub, sub_len).pow(2)
    noise_power = _rms(noise, sub_len).pow(2)
    scale = torch.where(
        noise_power > 0,
        (signal_power / (noise_power.clamp(min=1e-20) * 10.0 ** (snr / 10.0))).sqrt(),
        torch.zeros_like(noise_power),
    )
    noisy = _zero_padding((sub + noise * scale[:, None]).clamp(-1.0, 1.0), sub_len)
    return _put_rows(x, rows, noisy), lengths


# --------------------------------------------------------------------------- telephony


def mulaw_roundtrip(x: Tensor) -> Tensor:
    """G.711 mu-law encode then decode (8 bits per sample), as torch integer ops.

    Input and output are floats in [-1, 1]. This is the segmented G.711 law
    (bias 132, eight segments of 16 steps), not the continuous mu = 255 curve.
    """
    pcm = (x.clamp(-1.0, 1.0) * 32767.0).round().to(torch.int32)
    negative = pcm < 0
    magnitude = pcm.abs().clamp(max=32635) + 132
    segment = torch.zeros_like(magnitude)
    for step in range(8, 15):  # segment = number of thresholds 2^8 .. 2^14 reached
        segment += (magnitude >= (1 << step)).to(torch.int32)
    mantissa = torch.bitwise_and(torch.bitwise_right_shift(magnitude, segment + 3), 0xF)
    decoded = torch.bitwise_left_shift(torch.bitwise_left_shift(mantissa, 3) + 132, segment) - 132
    decoded = torch.where(negative, -decoded, decoded)
    return decoded.to(x.dtype) / 32768.0


def telephony(
    x: Tensor,
    lengths: Tensor,
    generator: torch.Generator,
    p: float = 1.0,
    band_hz: tuple[float, float] = (300.0, 3400.0),
    sample_rate: int = SAMPLE_RATE,
) -> tuple[Tensor, Tensor]:
    """A phone channel: band-limit, down to 8 kHz, G.711 mu-law, back up to ``sample_rate``.

    Band limiting and resampling are done on each row's spectrum (ideal
    filters), so nothing above 4 kHz survives.
    """
    _check(x, lengths)
    if sample_rate % 8000:
        raise ValueError("telephony needs a sample rate that is a multiple of 8000")
    rows = _pick_rows(x.shape[0], p, generator, x.device)
    if rows.numel() == 0:
        return x, lengths
    sub, sub_len = x[rows], lengths[rows]
    n = sub.shape[1]
    factor = sample_rate // 8000
    spectrum = torch.fft.rfft(sub, dim=1)
    freqs = torch.fft.rfftfreq(n, d=1.0 / sample_rate).to(sub.device)
    band = (freqs >= band_hz[0]) & (freqs <= band_hz[1])
    narrow = torch.fft.irfft(spectrum * band, n=n, dim=1)
    # After the band limit nothing is left above 4 kHz, so decimation cannot alias.
    phone = mulaw_roundtrip(narrow[:, ::factor])
    n_phone = phone.shape[1]
    phone_spectrum = torch.fft.rfft(phone, dim=1)
    phone_freqs = torch.fft.rfftfreq(n_phone, d=1.0 / 8000).to(sub.device)
    # The receiving end band-limits too; it also removes the codec noise outside the band.
    phone_band = (phone_freqs >= band_hz[0]) & (phone_freqs <= band_hz[1])
    up = torch.fft.irfft(phone_spectrum * phone_band, n=n_phone * factor, dim=1) * factor
    up = up[:, :n] if up.shape[1] >= n else torch.nn.functional.pad(up, (0, n - up.shape[1]))
    return _put_rows(x, rows, _zero_padding(up, sub_len)), lengths


# --------------------------------------------------------------------------- reverberation


def _room_impulses(
    rt60: Tensor,
    drr_db: Tensor,
    sample_rate: int,
    generator: torch.Generator,
    early_reflections: bool,
) -> Tensor:
    """[R, L] impulse responses: a direct path, sparse early reflections, a decaying tail.

    The tail is Gaussian noise under an envelope that falls 60 dB in ``rt60``
    seconds, scaled so the direct-to-reverberant energy ratio is ``drr_db``.
    """
    device = rt60.device
    n_rows = rt60.shape[0]
    length = max(int(math.ceil(float(rt60.max()) * sample_rate)), 2)
    t = torch.arange(length, device=device, dtype=torch.float32) / sample_rate
    envelope = 10.0 ** (-3.0 * t[None, :] / rt60[:, None])
    tail = _randn((n_rows, length), generator, device) * envelope
    if early_reflections:
        # A handful of discrete wall reflections in the first 50 ms, above the tail.
        n_early = 6
        first, last = int(0.002 * sample_rate), min(int(0.05 * sample_rate), length - 1)
        if last > first:
            where = first + (_rand((n_rows, n_early), generator, device) * (last - first)).long()
            sign = torch.where(_rand((n_rows, n_early), generator, device) < 0.5, -1.0, 1.0)
            spread = 0.5 + 0.5 * _rand((n_rows, n_early), generator, device)
            level = 3.0 * envelope.gather(1, where) * spread
            tail.scatter_add_(1, where, sign * level)
    tail[:, 0] = 0.0
    tail_energy = tail.pow(2).sum(dim=1).clamp(min=1e-12)
    tail = tail * (10.0 ** (-drr_db / 10.0) / tail_energy).sqrt()[:, None]
    tail[:, 0] = 1.0
    return tail


def reverb(
    x: Tensor,
    lengths: Tensor,
    generator: torch.Generator,
    p: float = 1.0,
    rt60: tuple[float, float] = (0.15, 0.8),
    drr_db: tuple[float, float] = (0.0, 12.0),
    early_reflections: bool = True,
    sample_rate: int = SAMPLE_RATE,
) -> tuple[Tensor, Tensor]:
    """Convolve chosen rows with a synthetic room (RT60 and direct-to-reverberant ratio drawn).

    The output keeps each row's length (the tail past the end is cut) and its RMS level.
    """
    _check(x, lengths)
    rows = _pick_rows(x.shape[0], p, generator, x.device)
    if rows.numel() == 0:
        return x, lengths
    sub, sub_len = x[rows], lengths[rows]
    n_rows, n = sub.shape
    t60 = _uniform(*rt60, n_rows, generator, x.device)
    drr = _uniform(*drr_db, n_rows, generator, x.device)
    impulse = _room_impulses(t60, drr, sample_rate, generator, early_reflections)
    n_fft = 1 << (n + impulse.shape[1] - 1).bit_length()
    wet = torch.fft.irfft(
        torch.fft.rfft(sub.float(), n=n_fft, dim=1) * torch.fft.rfft(impulse, n=n_fft, dim=1),
        n=n_fft,
        dim=1,
    )[:, :n]
    wet = _zero_padding(wet, sub_len)
    gain = _rms(sub.float(), sub_len) / _rms(wet, sub_len).clamp(min=1e-12)
    return _put_rows(x, rows, (wet * gain[:, None]).clamp(-1.0, 1.0)), lengths


# --------------------------------------------------------------------------- resampling, vocoder


def _resample_rows(x: Tensor, lengths: Tensor, factor: Tensor) -> tuple[Tensor, Tensor]:
    """Read each row at positions ``i * factor`` (linear interpolation).

    factor > 1 plays faster: shorter, higher. Linear interpolation skips the
    anti-alias filter; at the factors used here (<= 1.13) the folded band
    (above 7 kHz) holds little speech energy.
    """
    n = x.shape[1]
    new_lengths = (torch.floor((lengths.clamp(min=1) - 1).float() / factor) + 1).long()
    new_lengths = torch.where(lengths > 0, new_lengths, torch.zeros_like(new_lengths))
    width = max(int(new_lengths.max()), 1)
    positions = torch.arange(width, device=x.device, dtype=torch.float32)[None, :] * factor[:, None]
    left = positions.floor().long()
    frac = (positions - left).to(x.dtype)
    left_c = left.clamp(max=n - 1)
    right_c = (left + 1).clamp(max=n - 1)
    out = x.gather(1, left_c) * (1.0 - frac) + x.gather(1, right_c) * frac
    return _zero_padding(out, new_lengths), new_lengths


def _phase_vocoder_rows(x: Tensor, lengths: Tensor, target_lengths: Tensor) -> Tensor:
    """Time-stretch each row to ``target_lengths`` samples keeping its pitch (batched).

    Runs in chunks of rows: the [rows, bins, frames] intermediates of a small
    chunk stay in cache, which roughly halves the CPU time of one big batch.
    """
    width = max(int(target_lengths.max()), 1)
    chunks = [
        _phase_vocoder_chunk(x[part], lengths[part], target_lengths[part], width)
        for part in (slice(i, i + _PV_CHUNK) for i in range(0, x.shape[0], _PV_CHUNK))
    ]
    return torch.cat(chunks, dim=0)


def _phase_vocoder_chunk(x: Tensor, lengths: Tensor, target_lengths: Tensor, width: int) -> Tensor:
    """One chunk of :func:`_phase_vocoder_rows`, output ``width`` samples wide.

    STFT, then for output frame j read the input at frame ``j * rate`` (rate =
    length / target, per row): magnitudes interpolated, phases advanced by the
    measured instantaneous frequency, then ISTFT.
    """
    window = torch.hann_window(_PV_N_FFT, device=x.device, dtype=torch.float32)
    spec = torch.stft(
        x.float(), _PV_N_FFT, _PV_HOP, window=window, center=True, return_complex=True
    )
    n_rows, n_bins, n_frames = spec.shape
    rate = lengths.float().clamp(min=1) / target_lengths.float().clamp(min=1)
    n_out = width // _PV_HOP + 1
    steps = torch.arange(n_out, device=x.device, dtype=torch.float32)[None, :] * rate[:, None]
    first = steps.floor().long().clamp(max=n_frames - 1)
    second = (first + 1).clamp(max=n_frames - 1)
    alpha = (steps - steps.floor())[:, None, :]
    # Real-valued hypot/atan2/cos/sin: several times faster on CPU than complex abs/angle/polar.
    real, imag = spec.real.contiguous(), spec.imag.contiguous()
    magnitude, angle = torch.hypot(real, imag), torch.atan2(imag, real)

    def at(values: Tensor, index: Tensor) -> Tensor:
        return values.gather(2, index[:, None, :].expand(n_rows, n_bins, n_out))

    mag = (1.0 - alpha) * at(magnitude, first) + alpha * at(magnitude, second)
    expected = (2.0 * math.pi * _PV_HOP / _PV_N_FFT) * torch.arange(
        n_bins, device=x.device, dtype=torch.float32
    )[None, :, None]
    deviation = at(angle, second) - at(angle, first) - expected
    deviation = deviation - 2.0 * math.pi * torch.round(deviation / (2.0 * math.pi))
    advance = expected + deviation
    phase = angle[:, :, :1] + torch.cumsum(advance, dim=2) - advance
    # Wrapped phases keep cos/sin on their fast path (no large-argument reduction).
    phase = torch.remainder(phase + math.pi, 2.0 * math.pi) - math.pi
    stretched = torch.complex(mag * torch.cos(phase), mag * torch.sin(phase))
    out = torch.istft(stretched, _PV_N_FFT, _PV_HOP, window=window, center=True, length=width)
    return _zero_padding(out, target_lengths).to(x.dtype)


def speed(
    x: Tensor,
    lengths: Tensor,
    generator: torch.Generator,
    p: float = 1.0,
    factors: tuple[float, float] = (0.9, 1.1),
) -> tuple[Tensor, Tensor]:
    """Play chosen rows faster or slower by resampling: pitch and tempo change together."""
    _check(x, lengths)
    rows = _pick_rows(x.shape[0], p, generator, x.device)
    if rows.numel() == 0:
        return x, lengths
    factor = _uniform(*factors, rows.numel(), generator, x.device)
    new_rows, new_lengths = _resample_rows(x[rows], lengths[rows], factor)
    return _assemble(x, lengths, rows, new_rows, new_lengths)


def time_stretch(
    x: Tensor,
    lengths: Tensor,
    generator: torch.Generator,
    p: float = 1.0,
    rates: tuple[float, float] = (0.9, 1.1),
) -> tuple[Tensor, Tensor]:
    """Change tempo, keep pitch (phase vocoder). rate > 1 is faster: length / rate."""
    _check(x, lengths)
    rows = _pick_rows(x.shape[0], p, generator, x.device)
    if rows.numel() == 0:
        return x, lengths
    rate = _uniform(*rates, rows.numel(), generator, x.device)
    sub_len = lengths[rows]
    target = torch.where(sub_len > 0, (sub_len.float() / rate).round().long().clamp(min=1), sub_len)
    stretched = _phase_vocoder_rows(x[rows], sub_len, target)
    return _assemble(x, lengths, rows, stretched, target)


def pitch_shift(
    x: Tensor,
    lengths: Tensor,
    generator: torch.Generator,
    p: float = 1.0,
    semitones: tuple[float, float] = (-2.0, 2.0),
) -> tuple[Tensor, Tensor]:
    """Shift pitch by a uniform number of semitones, keeping each row's length.

    Resampling by 2^(s/12) moves pitch and duration together; the phase
    vocoder then stretches the result back to the original length.
    """
    _check(x, lengths)
    rows = _pick_rows(x.shape[0], p, generator, x.device)
    if rows.numel() == 0:
        return x, lengths
    ratio = 2.0 ** (_uniform(*semitones, rows.numel(), generator, x.device) / 12.0)
    sub_len = lengths[rows]
    resampled, resampled_len = _resample_rows(x[rows], sub_len, ratio)
    restored = _phase_vocoder_rows(resampled, resampled_len, sub_len)
    n = x.shape[1]
    if restored.shape[1] < n:
        restored = torch.nn.functional.pad(restored, (0, n - restored.shape[1]))
    return _put_rows(x, rows, restored[:, :n].clamp(-1.0, 1.0)), lengths


def random_crop(
    x: Tensor, lengths: Tensor, generator: torch.Generator, max_len: int
) -> tuple[Tensor, Tensor]:
    """Cut every row longer than ``max_len`` to a window at a random position.

    Shorter rows are kept whole; the batch width becomes at most ``max_len``.
    """
    _check(x, lengths)
    if max_len <= 0:
        raise ValueError("max_len must be positive")
    width = min(x.shape[1], max_len)
    slack = (lengths - max_len).clamp(min=0)
    draw = _rand((x.shape[0],), generator, x.device)
    start = (draw * (slack + 1).float()).long().clamp(max=slack)
    index = start[:, None] + torch.arange(width, device=x.device)[None, :]
    index = index.clamp(max=x.shape[1] - 1)
    new_lengths = lengths.clamp(max=max_len)
    return _zero_padding(x.gather(1, index), new_lengths), new_lengths


# --------------------------------------------------------------------------- SpecAugment


def spec_augment(
    features: Tensor,
    generator: torch.Generator,
    time_masks: int = 2,
    freq_masks: int = 2,
    max_time_width: int = 20,
    max_freq_width: int = 8,
    frame_lengths: Tensor | None = None,
    p: float = 1.0,
    fill: float | None = None,
) -> Tensor:
    """Time and frequency masks on ``features: [B, M, T]`` (Park et al. 2019).

    Each chosen row gets ``time_masks`` spans of up to ``max_time_width``
    frames (inside its ``frame_lengths``) and ``freq_masks`` bands of up to
    ``max_freq_width`` bins. Masked cells take ``fill``, or with None the row's
    own mean over its valid frames (so a log-mel mask is neither silence nor a
    loud band).
    """
    if features.dim() != 3:
        raise ValueError(f"expected features [B, M, T], got {tuple(features.shape)}")
    batch, n_mels, n_frames = features.shape
    device = features.device
    if frame_lengths is None:
        frame_lengths = torch.full((batch,), n_frames, dtype=torch.long, device=device)
    frame_lengths = frame_lengths.to(device).clamp(max=n_frames)
    rows = _pick_rows(batch, p, generator, device)
    if rows.numel() == 0:
        return features
    n_rows = rows.numel()
    valid_frames = frame_lengths[rows]
    time_axis = torch.arange(n_frames, device=device)[None, :]
    mel_axis = torch.arange(n_mels, device=device)[None, :]
    time_mask = torch.zeros((n_rows, n_frames), dtype=torch.bool, device=device)
    freq_mask = torch.zeros((n_rows, n_mels), dtype=torch.bool, device=device)

    def spans(count: int, max_width: int, extent: Tensor, axis: Tensor, mask: Tensor) -> Tensor:
        for _ in range(count):
            width = (_rand((n_rows,), generator, device) * (max_width + 1)).long()
            width = torch.minimum(width, extent)
            start = (_rand((n_rows,), generator, device) * (extent - width + 1).float()).long()
            mask = mask | ((axis >= start[:, None]) & (axis < (start + width)[:, None]))
        return mask

    time_mask = spans(time_masks, max_time_width, valid_frames, time_axis, time_mask)
    all_mels = torch.full((n_rows,), n_mels, dtype=torch.long, device=device)
    freq_mask = spans(freq_masks, max_freq_width, all_mels, mel_axis, freq_mask)
    sub = features[rows]
    valid = (time_axis < valid_frames[:, None])[:, None, :]
    if fill is None:
        count = (valid_frames.clamp(min=1) * n_mels).to(sub.dtype)
        value = (sub.masked_fill(~valid, 0.0).sum(dim=(1, 2)) / count)[:, None, None]
    else:
        value = torch.full((n_rows, 1, 1), float(fill), dtype=sub.dtype, device=device)
    # Padding frames stay as they are: the masks only cover real frames.
    masked_cells = (time_mask[:, None, :] | freq_mask[:, :, None]) & valid
    masked = torch.where(masked_cells, value, sub)
    out = features.clone()
    out[rows] = masked
    return out


# --------------------------------------------------------------------------- composition


@dataclass(frozen=True)
class AugmentConfig:
    """Per-op probabilities and ranges for :class:`WaveAugment` (0 disables an op).

    ``crop_s`` crops rows to a random window first (and again after tempo
    changes); None keeps whole utterances.
    """

    sample_rate: int = SAMPLE_RATE
    crop_s: float | None = None
    p_speed: float = 0.0
    speed_factors: tuple[float, float] = (0.9, 1.1)
    p_time_stretch: float = 0.1
    stretch_rates: tuple[float, float] = (0.9, 1.1)
    p_pitch: float = 0.2
    semitones: tuple[float, float] = (-2.0, 2.0)
    p_reverb: float = 0.2
    rt60_s: tuple[float, float] = (0.15, 0.8)
    drr_db: tuple[float, float] = (0.0, 12.0)
    p_noise: float = 0.4
    snr_db: tuple[float, float] = (5.0, 30.0)
    noise_kinds: tuple[str, ...] = NOISE_KINDS
    p_telephony: float = 0.1
    p_gain: float = 0.8
    gain_db: tuple[float, float] = (-24.0, 12.0)
    chunk_rows: int = 8

    @classmethod
    def disabled(cls) -> "AugmentConfig":
        """Every op off (evaluation, or a no-augmentation ablation)."""
        return cls(
            p_speed=0.0,
            p_time_stretch=0.0,
            p_pitch=0.0,
            p_reverb=0.0,
            p_noise=0.0,
            p_telephony=0.0,
            p_gain=0.0,
        )


class WaveAugment:
    """Composes the waveform ops in the order a recording happens.

    Crop, then the talker (speed, tempo, pitch), the room (reverb), noise in the
    room, the channel (telephony), and last the recording level (gain).
    """

    def __init__(self, config: AugmentConfig = AugmentConfig()) -> None:
        self.config = config

    def __call__(
        self,
        x: Tensor,
        lengths: Tensor,
        generator: torch.Generator,
        groups: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Augment a padded batch; ``groups`` (speaker ids as ints) keeps babble to other speakers.

        The batch is processed in chunks of ``config.chunk_rows`` rows (babble
        draws its voices from the same chunk): small chunks keep the
        intermediates in cache, which is most of the speed on CPU.
        """
        _check(x, lengths)
        step = max(1, self.config.chunk_rows)
        with torch.no_grad():
            parts = [
                self._chunk(
                    x[rows], lengths[rows], generator, None if groups is None else groups[rows]
                )
                for rows in (slice(i, i + step) for i in range(0, x.shape[0], step))
            ]
        if not parts:
            return x, lengths
        width = max(part.shape[1] for part, _ in parts)
        padded = [torch.nn.functional.pad(part, (0, width - part.shape[1])) for part, _ in parts]
        out = torch.cat(padded)
        return out, torch.cat([part_lengths for _, part_lengths in parts])

    def _chunk(
        self, x: Tensor, lengths: Tensor, generator: torch.Generator, groups: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        c = self.config
        crop = int(round(c.crop_s * c.sample_rate)) if c.crop_s else None
        if crop is not None:
            x, lengths = random_crop(x, lengths, generator, crop)
        if c.p_speed > 0:
            x, lengths = speed(x, lengths, generator, c.p_speed, c.speed_factors)
        if c.p_time_stretch > 0:
            x, lengths = time_stretch(x, lengths, generator, c.p_time_stretch, c.stretch_rates)
        if crop is not None and x.shape[1] > crop:
            x, lengths = random_crop(x, lengths, generator, crop)
        if c.p_pitch > 0:
            x, lengths = pitch_shift(x, lengths, generator, c.p_pitch, c.semitones)
        if c.p_reverb > 0:
            x, lengths = reverb(
                x, lengths, generator, c.p_reverb, c.rt60_s, c.drr_db, sample_rate=c.sample_rate
            )
        if c.p_noise > 0:
            x, lengths = add_noise(
                x, lengths, generator, c.p_noise, c.snr_db, c.noise_kinds, groups=groups
            )
        if c.p_telephony > 0:
            x, lengths = telephony(x, lengths, generator, c.p_telephony, sample_rate=c.sample_rate)
        if c.p_gain > 0:
            x, lengths = random_gain(x, lengths, generator, c.p_gain, c.gain_db)
        return x, lengths
