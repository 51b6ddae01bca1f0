"""Pitch and tempo augmentation on padded waveforms (training rows only, after the split).

Both functions take ``x: Tensor[B, N]`` (float, 16 kHz, rows zero-padded past
``lengths: Tensor[B]``) and a ``torch.Generator``, pick each row with
probability ``p`` and return ``(x, lengths)``: padding stays zero and the same
generator state gives the same output.

- :func:`pitch_shift`: pitch only (resample by 2^(s/12), then a phase vocoder
  restores the duration); ``--pitch-prob`` in training.
- :func:`time_stretch`: tempo only (phase vocoder); ``--stretch-prob``.

The channel augmentations (level, telephone band and G.711, room, noise) and
SpecAugment live in :mod:`training.channel`, which applies them per speaker
group. Random numbers are drawn on the generator's device, so a CPU generator
drives CUDA tensors too.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["pitch_shift", "time_stretch"]

# Phase-vocoder analysis: 32 ms window, 10 ms hop (69 % overlap) at 16 kHz; the
# usual 75 % costs a third more for a difference augmentation does not need.
_PV_N_FFT = 512
_PV_HOP = 160
_PV_CHUNK = 8


# --------------------------------------------------------------------------- helpers


def _rand(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> Tensor:
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


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


# --------------------------------------------------------------------------- pitch and tempo


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
