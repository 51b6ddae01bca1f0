"""The log-mel front end, one torch module for training and for the exported graph.

The DFT is a fixed 1-D convolution (Hann-windowed cosine and sine kernels) and
the mel filterbank a fixed matmul, so the front end exports to plain ONNX ops
(Conv, MatMul, Log) that ONNX Runtime runs fast, and training and serving
compute the very same features.

It also does the level- and speaker-normalisation that the model contract
describes: each mel band is normalised by the mean and standard deviation of
the speaker's frames heard so far (``speaker_stats``: running sums) plus this
window's own frames. With no history that is per-utterance normalisation
(invariant to recording level); with history it is label-free per-speaker
normalisation, which is what lifted speaker-independent UAR in the
calibration runs (see ../shared/data/README.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from serstream.contract import SAMPLE_RATE

__all__ = ["FrontendConfig", "LogMelFrontend", "mel_filterbank", "stats_width"]


@dataclass(frozen=True)
class FrontendConfig:
    sample_rate: int = SAMPLE_RATE
    win_length: int = 400  # 25 ms
    hop_length: int = 160  # 10 ms
    n_mels: int = 64
    f_min: float = 60.0
    f_max: float = 7600.0
    log_floor: float = 1e-6
    # Floor on the per-band standard deviation, in log units: keeps near-silent
    # bands (a telephone channel above 3.4 kHz) from being blown up to noise.
    min_std: float = 0.1


def stats_width(config: FrontendConfig) -> int:
    """Width of a speaker-statistics row: per-band sums, per-band sums of squares, count."""
    return 2 * config.n_mels + 1


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + hz / 700.0)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


def mel_filterbank(config: FrontendConfig) -> np.ndarray:
    """Triangular HTK-scale mel filters, [n_freq, n_mels], each filter of unit area."""
    n_freq = config.win_length // 2 + 1
    freqs = np.linspace(0.0, config.sample_rate / 2.0, n_freq)
    mel_points = np.linspace(_hz_to_mel(np.array(config.f_min)), _hz_to_mel(np.array(config.f_max)), config.n_mels + 2)
    hz_points = _mel_to_hz(mel_points)
    bank = np.zeros((n_freq, config.n_mels), dtype=np.float64)
    for m in range(config.n_mels):
        lo, centre, hi = hz_points[m], hz_points[m + 1], hz_points[m + 2]
        rising = (freqs - lo) / (centre - lo)
        falling = (hi - freqs) / (hi - centre)
        bank[:, m] = np.clip(np.minimum(rising, falling), 0.0, None)
        area = bank[:, m].sum()
        if area > 0:
            bank[:, m] /= area
    return bank.astype(np.float32)


class LogMelFrontend(nn.Module):
    """audio [B, N] + lengths [B] -> log-mel [B, n_mels, T] + frame mask [B, T] + own sums."""

    def __init__(self, config: FrontendConfig = FrontendConfig()) -> None:
        super().__init__()
        self.config = config
        n = config.win_length
        n_freq = n // 2 + 1
        t = np.arange(n)
        window = 0.5 - 0.5 * np.cos(2.0 * np.pi * t / n)  # periodic Hann
        k = np.arange(n_freq)[:, None]
        angle = 2.0 * np.pi * k * t[None, :] / n
        kernels = np.concatenate([np.cos(angle) * window, -np.sin(angle) * window], axis=0)
        self.register_buffer("dft", torch.from_numpy(kernels.astype(np.float32)).unsqueeze(1), persistent=False)
        self.register_buffer("mel", torch.from_numpy(mel_filterbank(config)), persistent=False)
        self.n_freq = n_freq

    def frame_counts(self, lengths: torch.Tensor) -> torch.Tensor:
        """Valid frames per row (at least one: short rows are zero-padded to one window)."""
        c = self.config
        return torch.clamp((lengths - c.win_length) // c.hop_length + 1, min=1)

    def log_mel(self, audio: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw log-mel [B, M, T] and float mask [B, T] (1 for frames inside ``lengths``)."""
        c = self.config
        if audio.shape[1] < c.win_length:
            audio = nn.functional.pad(audio, (0, c.win_length - audio.shape[1]))
        spec = nn.functional.conv1d(audio.unsqueeze(1), self.dft, stride=c.hop_length)  # [B, 2F, T]
        real, imag = spec[:, : self.n_freq], spec[:, self.n_freq :]
        power = real * real + imag * imag  # [B, F, T]
        mel = torch.matmul(power.transpose(1, 2), self.mel).transpose(1, 2)  # [B, M, T]
        logmel = torch.log(mel + c.log_floor)
        frames = torch.arange(logmel.shape[2], device=audio.device).unsqueeze(0)
        mask = (frames < self.frame_counts(lengths).unsqueeze(1)).to(logmel.dtype)
        return logmel, mask

    @staticmethod
    def own_stats(logmel: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """This window's sums over valid frames: [B, 2M+1] = (sum, sum of squares, count)."""
        m = mask.unsqueeze(1)
        total = (logmel * m).sum(dim=2)
        squares = (logmel * logmel * m).sum(dim=2)
        count = mask.sum(dim=1, keepdim=True)
        return torch.cat([total, squares, count], dim=1)

    def normalise(self, logmel: torch.Tensor, mask: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
        """Normalise each band by the mean/std in ``stats`` (history + own); padding set to 0."""
        n_mels = self.config.n_mels
        count = torch.clamp(stats[:, 2 * n_mels : 2 * n_mels + 1], min=1.0)
        mean = stats[:, :n_mels] / count
        var = stats[:, n_mels : 2 * n_mels] / count - mean * mean
        std = torch.sqrt(torch.clamp(var, min=self.config.min_std**2))
        normed = (logmel - mean.unsqueeze(2)) / std.unsqueeze(2)
        return normed * mask.unsqueeze(1)

    def forward(
        self, audio: torch.Tensor, lengths: torch.Tensor, speaker_stats: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logmel, mask = self.log_mel(audio, lengths)
        own = self.own_stats(logmel, mask)
        normed = self.normalise(logmel, mask, speaker_stats + own)
        return normed, mask, own
