"""The log-mel front end, one torch module for training and for the exported graph.

The DFT is fixed convolution and matmul weights (Hann-windowed cosine and sine
kernels, split in two small stages by a Cooley-Tukey factorisation of the
window length) and the mel filterbank a fixed matmul, so the front end exports
to plain ONNX ops (Conv, MatMul, Log) that ONNX Runtime runs fast, and
training and serving compute the very same features.

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

__all__ = ["FrontendConfig", "LogMelFrontend", "dft_split", "mel_filterbank", "stats_width"]


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


def dft_split(win_length: int, hop_length: int) -> tuple[int, int] | None:
    """``(n1, n2)`` with n1 * n2 = win_length, n2 dividing hop_length, n1 and n2 as close as can be.

    None when there is no such split with both factors above 1 (the front end then uses the direct DFT).
    """
    best: tuple[float, int, int] | None = None
    for n2 in range(2, win_length // 2 + 1):
        if win_length % n2 or hop_length % n2:
            continue
        n1 = win_length // n2
        score = abs(np.log(n1 / n2))
        if best is None or score < best[0]:
            best = (score, n1, n2)
    return None if best is None else (best[1], best[2])


class LogMelFrontend(nn.Module):
    """audio [B, N] + lengths [B] -> log-mel [B, n_mels, T] + frame mask [B, T] + own sums."""

    # Fixed weights, registered as (non-persistent) buffers; declared so they read as tensors.
    mel: torch.Tensor  # [n_freq, n_mels]
    bin_mel: torch.Tensor  # [n_mels, computed bins]
    dft: torch.Tensor  # direct DFT only
    stage1: torch.Tensor  # split DFT only
    stage2: torch.Tensor  # split DFT only

    def __init__(self, config: FrontendConfig = FrontendConfig()) -> None:
        super().__init__()
        self.config = config
        n = config.win_length
        self.n_freq = n // 2 + 1
        window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)  # periodic Hann
        mel = mel_filterbank(config)
        self.register_buffer("mel", torch.from_numpy(mel), persistent=False)
        # Bins outside every mel filter (below f_min, above f_max) are never computed.
        used = np.flatnonzero(mel.sum(axis=1) > 0)
        self.bin_range = (int(used[0]), int(used[-1]) + 1) if used.size else (0, self.n_freq)
        self.split = dft_split(n, config.hop_length)
        if self.split is None:
            self._build_direct_dft(window)
        else:
            self._build_split_dft(window, *self.split)

    def _build_direct_dft(self, window: np.ndarray) -> None:
        """One strided convolution with a cosine and a sine kernel per bin (N multiply-adds a bin)."""
        n = self.config.win_length
        lo, hi = self.bin_range
        angle = 2.0 * np.pi * np.arange(lo, hi)[:, None] * np.arange(n)[None, :] / n
        kernels = np.concatenate([np.cos(angle) * window, -np.sin(angle) * window], axis=0)  # [2K, N]
        self.register_buffer("dft", torch.from_numpy(kernels.astype(np.float32)).unsqueeze(1), persistent=False)
        self.register_buffer("bin_mel", self.mel[lo:hi].T.contiguous(), persistent=False)  # [M, K]

    def _build_split_dft(self, window: np.ndarray, n1: int, n2: int) -> None:
        """The DFT of each frame in two small stages (Cooley-Tukey with window length N = n1 * n2).

        Sample n = n2 * a + b (a < n1, b < n2), bin k = c + n1 * d (c < n1, d < n2):
            X[c + n1 d] = sum_b exp(-2 pi i (b c / N + b d / n2)) * sum_a w[n] x[n] exp(-2 pi i a c / n1).
        The audio is read as rows of n2 samples (sample n of frame t is row hop/n2 * t + a, column b),
        so stage 1 is a grouped convolution over the rows (one group per column b, window folded
        into its kernels) and stage 2, twiddles folded in, one [2 n2 -> 2 d] matmul per c. For the
        25 ms window that is ~35 k multiply-adds a frame instead of the direct DFT's 160 k, which
        was the costliest op of the v0.2.0 graph (27 % of its run time on one CPU thread).
        """
        n = self.config.win_length
        lo, hi = self.bin_range
        a, b, c = np.arange(n1), np.arange(n2), np.arange(n1)
        angle1 = 2.0 * np.pi * a[None, :] * c[:, None] / n1  # [c, a]
        taps = window[n2 * a[None, :] + b[:, None]]  # [b, a]
        stage1 = np.stack([np.cos(angle1)[None] * taps[:, None], -np.sin(angle1)[None] * taps[:, None]], axis=1)
        # [b, re/im, c, a] -> grouped-conv weight [out = (b, re/im, c), 1, a]
        self.register_buffer("stage1", torch.from_numpy(stage1.reshape(n2 * 2 * n1, 1, n1).astype(np.float32)),
                             persistent=False)
        n_d = -(-hi // n1)  # d with c + n1 * d < hi for some c
        d = np.arange(n_d)
        phase = 2.0 * np.pi * (b[None, None, :] * c[:, None, None] / n + b[None, None, :] * d[None, :, None] / n2)
        cos, sin = np.cos(phase), np.sin(phase)  # [c, d, b]; X = sum_b (re + i im) (cos - i sin)
        stage2 = np.zeros((n1, 2, n_d, n2, 2), dtype=np.float64)  # [c, out re/im, d, b, in re/im]
        stage2[:, 0, :, :, 0], stage2[:, 0, :, :, 1] = cos, sin
        stage2[:, 1, :, :, 0], stage2[:, 1, :, :, 1] = -sin, cos
        self.register_buffer("stage2", torch.from_numpy(stage2.reshape(n1, 2 * n_d, 2 * n2).astype(np.float32)),
                             persistent=False)
        # Power comes out as [c, d]; the mel matrix is laid out to match (zero where a bin is unused).
        bin_of = (c[:, None] + n1 * d[None, :]).reshape(-1)
        layout = np.zeros((n1 * n_d, self.mel.shape[1]), dtype=np.float32)
        inside = (bin_of >= lo) & (bin_of < hi)
        layout[inside] = self.mel.numpy()[bin_of[inside]]
        self.register_buffer("bin_mel", torch.from_numpy(layout.T.copy()), persistent=False)  # [M, n1 * n_d]
        self.n_d = n_d

    def mel_energies(self, audio: torch.Tensor) -> torch.Tensor:
        """Mel energies [B, M, T] of the Hann-windowed frames of ``audio`` [B, N >= win_length]."""
        c = self.config
        n_frames = (audio.shape[1] - c.win_length) // c.hop_length + 1
        if self.split is None:
            spec = nn.functional.conv1d(audio.unsqueeze(1), self.dft, stride=c.hop_length)  # [B, 2K, T]
            k = spec.shape[1] // 2
            power = spec[:, :k] ** 2 + spec[:, k:] ** 2
            return torch.matmul(self.bin_mel, power)
        n1, n2 = self.split
        batch = audio.shape[0]
        audio = nn.functional.pad(audio, (0, (-audio.shape[1]) % n2))
        rows = audio.reshape(batch, -1, n2).transpose(1, 2)  # [B, b, rows]
        first = nn.functional.conv1d(rows, self.stage1, stride=c.hop_length // n2, groups=n2)[..., :n_frames]
        first = first.reshape(batch, n2, 2, n1, n_frames).permute(0, 3, 1, 2, 4)  # [B, c, b, re/im, T]
        second = torch.matmul(self.stage2, first.reshape(batch, n1, 2 * n2, n_frames))  # [B, c, 2 d, T]
        power = second[:, :, : self.n_d] ** 2 + second[:, :, self.n_d :] ** 2  # [B, c, d, T]
        return torch.matmul(self.bin_mel, power.reshape(batch, n1 * self.n_d, n_frames))

    def frame_counts(self, lengths: torch.Tensor) -> torch.Tensor:
        """Valid frames per row (at least one: short rows are zero-padded to one window)."""
        c = self.config
        return torch.clamp((lengths - c.win_length) // c.hop_length + 1, min=1)

    def log_mel(self, audio: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw log-mel [B, M, T] and float mask [B, T] (1 for frames inside ``lengths``)."""
        c = self.config
        if audio.shape[1] < c.win_length:
            audio = nn.functional.pad(audio, (0, c.win_length - audio.shape[1]))
        mel = self.mel_energies(audio)  # [B, M, T]
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
