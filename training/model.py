"""The emotion network: log-mel front end, a small 2-D CNN, attentive
statistics pooling over time (plus per-band window statistics), and multitask heads.

Heads: 8 emotion logits (contract label order), arousal/valence/dominance
(tanh, [-1, 1]), gender (2 logits), intensity (2 logits: normal, strong).
The tasks are weighted by learned homoscedastic uncertainty (Kendall, Gal and
Cipolla, CVPR 2018): see :class:`MultitaskLoss`.

The default encoder (``cnn2d``) costs about 75 M multiply-adds per 3 s
window, the two-stage DFT of the front end about 10 M more (3.9 ms in all on
one CPU thread in ONNX Runtime, `serstream bench`, v0.3.0); the
depthwise-separable ``sepcnn2d`` of v0.1.0 is cheaper to run but twice as
slow to train on CPU; v0.1.0 (1000 training steps) scored 7 points of UAR
less than v0.2.0 (2400 steps; models/README.md).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from serstream.contract import LABELS

from .frontend import FrontendConfig, LogMelFrontend, stats_width
from .pitch import (
    PITCH_FEATURES,
    PITCH_STATE_WIDTH,
    PitchConfig,
    PitchTrack,
    PitchTracker,
    pitch_features,
    window_pitch_sums,
)

__all__ = ["ModelConfig", "EmotionNet", "MultitaskLoss", "count_parameters"]


@dataclass(frozen=True)
class ModelConfig:
    frontend: FrontendConfig = field(default_factory=FrontendConfig)
    stem_channels: int = 32
    channels: tuple[int, ...] = (64, 128, 128, 256)
    # Frequency/time pooling after each separable block (stem pools 2x2 itself).
    pools: tuple[tuple[int, int], ...] = ((2, 2), (1, 1), (2, 2), (2, 1))
    embed_dim: int = 256
    attention_dim: int = 128
    dropout: float = 0.3
    n_labels: int = len(LABELS)
    # "cnn2d": plain 3x3 convolution blocks over the log-mel image
    # (``cnn_channels``, each block followed by its ``cnn_pools``);
    # "sepcnn2d": the depthwise-separable stem + blocks above (v0.1.0). On the
    # project's 2-core CPU the plain one trains 2x faster per step (0.35 s vs
    # 0.70 s for 32 x 2 s, fp32): depthwise convolutions are memory-bound there.
    # A 1-D (TDNN) encoder with the mel bands as channels was tried too and
    # lost 5 points of UAR on folds 1-2 at 3.6x the steps: it gives up the
    # frequency-shift invariance that speaker independence needs.
    encoder: str = "cnn2d"
    cnn_channels: tuple[int, ...] = (16, 32, 64, 128)
    cnn_pools: tuple[tuple[int, int], ...] = ((2, 2), (2, 2), (2, 2), (2, 1))
    # Concatenate each band's mean and std of the normalised log-mel over the
    # window to the pooled embedding: a direct path for "this window against the
    # speaker's usual spectrum", what the classical baseline's statistics carry.
    utterance_stats: bool = True
    # With utterance_stats: also the mean and std over the window of the first this-many
    # cepstral coefficients of each frame (an orthonormal DCT-II of the normalised log-mel,
    # fixed weights). 0 = off, as v0.4.0 shipped. Why: in leave-one-corpus-out the classical
    # baseline's MFCC means and stds (40 numbers) reach a 4-class mean of 60.2 where the
    # log-mel bands' means and stds reach 49.2 (`baseline --folds loco --features`,
    # models/README.md); the std of a decorrelated coefficient over time is what the band
    # statistics lack.
    cepstral_stats: int = 0
    # With cepstral_stats K: also the same 2K window statistics taken from the *raw* log-mel
    # (before speaker normalisation), each z-scored against the speaker's earlier windows
    # (their sums, sums of squares and count ride in ``speaker_stats`` after the frame sums),
    # the std floored by ``window_std_floor`` (the training speakers' median within-speaker
    # std, set by training). This is what the classical baseline does with its MFCC
    # statistics and what lifts it in leave-one-corpus-out; the frame-level normalisation
    # above already makes band *means* relative to the speaker, but not how much a window's
    # spectrum moves compared with how much that speaker's usually does. False as v0.4.0.
    speaker_window_stats: bool = False
    # A population prior added to every speaker's statistics as ``prior_frames`` pseudo-frames
    # (and, with speaker_window_stats, ``prior_windows`` pseudo-windows) of a typical training
    # speaker at this window's own broadband level. Why: with no history a window is normalised
    # against itself, which removes its average spectral shape and makes its window statistics
    # z = 0, so a speaker's first utterance loses the brightness and spread that tell angry from
    # sad (cold start: RAVDESS 57.8 against 62.8 online, ASED 34.6 against 57.9, mostly read as
    # fearful). Against the prior a first window keeps n0 / (n + n0) of its shape's deviation
    # from the population; once the speaker's history holds thousands of frames the prior fades.
    # The level is taken from the window itself, so a recording's gain still cancels. Training
    # sets the prior's buffers from its speakers (corpora weighted equally). 0 = off (up to
    # v0.5.0); v0.6.0 and --recipe v0.6 use 200 frames and 1 window.
    prior_frames: float = 0.0
    prior_windows: float = 0.0
    # With the prior: add it only to a speaker's first windows (no history yet), so that from the
    # second utterance on a window is read exactly as without the prior. Why: added always, the
    # prior (200 frames against a history of a few utterances) also moves the online readings:
    # leave-one-corpus-out lost 1.4 points over each corpus's own classes online (three seeds;
    # 4.2 on the first seed) while gaining 7.3 over four classes from cold (models/README.md).
    prior_cold_only: bool = False
    # Each window's pitch statistics (training/pitch.py: a fixed autocorrelation tracker in the graph)
    # to the heads: mean F0 against the speaker's (their voiced frames' sums ride in ``speaker_stats``
    # after the other columns), spread, slope, movement, voiced fraction, periodicity. Why: the 25 ms
    # log-mel resolves a woman's harmonics but hardly a man's, and on RAVDESS men's speech is read
    # 13-16 points worse at normal intensity, their happy and sad by arousal alone. Measured: the gap
    # stayed (+13.4 against +13.0), and on unseen corpora a new speaker's first windows lost 2.5 points
    # (models/README.md, "Pitch in the graph"), so it is off in every recipe, v0.6.0 included.
    f0_stats: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        d = dict(d)
        d["frontend"] = FrontendConfig(**d["frontend"])
        d["channels"] = tuple(d["channels"])
        d["pools"] = tuple(tuple(p) for p in d["pools"])
        # Configs written before these fields existed describe v0.1.0's network.
        d.setdefault("encoder", "sepcnn2d")
        d.setdefault("utterance_stats", False)
        d.setdefault("cepstral_stats", 0)
        d.setdefault("speaker_window_stats", False)
        d.setdefault("prior_frames", 0.0)
        d.setdefault("prior_windows", 0.0)
        d.setdefault("prior_cold_only", False)
        d.setdefault("f0_stats", False)
        if "cnn_channels" in d:
            d["cnn_channels"] = tuple(d["cnn_channels"])
        if "cnn_pools" in d:
            d["cnn_pools"] = tuple(tuple(p) for p in d["cnn_pools"])
        return cls(**d)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class SeparableBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, pool: tuple[int, int]) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(c_in, c_in, 3, padding=1, groups=c_in, bias=False)
        self.pointwise = nn.Conv2d(c_in, c_out, 1, bias=False)
        self.norm = nn.BatchNorm2d(c_out)
        self.act = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(pool, ceil_mode=True) if pool != (1, 1) else nn.Identity()
        self.skip = c_in == c_out and pool == (1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.norm(self.pointwise(self.depthwise(x))))
        if self.skip:
            y = y + x
        return self.pool(y)


def dct_matrix(n_bands: int, n_coefficients: int) -> torch.Tensor:
    """[K, M] orthonormal DCT-II: row k maps M log-mel bands to cepstral coefficient k."""
    if not 0 < n_coefficients <= n_bands:
        raise ValueError(f"cepstral coefficients must be 1..{n_bands}, got {n_coefficients}")
    m = torch.arange(n_bands, dtype=torch.float64)
    k = torch.arange(n_coefficients, dtype=torch.float64).unsqueeze(1)
    basis = torch.cos(torch.pi / n_bands * (m + 0.5) * k) * math.sqrt(2.0 / n_bands)
    basis[0] /= math.sqrt(2.0)
    return basis.float()


def band_statistics(normed: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean and standard deviation of each band over the valid frames: [B, 2M]."""
    m = mask.unsqueeze(1)
    count = torch.clamp(mask.sum(dim=1, keepdim=True), min=1.0)
    mean = (normed * m).sum(dim=2) / count
    var = (normed * normed * m).sum(dim=2) / count - mean * mean
    return torch.cat([mean, torch.sqrt(torch.clamp(var, min=1e-5))], dim=1)


class AttentiveStatsPool(nn.Module):
    """Attention-weighted mean and standard deviation over valid frames."""

    def __init__(self, dim: int, attention_dim: int) -> None:
        super().__init__()
        self.score = nn.Sequential(nn.Conv1d(dim, attention_dim, 1), nn.Tanh(), nn.Conv1d(attention_dim, 1, 1))

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # h [B, D, T], mask [B, T] of 0/1
        scores = self.score(h).squeeze(1)
        scores = scores.masked_fill(mask < 0.5, -1e4)
        weights = torch.softmax(scores, dim=1).unsqueeze(1)
        mean = (h * weights).sum(dim=2)
        var = (h * h * weights).sum(dim=2) - mean * mean
        std = torch.sqrt(torch.clamp(var, min=1e-5))
        return torch.cat([mean, std], dim=1)


class PlainBlock(nn.Module):
    """3x3 convolution, batch norm, ReLU, then max pooling."""

    def __init__(self, c_in: int, c_out: int, pool: tuple[int, int]) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(c_out)
        self.act = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(pool, ceil_mode=True) if pool != (1, 1) else nn.Identity()

    def forward(self, x: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        # Padding frames are zeroed before pooling, so a zero-padded row of a
        # batch scores as it would alone (ReLU output >= 0 wins every max).
        y = self.act(self.norm(self.conv(x))) * frame_mask[:, None, None, :]
        return self.pool(y)


class EmotionNet(nn.Module):
    stem: nn.Module  # nn.Identity for cnn2d, the separable stem for sepcnn2d
    # Registered buffers, declared so they read as tensors; each exists only with its option.
    dct: torch.Tensor  # cepstral_stats
    window_std_floor: torch.Tensor  # speaker_window_stats
    prior_band_shape: torch.Tensor  # prior_frames: [M] typical band means less their mean over bands
    prior_band_var: torch.Tensor  # prior_frames: [M] typical within-speaker variance of each band
    prior_window_mean: torch.Tensor  # prior_windows: [2K] typical raw window statistics
    pitch: PitchTracker | None  # f0_stats

    def __init__(self, config: ModelConfig = ModelConfig()) -> None:
        super().__init__()
        self.config = config
        self.frontend = LogMelFrontend(config.frontend)
        self.pool = AttentiveStatsPool(config.embed_dim, config.attention_dim)
        stats = config.frontend.n_mels + config.cepstral_stats if config.utterance_stats else 0
        pooled = 2 * config.embed_dim + 2 * stats + (2 * config.cepstral_stats if config.speaker_window_stats else 0)
        self.pitch = None
        if config.f0_stats:
            self.pitch = PitchTracker(PitchConfig(sample_rate=config.frontend.sample_rate))
            # Standardises the pitch statistics (semitones, semitones a second, fractions) for the heads.
            self.pitch_norm = nn.BatchNorm1d(len(PITCH_FEATURES), affine=False)
            pooled += len(PITCH_FEATURES)
        if config.cepstral_stats:
            if not config.utterance_stats:
                raise ValueError("cepstral_stats needs utterance_stats")
            self.register_buffer("dct", dct_matrix(config.frontend.n_mels, config.cepstral_stats), persistent=False)
        if config.speaker_window_stats:
            if not config.cepstral_stats:
                raise ValueError("speaker_window_stats needs cepstral_stats")
            # Part of the saved weights (and the exported graph): training sets it from its speakers.
            self.register_buffer("window_std_floor", torch.ones(2 * config.cepstral_stats))
        if config.prior_frames < 0 or config.prior_windows < 0:
            raise ValueError("prior_frames and prior_windows are pseudo-counts: 0 or more")
        if config.prior_frames:
            n_mels = config.frontend.n_mels
            self.register_buffer("prior_band_shape", torch.zeros(n_mels))
            self.register_buffer("prior_band_var", torch.ones(n_mels))
        if config.prior_windows:
            if not config.speaker_window_stats:
                raise ValueError("prior_windows needs speaker_window_stats")
            self.register_buffer("prior_window_mean", torch.zeros(2 * config.cepstral_stats))
        self.dropout = nn.Dropout(config.dropout)
        self.emotion_head = nn.Linear(pooled, config.n_labels)
        self.avd_head = nn.Linear(pooled, 3)
        self.gender_head = nn.Linear(pooled, 2)
        self.intensity_head = nn.Linear(pooled, 2)
        if config.encoder == "cnn2d":
            self._build_cnn2d(config)
        elif config.encoder == "sepcnn2d":
            self._build_sepcnn2d(config)
        else:
            raise ValueError(f"unknown encoder {config.encoder!r} (expected 'cnn2d' or 'sepcnn2d')")

    def _build_cnn2d(self, config: ModelConfig) -> None:
        self.stem = nn.Identity()
        blocks, c_in = [], 1
        for c_out, pool in zip(config.cnn_channels, config.cnn_pools):
            blocks.append(PlainBlock(c_in, c_out, pool))
            c_in = c_out
        self._finish_2d(config, blocks, c_in, config.cnn_pools, stem_pool=(1, 1))

    def _build_sepcnn2d(self, config: ModelConfig) -> None:
        self.stem = nn.Sequential(
            nn.Conv2d(1, config.stem_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(config.stem_channels),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2, ceil_mode=True),
        )
        blocks = []
        c_in = config.stem_channels
        for c_out, pool in zip(config.channels, config.pools):
            blocks.append(SeparableBlock(c_in, c_out, pool))
            c_in = c_out
        self._finish_2d(config, blocks, c_in, config.pools, stem_pool=(2, 2))

    def _finish_2d(self, config: ModelConfig, blocks: Sequence[nn.Module], c_in: int,
                   pools: tuple[tuple[int, int], ...], stem_pool: tuple[int, int]) -> None:
        """Blocks, then a 1x1 projection of (channels x remaining bands) per pooled frame."""
        self.blocks = nn.Sequential(*blocks)
        freq = -(-config.frontend.n_mels // stem_pool[0])
        self.time_stride = stem_pool[1]
        for pool in pools:
            freq = -(-freq // pool[0])
            self.time_stride *= pool[1]
        self.project = nn.Sequential(
            nn.Conv1d(c_in * freq, config.embed_dim, 1, bias=False),
            nn.BatchNorm1d(config.embed_dim),
            nn.ReLU(inplace=True),
        )

    @property
    def state_width(self) -> int:
        """Width of a ``speaker_stats`` row: the front end's frame sums, the window-statistics sums, the pitch sums (each if any)."""
        extra = 4 * self.config.cepstral_stats + 1 if self.config.speaker_window_stats else 0
        return stats_width(self.config.frontend) + extra + (PITCH_STATE_WIDTH if self.config.f0_stats else 0)

    def track_pitch(self, audio: torch.Tensor, lengths: torch.Tensor) -> PitchTrack | None:
        """The window's pitch track when the model reads pitch (``f0_stats``), else None."""
        return None if self.pitch is None else self.pitch(audio, lengths)

    def raw_window_stats(self, logmel: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean and std over the window of the cepstra of the raw log-mel: [B, 2K]."""
        return band_statistics(torch.matmul(self.dct, logmel), mask)

    def own_stats(self, logmel: torch.Tensor, mask: torch.Tensor, pitch: PitchTrack | None = None) -> torch.Tensor:
        """This window's contribution to its speaker's state: [B, state_width] (sums add over windows).

        ``pitch`` is :meth:`track_pitch` of the same audio (needed when the model reads pitch)."""
        parts = [self.frontend.own_stats(logmel, mask)]
        if self.config.speaker_window_stats:
            window = self.raw_window_stats(logmel, mask)
            parts += [window, window * window, torch.ones_like(window[:, :1])]
        if self.config.f0_stats:
            parts.append(window_pitch_sums(self._needs(pitch)))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    @staticmethod
    def _needs(pitch: PitchTrack | None) -> PitchTrack:
        if pitch is None:
            raise ValueError("this model reads pitch: pass track_pitch(audio, lengths)")
        return pitch

    def prior_stats(self, own: torch.Tensor, history: torch.Tensor) -> torch.Tensor | float:
        """The population prior as sums shaped like a ``speaker_stats`` row: [B, state_width] (0.0 when off).

        Its frames have the typical band shape at this window's own broadband level (the mean of its
        band means) and the typical within-speaker variance; its windows have the typical raw window
        statistics, except the mean of the 0th cepstrum (the level, which a gain shifts), taken from
        this window. With ``prior_cold_only`` it is kept only in the rows whose ``history`` holds no
        frames yet (a speaker's first windows). See ``ModelConfig.prior_frames``.
        """
        c = self.config
        if not c.prior_frames and not c.prior_windows:
            return 0.0
        n_mels = c.frontend.n_mels
        frame = stats_width(c.frontend)
        count = torch.clamp(own[:, 2 * n_mels : 2 * n_mels + 1], min=1.0)
        parts = []
        if c.prior_frames:
            band_mean = own[:, :n_mels] / count
            mu = self.prior_band_shape.unsqueeze(0) + band_mean.mean(dim=1, keepdim=True)  # [B, M]
            n0 = c.prior_frames
            parts += [n0 * mu, n0 * (self.prior_band_var.unsqueeze(0) + mu * mu), torch.full_like(count, n0)]
        else:
            parts.append(torch.zeros_like(own[:, :frame]))
        if c.speaker_window_stats:
            if c.prior_windows:
                # The mean of c0 (the first statistic) is this window's own; the rest typical.
                typical = self.prior_window_mean[1:].unsqueeze(0).expand(own.shape[0], -1)
                mu_w = torch.cat([own[:, frame : frame + 1], typical], dim=1)
                floor = self.window_std_floor.unsqueeze(0)
                w0 = c.prior_windows
                parts += [w0 * mu_w, w0 * (floor * floor + mu_w * mu_w), torch.full_like(count, w0)]
            else:
                parts.append(torch.zeros_like(own[:, frame : frame + 4 * c.cepstral_stats + 1]))
        if c.f0_stats:  # no pitch prior: a typical speaker's pitch is a typical man's or woman's
            parts.append(torch.zeros_like(own[:, -PITCH_STATE_WIDTH:]))
        prior = torch.cat(parts, dim=1)
        if c.prior_cold_only:
            prior = prior * (history[:, 2 * n_mels : 2 * n_mels + 1] < 0.5).to(prior.dtype)
        return prior

    def normalise(self, logmel: torch.Tensor, mask: torch.Tensor, own: torch.Tensor, history: torch.Tensor,
                  pitch: PitchTrack | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Speaker-normalised log-mel [B, M, T], and the window's features for the heads (or None).

        ``own`` is this window's :meth:`own_stats`, ``history`` the sum of the speaker's earlier
        ones; both count, as in the front end (with no history a window is compared with itself,
        which gives z = 0: no evidence either way). The window features are the z-scored window
        statistics [B, 2K] (``speaker_window_stats``), then the standardised pitch statistics [B, 6]
        (``f0_stats``, with ``pitch`` from :meth:`track_pitch`).
        """
        frame = stats_width(self.config.frontend)
        total = history + own + self.prior_stats(own, history)
        normed = self.frontend.normalise(logmel, mask, total[:, :frame])
        features = []
        if self.config.speaker_window_stats:
            k2 = 2 * self.config.cepstral_stats
            window = own[:, frame : frame + k2]
            count = torch.clamp(total[:, frame + 2 * k2 : frame + 2 * k2 + 1], min=1.0)
            mean = total[:, frame : frame + k2] / count
            var = torch.clamp(total[:, frame + k2 : frame + 2 * k2] / count - mean * mean, min=0.0)
            std = torch.maximum(torch.sqrt(var + 1e-12), self.window_std_floor)
            features.append((window - mean) / std)
        if self.pitch is not None:
            stats = pitch_features(self._needs(pitch), total[:, -PITCH_STATE_WIDTH:], self.pitch.config)
            features.append(self.pitch_norm(stats))
        if not features:
            return normed, None
        return normed, features[0] if len(features) == 1 else torch.cat(features, dim=1)

    def encode(
        self,
        normed: torch.Tensor,
        mask: torch.Tensor,
        feature_augment: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        window_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Normalised log-mel [B, M, T] + mask [B, T] (+ the window features of :meth:`normalise`) -> pooled embedding."""
        if feature_augment is not None:
            normed = feature_augment(normed, mask)
        x = self.stem(normed.unsqueeze(1))
        if self.config.encoder == "cnn2d":
            step = 1
            for block, pool in zip(self.blocks, self.config.cnn_pools):
                x = block(x, mask[:, ::step][:, : x.shape[3]])
                step *= pool[1]
        else:
            x = self.blocks(x)
        b, c, f, t = x.shape
        h = self.project(x.reshape(b, c * f, t))
        # Frame mask at the pooled time resolution: a pooled frame is valid when
        # the first input frame it covers is valid (ceil-mode pooling).
        pooled_mask = mask[:, :: self.time_stride][:, :t]
        if pooled_mask.shape[1] < t:
            pooled_mask = nn.functional.pad(pooled_mask, (0, t - pooled_mask.shape[1]))
        pooled = self.pool(h, pooled_mask)
        if not self.config.utterance_stats:
            return pooled
        parts = [pooled, band_statistics(normed, mask)]
        if self.config.cepstral_stats:
            parts.append(band_statistics(torch.matmul(self.dct, normed), mask))  # [K, M] @ [B, M, T]
        if self.config.speaker_window_stats or self.config.f0_stats:
            if window_features is None:
                raise ValueError("this model needs the window features of normalise()")
            parts.append(window_features)
        return torch.cat(parts, dim=1)

    def heads(self, embedding: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.dropout(embedding)
        return {
            "emotion_logits": self.emotion_head(z),
            "avd": torch.tanh(self.avd_head(z)),
            "gender_logits": self.gender_head(z),
            "intensity_logits": self.intensity_head(z),
        }

    def forward(
        self, audio: torch.Tensor, lengths: torch.Tensor, speaker_stats: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The exported signature: outputs in the contract's order plus the extras."""
        logmel, mask = self.frontend.log_mel(audio, lengths)
        pitch = self.track_pitch(audio, lengths)
        own = self.own_stats(logmel, mask, pitch)
        normed, window_features = self.normalise(logmel, mask, own, speaker_stats, pitch)
        out = self.heads(self.encode(normed, mask, window_features=window_features))
        return out["emotion_logits"], out["avd"], out["gender_logits"], out["intensity_logits"], own


class MultitaskLoss(nn.Module):
    """Uncertainty-weighted sum of task losses (Kendall et al. 2018).

    total = sum_i exp(-s_i) * L_i + s_i, with one learned s_i = log sigma_i^2
    per task. Emotion is the task we care about; the learned weights keep the
    auxiliary heads (AVD regression, gender, intensity) from dominating it
    without hand-tuned constants.

    A ``class_mask`` target [B, n_labels] (bool) restricts each row's emotion
    loss to the classes its corpus has (:func:`training.mixing.masked_cross_entropy`);
    ``unmasked_weight`` w mixes the plain loss back in, (1 - w) masked + w plain,
    so a class a corpus lacks is still pushed down a little on its clips (the
    exported model answers over all 8 labels).
    """

    tasks = ("emotion", "avd", "gender", "intensity")

    def __init__(self, label_smoothing: float = 0.1, unmasked_weight: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing
        self.unmasked_weight = unmasked_weight
        self.log_vars = nn.Parameter(torch.zeros(len(self.tasks)))
        self.ce = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.ce_optional = nn.CrossEntropyLoss(ignore_index=-1)

    def forward(self, out: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        if "class_mask" in target:  # each row over its corpus's classes (training/mixing.py)
            from .mixing import masked_cross_entropy

            emotion = masked_cross_entropy(out["emotion_logits"], target["emotion"], target["class_mask"],
                                           self.label_smoothing)
            if self.unmasked_weight > 0:  # a little of the plain loss: absent classes pushed down a little
                plain = self.ce(out["emotion_logits"].float(), target["emotion"])
                emotion = (1.0 - self.unmasked_weight) * emotion + self.unmasked_weight * plain
        else:
            emotion = self.ce(out["emotion_logits"].float(), target["emotion"])
        losses = {
            "emotion": emotion,
            "avd": nn.functional.mse_loss(out["avd"].float(), target["avd"]),
            "gender": self._optional_ce(out["gender_logits"], target["gender"]),
            "intensity": self._optional_ce(out["intensity_logits"], target["intensity"]),
        }
        total = out["emotion_logits"].new_zeros((), dtype=torch.float32)
        for i, name in enumerate(self.tasks):
            total = total + torch.exp(-self.log_vars[i]) * losses[name] + self.log_vars[i]
        return total, {k: float(v.detach()) for k, v in losses.items()}

    def _optional_ce(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if bool((target >= 0).any()):
            return self.ce_optional(logits.float(), target)
        return logits.new_zeros((), dtype=torch.float32)
