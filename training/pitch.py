"""A fixed in-graph pitch (F0) tracker and the per-window pitch statistics the heads read.

Why: the log-mel front end (25 ms Hann window, 40 Hz bins, 64 mel bands) resolves the harmonics of
a woman's voice (F0 about 200 Hz) but hardly those of a man's (about 110 Hz: the window's main lobe
is 160 Hz wide), so a semitone of pitch movement is visible to the network in women's speech and
nearly invisible in men's. On RAVDESS the model reads women's speech 13-16 points better than men's
at normal intensity, and men's happy and sad speech is read by its arousal alone
(models/README.md, "Where the RAVDESS gender gap sits"). A pitch track gives both the same cue.

How (Boersma 1993, autocorrelation with window correction, from a band-limited power spectrum so that
it is a few fixed matmuls that export to plain ONNX ops):

1. decimate to 8 kHz (a [1, 2, 1] / 4 low-pass, stride 2);
2. per 20 ms hop, the power spectrum of a 40 ms Hann-windowed frame at 12.5 Hz spacing up to
   ``band_max`` (a strided convolution with cosine and sine kernels, as the log-mel's DFT), compressed
   to the 2/3 power;
3. the autocorrelation at log-spaced candidate periods (F0 ``f_min``-``f_max``, ``steps_per_semitone``
   a semitone) as a cosine transform of that power (Wiener-Khinchin; any period, not only whole
   samples), divided by the Hann window's own autocorrelation and by the frame's power;
4. the best local peak over the candidates after a small bias toward higher F0 (Boersma's octave cost: a periodic signal's
   autocorrelation peaks at twice its period as well); a frame is voiced when that normalised peak
   exceeds ``voicing_threshold`` and its power is within ``silence_db`` of the window's loudest frame.

No learned weights; the tracker runs without gradients. The window statistics (:func:`window_pitch_sums`,
:func:`pitch_features`) are in semitones, so a gain changes none of them.

Measured (models/README.md, "Pitch in the graph"): with these statistics (``--f0-stats``) the RAVDESS gap
stayed (+13.4 against +13.0); on unseen corpora they lifted the own-class reading and calibration but cost
2.5 points from cold, so no recipe turns them on yet.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from serstream.contract import SAMPLE_RATE

__all__ = ["PITCH_FEATURES", "PITCH_STATE_WIDTH", "PitchConfig", "PitchTrack", "PitchTracker", "hann_autocorrelation",
           "pitch_features", "window_pitch_sums"]

#: What :func:`pitch_features` returns per window, in order.
PITCH_FEATURES = ("mean_vs_speaker", "std", "slope", "movement", "voiced_fraction", "periodicity")
#: Columns of a speaker-state row the pitch adds: sum of voiced frames' semitones, of their squares, voiced count.
PITCH_STATE_WIDTH = 3
#: Semitones are counted from this frequency.
REFERENCE_HZ = 100.0


@dataclass(frozen=True)
class PitchConfig:
    sample_rate: int = SAMPLE_RATE
    window_s: float = 0.040  # three periods of 75 Hz: the window correction holds up to about there
    hop_s: float = 0.020
    f_min: float = 70.0
    f_max: float = 500.0
    band_max: float = 1500.0  # Hz; enough harmonics for the period, little of the noise above
    steps_per_semitone: int = 3
    voicing_threshold: float = 0.45  # Praat's default
    silence_db: float = 25.0
    octave_cost: float = 0.04  # per octave of F0, added to the normalised autocorrelation
    # Floor on a speaker's pitch spread when a window's mean is compared with theirs (semitones).
    min_speaker_std: float = 2.0
    # Frame-to-frame changes are clipped here (semitones), so an octave error is one step, not twelve.
    max_step: float = 4.0
    # A voiced frame's distance from the window's mean counts at most this much (semitones) in its spread.
    max_deviation: float = 6.0


class PitchTrack(NamedTuple):
    """Per pitch frame [B, T]: F0 in semitones re 100 Hz, 1.0 where voiced, normalised peak, 1.0 inside the clip."""

    semitones: torch.Tensor
    voiced: torch.Tensor  # 0 outside the clip
    periodicity: torch.Tensor
    inside: torch.Tensor


def hann_autocorrelation(lag: np.ndarray, length: float) -> np.ndarray:
    """Normalised autocorrelation of a Hann window of ``length`` at ``lag`` (same units; Boersma 1993, eq. 8)."""
    x = np.abs(lag) / length
    return (1.0 - x) * (2.0 / 3.0 + np.cos(2.0 * np.pi * x) / 3.0) + np.sin(2.0 * np.pi * x) / (2.0 * np.pi)


class PitchTracker(nn.Module):
    """audio [B, N] at 16 kHz + lengths [B] -> :class:`PitchTrack` of [B, T] (T frames at ``hop_s``)."""

    lowpass: torch.Tensor
    dft: torch.Tensor
    cosines: torch.Tensor
    window_correction: torch.Tensor
    candidate_semitones: torch.Tensor
    octave_bias: torch.Tensor

    def __init__(self, config: PitchConfig = PitchConfig()) -> None:
        super().__init__()
        if config.sample_rate % 2:
            raise ValueError("the pitch tracker decimates by 2: the sample rate must be even")
        self.config = config
        rate = config.sample_rate / 2
        self.window = int(round(config.window_s * rate))
        self.hop = int(round(config.hop_s * rate))
        spacing = rate / (2 * self.window)  # twice the window: the autocorrelation does not wrap
        freqs = spacing * np.arange(1, int(config.band_max / spacing) + 1)
        t = np.arange(self.window)
        hann = 0.5 - 0.5 * np.cos(2.0 * np.pi * (t + 0.5) / self.window)
        angle = 2.0 * np.pi * freqs[:, None] * t[None, :] / rate
        kernels = np.concatenate([np.cos(angle) * hann, -np.sin(angle) * hann], axis=0)
        n_steps = int(math.floor(12.0 * math.log2(config.f_max / config.f_min) * config.steps_per_semitone)) + 1
        f0 = config.f_min * 2.0 ** (np.arange(n_steps) / (12.0 * config.steps_per_semitone))
        lags = 1.0 / f0  # seconds
        cosines = np.cos(2.0 * np.pi * lags[:, None] * freqs[None, :])  # [J, K]
        self.register_buffer("lowpass", torch.tensor([[[0.25, 0.5, 0.25]]]), persistent=False)
        self.register_buffer("dft", torch.from_numpy(kernels.astype(np.float32)).unsqueeze(1), persistent=False)
        self.register_buffer("cosines", torch.from_numpy(cosines.astype(np.float32)), persistent=False)
        correction = hann_autocorrelation(lags, self.window / rate)
        self.register_buffer("window_correction", torch.from_numpy(correction.astype(np.float32)).unsqueeze(1),
                             persistent=False)
        self.register_buffer("candidate_semitones",
                             torch.from_numpy((12.0 * np.log2(f0 / REFERENCE_HZ)).astype(np.float32)).unsqueeze(1),
                             persistent=False)
        self.register_buffer("octave_bias",
                             torch.from_numpy((config.octave_cost * np.log2(f0 / config.f_min)).astype(np.float32))
                             .unsqueeze(1), persistent=False)

    def frame_counts(self, lengths: torch.Tensor) -> torch.Tensor:
        """Pitch frames inside each row (at least one: a short row is zero-padded to one window)."""
        return torch.clamp((lengths // 2 - self.window) // self.hop + 1, min=1)

    @torch.no_grad()
    def forward(self, audio: torch.Tensor, lengths: torch.Tensor) -> PitchTrack:
        low = nn.functional.conv1d(audio.unsqueeze(1), self.lowpass, stride=2, padding=1)  # [B, 1, N / 2]
        # Always padded (a branch on the length would not export with a dynamic length): a short row
        # still gets one frame, and the frames past a row's end are masked by ``inside`` below.
        low = nn.functional.pad(low, (0, self.window))
        spec = nn.functional.conv1d(low, self.dft, stride=self.hop)  # [B, 2K, T]
        k = spec.shape[1] // 2
        # Compressed (power^(2/3)): a strong first formant otherwise wins over the period (Tolonen and
        # Karjalainen's generalised autocorrelation). Chosen with the octave cost and silence threshold
        # against librosa's pYIN on 72 RAVDESS clips: gross errors (> 3 semitones) on 8.5 % (women) and
        # 3.9 % (men) of the frames both call voiced, against 11.2 % and 6.6 % for the plain power with
        # octave cost 0.02 and 30 dB. `python -m training.pitch_check` measures it on another draw.
        power = (spec[:, :k] ** 2 + spec[:, k:] ** 2 + 1e-12) ** (2.0 / 3.0)  # [B, K, T]
        energy = power.sum(dim=1)  # [B, T]: the autocorrelation at lag 0
        corr = torch.matmul(self.cosines, power)  # [B, J, T]
        rho = corr / (torch.clamp(energy, min=1e-10).unsqueeze(1) * self.window_correction)
        score = rho + self.octave_bias
        # Only local peaks count (Boersma's candidates): an autocorrelation still rising at the shortest
        # period is a low-passed noise or a formant, not a voice at f_max. The end candidates are never peaks.
        inner = score[:, 1:-1]
        peak = (inner >= score[:, :-2]) & (inner >= score[:, 2:])
        score = torch.cat([score[:, :1] - 10.0, torch.where(peak, inner, inner - 10.0), score[:, -1:] - 10.0], dim=1)
        best = score.amax(dim=1, keepdim=True)
        pick = (score >= best).to(rho.dtype)  # one-hot of the best candidate (ties are averaged)
        n_pick = pick.sum(dim=1)
        semitones = (pick * self.candidate_semitones).sum(dim=1) / n_pick
        periodicity = (pick * rho).sum(dim=1) / n_pick
        frames = torch.arange(energy.shape[1], device=audio.device).unsqueeze(0)
        inside = (frames < self.frame_counts(lengths).unsqueeze(1)).to(rho.dtype)
        loudest = (energy * inside).amax(dim=1, keepdim=True)
        loud = energy > loudest * 10.0 ** (-self.config.silence_db / 10.0)
        voiced = (periodicity > self.config.voicing_threshold) & loud
        return PitchTrack(semitones, voiced.to(rho.dtype) * inside, periodicity, inside)


def window_pitch_sums(track: PitchTrack) -> torch.Tensor:
    """This window's contribution to its speaker's pitch state: [B, 3] = (sum of semitones, of squares, voiced count)."""
    v = track.voiced
    s = track.semitones * v
    return torch.stack([s.sum(dim=1), (s * track.semitones).sum(dim=1), v.sum(dim=1)], dim=1)


def pitch_features(track: PitchTrack, speaker_sums: torch.Tensor, config: PitchConfig) -> torch.Tensor:
    """Per-window pitch statistics [B, 6] in :data:`PITCH_FEATURES` order, over the voiced frames.

    ``speaker_sums`` [B, 3] are the speaker's pitch sums including this window's (as
    :func:`window_pitch_sums`); the window's mean semitone is z-scored against them (a speaker's
    spread floored at ``config.min_speaker_std``), so with no history it reads 0, as the band statistics do.
    The others need no history: spread (semitones; each frame's deviation clipped at ``max_deviation``,
    so a few octave errors do not dominate it), slope (semitones a second, least squares over
    the voiced frames), movement (mean absolute change between consecutive voiced frames, each change
    clipped at ``max_step``), voiced fraction of the window's frames, and mean normalised
    autocorrelation peak (how periodic the voice is). A window with no voiced frame gets zeros but
    for the fraction.
    """
    v = track.voiced
    s = track.semitones
    count = v.sum(dim=1)
    n = torch.clamp(count, min=1.0)
    mean = (s * v).sum(dim=1) / n
    centred = torch.clamp(s - mean.unsqueeze(1), -config.max_deviation, config.max_deviation) * v
    std = torch.sqrt(torch.clamp((centred * centred).sum(dim=1) / n, min=0.0) + 1e-6)
    time = torch.arange(s.shape[1], device=s.device, dtype=s.dtype).unsqueeze(0) * config.hop_s
    t_mean = (time * v).sum(dim=1) / n
    t_centred = (time - t_mean.unsqueeze(1)) * v
    slope = (t_centred * centred).sum(dim=1) / ((t_centred * t_centred).sum(dim=1) + 1e-3)
    pairs = v[:, 1:] * v[:, :-1]
    steps = torch.clamp(torch.abs(s[:, 1:] - s[:, :-1]), max=config.max_step)
    movement = (steps * pairs).sum(dim=1) / torch.clamp(pairs.sum(dim=1), min=1.0)
    fraction = count / torch.clamp(track.inside.sum(dim=1), min=1.0)
    periodicity = (track.periodicity * v).sum(dim=1) / n
    spk_count = torch.clamp(speaker_sums[:, 2], min=1.0)
    spk_mean = speaker_sums[:, 0] / spk_count
    spk_var = torch.clamp(speaker_sums[:, 1] / spk_count - spk_mean * spk_mean, min=config.min_speaker_std**2)
    has_voice = (count > 0.5).to(s.dtype)
    versus_speaker = (mean - spk_mean) / torch.sqrt(spk_var) * has_voice
    return torch.stack([versus_speaker, std * has_voice, slope, movement, fraction, periodicity], dim=1)

