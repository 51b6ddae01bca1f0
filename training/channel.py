"""Per-speaker channel simulation for training batches.

A live stream has one channel for all of a speaker's speech: one microphone
gain, one room, one phone line. Training batches are speaker groups (see
train.py), so every row of a group gets the *same* gain, telephone band and
room here; only additive noise is drawn per row. The speaker statistics that
the model normalises with are then computed under that channel, as the
monitor computes them online.

Cheap torch ops on the whole batch: FFT band-limiting, mu-law companding,
FFT convolution with a synthetic exponentially decaying room response.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ChannelConfig", "GroupChannelAugment", "mulaw_round_trip", "band_limit", "spec_mask"]


@dataclass(frozen=True)
class ChannelConfig:
    sample_rate: int = 16_000
    gain_db: tuple[float, float] = (-24.0, 12.0)
    telephony_p: float = 0.2
    reverb_p: float = 0.3
    rt60_s: tuple[float, float] = (0.15, 0.7)
    noise_p: float = 0.5
    snr_db: tuple[float, float] = (5.0, 30.0)
    babble_p: float = 0.3  # of the noisy rows, this share get babble (other groups' speech) instead of white/pink


def band_limit(x: torch.Tensor, sample_rate: int, low_hz: float, high_hz: float) -> torch.Tensor:
    spec = torch.fft.rfft(x, dim=-1)
    freqs = torch.fft.rfftfreq(x.shape[-1], 1.0 / sample_rate)
    spec = spec * ((freqs >= low_hz) & (freqs <= high_hz)).to(spec.real.dtype)
    return torch.fft.irfft(spec, n=x.shape[-1], dim=-1)


def mulaw_round_trip(x: torch.Tensor) -> torch.Tensor:
    """G.711 u-law encode then decode (8 bits per sample), what a u-law call does to the waveform.

    The segmented G.711 law (bias 132, eight segments of 16 steps), in torch
    integer ops so it runs on the batch's device; it gives the same samples as
    the monitor's own decoder (``serstream.rtp.g711``), which a test checks.
    Input and output are floats in [-1, 1].
    """
    pcm = (x.clamp(-1.0, 1.0) * 32768.0).round().clamp(-32768, 32767).to(torch.int32)
    negative = pcm < 0
    magnitude = pcm.abs().clamp(max=32635) + 132
    segment = torch.zeros_like(magnitude)
    for step in range(8, 15):  # segment = number of thresholds 2^8 .. 2^14 reached
        segment += (magnitude >= (1 << step)).to(torch.int32)
    mantissa = torch.bitwise_and(torch.bitwise_right_shift(magnitude, segment + 3), 0xF)
    decoded = torch.bitwise_left_shift(torch.bitwise_left_shift(mantissa, 3) + 132, segment) - 132
    decoded = torch.where(negative, -decoded, decoded)
    return decoded.to(x.dtype) / 32768.0


def _rir(n: int, rt60: float, sample_rate: int, gen: torch.Generator) -> torch.Tensor:
    t = torch.arange(n) / sample_rate
    tail = torch.randn(n, generator=gen) * torch.exp(-6.9 * t / rt60)
    tail[0] = 0.0
    tail = tail / tail.norm() * 0.7
    tail[0] = 1.0  # the direct path
    return tail / tail.norm()


def spec_mask(feats: torch.Tensor, mask: torch.Tensor, time_masks: int, freq_masks: int, gen: torch.Generator,
              max_time: int = 20, max_freq: int = 8) -> torch.Tensor:
    """SpecAugment: zero (the normalised mean) random time and frequency stripes in [B, M, T] features."""
    out = feats.clone()
    b, m, t = out.shape
    valid = mask.sum(dim=1).long()
    for i in range(b):
        for _ in range(freq_masks):
            w = int(torch.randint(0, max_freq + 1, (1,), generator=gen))
            f0 = int(torch.randint(0, max(1, m - w), (1,), generator=gen))
            out[i, f0 : f0 + w, :] = 0.0
        for _ in range(time_masks):
            w = int(torch.randint(0, max_time + 1, (1,), generator=gen))
            t0 = int(torch.randint(0, max(1, int(valid[i]) - w), (1,), generator=gen))
            out[i, :, t0 : t0 + w] = 0.0
    return out


class GroupChannelAugment:
    """Call with audio [B, N], lengths [B], groups [B]; returns augmented audio, padding kept zero."""

    def __init__(self, config: ChannelConfig = ChannelConfig(), seed: int = 0) -> None:
        self.config = config
        self.gen = torch.Generator().manual_seed(seed)

    def state(self) -> torch.Tensor:
        return self.gen.get_state()

    def load_state(self, state: torch.Tensor) -> None:
        self.gen.set_state(state)

    def _u(self, lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand(1, generator=self.gen))

    def __call__(self, audio: torch.Tensor, lengths: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        c = self.config
        x = audio.clone()
        b, n = x.shape
        valid = (torch.arange(n).unsqueeze(0) < lengths.unsqueeze(1)).to(x.dtype)
        for g in torch.unique(groups):
            rows = torch.nonzero(groups == g).squeeze(1)
            seg = x[rows]
            if self._u(0, 1) < c.reverb_p:
                rir = _rir(int(0.5 * c.sample_rate), self._u(*c.rt60_s), c.sample_rate, self.gen)
                size = n + len(rir)
                seg = torch.fft.irfft(torch.fft.rfft(seg, size) * torch.fft.rfft(rir, size), size)[:, :n]
            if self._u(0, 1) < c.telephony_p:
                seg = mulaw_round_trip(band_limit(seg, c.sample_rate, 300.0, 3400.0))
            seg = seg * (10.0 ** (self._u(*c.gain_db) / 20.0))
            x[rows] = seg
        x = x * valid
        power = (x * x).sum(dim=1) / lengths.clamp(min=1).to(x.dtype)
        for i in range(b):
            if self._u(0, 1) >= c.noise_p:
                continue
            snr = self._u(*c.snr_db)
            others = torch.nonzero(groups != groups[i]).squeeze(1)
            if len(others) and self._u(0, 1) < c.babble_p:
                pick = others[torch.randperm(len(others), generator=self.gen)[:4]]
                noise = torch.roll(x[pick].sum(dim=0), int(torch.randint(0, n, (1,), generator=self.gen)))
            else:
                noise = torch.randn(n, generator=self.gen)
                if self._u(0, 1) < 0.5:  # pink: 1/f power by shaping the spectrum
                    spec = torch.fft.rfft(noise)
                    spec = spec / torch.sqrt(torch.arange(1, len(spec) + 1, dtype=noise.dtype))
                    noise = torch.fft.irfft(spec, n)
            noise_power = (noise * noise).mean().clamp(min=1e-12)
            x[i] = x[i] + noise * torch.sqrt(power[i] / noise_power * 10.0 ** (-snr / 10.0))
        return torch.clamp(x, -1.0, 1.0) * valid
