"""Training one model: speaker-grouped class-balanced batches, channel
augmentation per speaker, simulated speaker history, multitask loss.

Batches are built from a few speakers at a time, several utterances each.
Every group gets one random channel (gain, telephone band, room, noise), as a
live stream would, and each row's ``speaker_stats`` is the sum of the
front-end statistics of a random subset of the *other* rows of its group
(sometimes none: a cold start). So the model learns to use the same
label-free speaker normalisation that the monitor feeds it online, under the
same channel as the audio it scores.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, TypedDict

import numpy as np
import torch
from torch import nn

from serstream.contract import LABELS, SAMPLE_RATE

from .cache import CachedCorpus
from .channel import GroupChannelAugment, spec_mask
from .ema import WeightAverage
from .metrics import median_within_speaker_std
from .mixing import BalancedSampler, corpus_class_masks, restricted_argmax, row_class_mask
from .model import EmotionNet, ModelConfig, MultitaskLoss

__all__ = [
    "ADAPTATION_MODES",
    "DEFAULT_RECIPE",
    "RECIPES",
    "OTHER_CORPUS_PICKS",
    "SAMPLINGS",
    "TTA_VARIANTS",
    "TrainConfig",
    "TrainResult",
    "TtaVariant",
    "history_matrix",
    "predict",
    "speaker_orders",
    "train_model",
    "tta_view",
]

#: Speaker-history modes of :func:`predict`.
ADAPTATION_MODES = ("none", "online", "full")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 18
    steps_per_epoch: int = 100
    speakers_per_batch: int = 4
    per_speaker: int = 8
    crop_s: float = 2.5
    lr: float = 3e-3
    weight_decay: float = 0.05
    warmup_frac: float = 0.06
    patience: int = 6
    # Which weights training returns when it has validation speakers. "best": those of the epoch with
    # the best validation UAR, stopping after ``patience`` epochs without a better one. "last": every
    # epoch runs and the last weight average is returned, as `train` (no validation speakers) ships;
    # validation UAR is still recorded. With 2 validation actors (120 clips) "best" can keep an early
    # epoch's weights (the three-corpus CV of 2026-12-03: fold 3 kept epoch 6 of 30).
    select: str = "last"
    seed: int = 0
    threads: int = 1
    device: str = "cpu"
    # bf16 autocast on CPU: measured 4x *slower* than fp32 on this project's AVX2 EPYC
    # (no AVX-512 BF16); worth it only where the CPU has bf16 units.
    bf16: bool = False
    # Emotion loss over each corpus's own classes (training/mixing.py); False is
    # v0.3.0's plain softmax over all 8 labels for every corpus.
    mask_loss: bool = True
    # With mask_loss: weight w of the plain 8-label loss mixed in, (1 - w) masked + w plain.
    # The exported model answers over all 8 labels, and a fully masked loss never
    # tells it that an ASED or TESS clip is not calm; 0 = fully masked.
    unmasked_weight: float = 0.0
    # "balanced": corpus -> speaker -> class -> clip (training/mixing.py), the
    # corpus drawn by ``corpus_weight``; "v0.3": RAVDESS speakers, another
    # corpus's with probability ``other_corpus_prob`` (v0.3.0's sampler).
    sampling: str = "v0.3"
    corpus_weight: str = "sqrt-speakers"
    # v0.3 sampling: chance that a speaker group is drawn from a corpus other than RAVDESS
    # (TESS has 2 speakers but twice RAVDESS's files; uncapped it dominates
    # neutral and pushes quiet RAVDESS speech into "calm").
    other_corpus_prob: float = 0.25
    # v0.3 sampling: how an other-corpus group is drawn. "speaker": uniformly over all the other
    # corpora's speakers (v0.3.0, where TESS was the only other corpus); "corpus": a corpus first,
    # uniformly, then one of its speakers. With ASED's 65 speakers beside TESS's 2, "speaker" gives
    # TESS 3 % of the other-corpus groups (0.7 % of all), so ASED replaces it.
    other_corpus_pick: str = "corpus"
    cold_start_prob: float = 0.2
    augment: bool = True
    spec_time_masks: int = 2
    spec_freq_masks: int = 2
    # Per-row chance of a pitch shift (+/-2 semitones, duration kept) and of a
    # tempo change (0.9-1.1x, pitch kept), by the phase vocoder of tempo.py.
    # Off by default: the shipped model's CV ran without them (see the model card).
    pitch_prob: float = 0.0
    stretch_prob: float = 0.0
    # Decay of the per-step moving average of the weights (training/ema.py);
    # validation, early stopping and the saved model use the averaged weights.
    # 0 turns it off; v0.2.0 (models/README.md) trained without it.
    ema_decay: float = 0.997
    model: ModelConfig = field(default_factory=ModelConfig)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["model"] = self.model.to_dict()
        return d


#: Named recipes for side-by-side runs on the same folds: what each sets in TrainConfig, and under
#: "model" in its ModelConfig. "v0.6" (the command line's default) is what v0.6.0 shipped with
#: (models/README.md): "v0.5" plus the population prior (``ModelConfig.prior_frames`` 200,
#: ``prior_windows`` 1), which lifted a new speaker's first windows in leave-one-corpus-out from
#: 43.4 to 50.7 (4-class, three seeds) at 0.7 points of the online figure.
#: "v0.5" is what v0.5.0 shipped with: "v0.4"'s training plus each window's statistics of 20 cepstra, raw and
#: z-scored against the speaker's earlier windows (``ModelConfig.speaker_window_stats``), which
#: lifted the leave-one-corpus-out 4-class online mean from 52 to 58 over three seeds.
#: "v0.4" is what v0.4.0 shipped with: the emotion loss over each corpus's own classes, v0.3.0's
#: RAVDESS-led batches with the other corpora drawn corpus first, and the last weight average kept
#: (early stopping on two validation actors kept early epochs), on v0.3.0's graph. "balanced" is
#: the corpus -> speaker -> class sampler with the masked loss, measured and not chosen (it gave
#: most batches to ASED, whose sentences give the emotion away).
#: Each recipe names every setting, so it means the same whatever the defaults. A bare
#: TrainConfig() trains with the shipped settings on ModelConfig()'s graph (v0.4.0's): code that
#: wants v0.5.0's or v0.6.0's graph asks for it, as the command line does through the recipe.
_NO_PRIOR = {"prior_frames": 0.0, "prior_windows": 0.0, "prior_cold_only": False}
_V04_GRAPH = {"cepstral_stats": 0, "speaker_window_stats": False, "f0_stats": False, **_NO_PRIOR}
_V05_GRAPH = {"cepstral_stats": 20, "speaker_window_stats": True, "f0_stats": False}
RECIPES: dict[str, dict] = {
    "v0.6": {"mask_loss": True, "sampling": "v0.3", "other_corpus_pick": "corpus", "select": "last",
             "model": {**_V05_GRAPH, "prior_frames": 200.0, "prior_windows": 1.0, "prior_cold_only": False}},
    "v0.5": {"mask_loss": True, "sampling": "v0.3", "other_corpus_pick": "corpus", "select": "last",
             "model": {**_V05_GRAPH, **_NO_PRIOR}},
    "v0.4": {"mask_loss": True, "sampling": "v0.3", "other_corpus_pick": "corpus", "select": "last",
             "model": _V04_GRAPH},
    "balanced": {"mask_loss": True, "sampling": "balanced", "other_corpus_pick": "speaker", "select": "best",
                 "model": _V04_GRAPH},
    "v0.3": {"mask_loss": False, "sampling": "v0.3", "other_corpus_pick": "speaker", "select": "best",
             "model": _V04_GRAPH},
}
DEFAULT_RECIPE = "v0.6"
SAMPLINGS = ("balanced", "v0.3")
OTHER_CORPUS_PICKS = ("speaker", "corpus")


@dataclass
class TrainResult:
    model: EmotionNet
    history: list[dict]
    best_epoch: int
    best_val_uar: float


class _BestWeights(TypedDict):
    """The weights of the best validation epoch so far (epoch -1, state None: none yet), as checkpointed."""

    uar: float
    epoch: int
    state: dict[str, Any] | None


def history_matrix(groups: np.ndarray, rng: np.random.Generator, cold_start_prob: float) -> np.ndarray:
    """[B, B] 0/1 matrix: row i sums a random subset of the other rows of i's group."""
    b = len(groups)
    m = np.zeros((b, b), dtype=np.float32)
    for i in range(b):
        others = np.flatnonzero((groups == groups[i]) & (np.arange(b) != i))
        if len(others) == 0 or rng.random() < cold_start_prob:
            continue
        k = rng.integers(1, len(others) + 1)
        m[i, rng.choice(others, size=k, replace=False)] = 1.0
    return m


class BatchSampler:
    """v0.3.0's sampler: speaker groups of class-balanced utterances, RAVDESS and other corpora mixed at a set rate.

    With no RAVDESS speaker in training (leave-one-corpus-out with RAVDESS held
    out) every speaker is "main": groups are drawn uniformly over speakers.
    """

    def __init__(self, corpus: CachedCorpus, train_idx: np.ndarray, config: TrainConfig, rng: np.random.Generator) -> None:
        self.corpus, self.config, self.rng = corpus, config, rng
        self.by_speaker: dict[str, dict[int, np.ndarray]] = {}
        for spk in np.unique(corpus.speaker[train_idx]):
            rows = train_idx[corpus.speaker[train_idx] == spk]
            self.by_speaker[str(spk)] = {int(c): rows[corpus.label[rows] == c] for c in np.unique(corpus.label[rows])}
        corpus_of = {s: str(corpus.corpus[next(iter(v.values()))[0]]) for s, v in self.by_speaker.items()}
        self.main = [s for s, c in corpus_of.items() if c == "ravdess"]
        self.other = [s for s, c in corpus_of.items() if c != "ravdess"]
        if not self.main:  # a corpus without RAVDESS: all speakers are "main"
            self.main, self.other = self.other, []
        if config.other_corpus_pick not in OTHER_CORPUS_PICKS:
            raise ValueError(f"unknown other-corpus pick {config.other_corpus_pick!r} (one of {', '.join(OTHER_CORPUS_PICKS)})")
        # The other corpora's speakers, one list per corpus (for the "corpus" pick).
        self.other_by_corpus = [[s for s in self.other if corpus_of[s] == c]
                                for c in sorted({corpus_of[s] for s in self.other})]

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        """Utterance indices [B] and group ids [B]."""
        c = self.config
        idx, groups = [], []
        for g in range(c.speakers_per_batch):
            pool = self.other if (self.other and self.rng.random() < c.other_corpus_prob) else self.main
            if pool is self.other and c.other_corpus_pick == "corpus":
                pool = self.other_by_corpus[self.rng.integers(len(self.other_by_corpus))]
            classes = self.by_speaker[pool[self.rng.integers(len(pool))]]
            keys = list(classes)
            for _ in range(c.per_speaker):
                rows = classes[keys[self.rng.integers(len(keys))]]
                idx.append(int(rows[self.rng.integers(len(rows))]))
                groups.append(g)
        return np.asarray(idx), np.asarray(groups)


def crop_batch(corpus: CachedCorpus, idx: np.ndarray, crop: int | None, rng: np.random.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-padded float audio [B, N] and lengths [B]; random crops when ``crop`` is set."""
    clips = []
    for i in idx:
        a = corpus.clip(int(i))
        if crop is not None and len(a) > crop:
            start = int(rng.integers(0, len(a) - crop + 1)) if rng is not None else (len(a) - crop) // 2
            a = a[start : start + crop]
        clips.append(a)
    return pad_batch(clips)


def pad_batch(clips: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-padded float audio [B, N] and lengths [B] of ``clips``."""
    n = max(len(a) for a in clips)
    audio = np.zeros((len(clips), n), dtype=np.float32)
    for r, a in enumerate(clips):
        audio[r, : len(a)] = a
    return torch.from_numpy(audio), torch.tensor([len(a) for a in clips], dtype=torch.int64)


def _targets(corpus: CachedCorpus, idx: np.ndarray, avd_table: np.ndarray,
             class_masks: dict[str, np.ndarray] | None = None) -> dict[str, torch.Tensor]:
    label = corpus.label[idx]
    intensity = corpus.intensity[idx]
    # avd_table[label, intensity_slot]: slot 0 normal, 1 strong, 2 unknown
    slot = np.where(intensity < 0, 2, intensity)
    targets = {
        "emotion": torch.from_numpy(label),
        "avd": torch.from_numpy(avd_table[label, slot].astype(np.float32)),
        "gender": torch.from_numpy(corpus.gender[idx]),
        "intensity": torch.from_numpy(intensity),
    }
    if class_masks is not None:
        targets["class_mask"] = torch.from_numpy(row_class_mask(corpus.corpus[idx], class_masks))
    return targets


def make_sampler(corpus: CachedCorpus, train_idx: np.ndarray, config: TrainConfig, rng: np.random.Generator):
    """The batch sampler ``config.sampling`` names; ValueError for an unknown one."""
    if config.sampling == "balanced":
        return BalancedSampler(corpus, train_idx, config.speakers_per_batch, config.per_speaker, rng,
                               corpus_weight=config.corpus_weight)
    if config.sampling == "v0.3":
        return BatchSampler(corpus, train_idx, config, rng)
    raise ValueError(f"unknown sampling {config.sampling!r}; known: {', '.join(SAMPLINGS)}")


def own_class_prediction(logits: np.ndarray, corpora: np.ndarray, class_masks: dict[str, np.ndarray] | None) -> np.ndarray:
    """Argmax over each row's corpus classes when masks are given (masked training), else over all labels."""
    if class_masks is None:
        return logits.argmax(1)
    return restricted_argmax(logits, row_class_mask(corpora, class_masks, logits.shape[1]))


def avd_lookup() -> np.ndarray:
    """[n_labels, 3 intensity slots, 3] table of derived arousal/valence/dominance targets."""
    from .targets import avd_target

    table = np.zeros((len(LABELS), 3, 3), dtype=np.float32)
    for li, label in enumerate(LABELS):
        for si, intensity in enumerate(("normal", "strong", None)):
            table[li, si] = avd_target(label, intensity)
    return table


@dataclass(frozen=True)
class TtaVariant:
    """One deterministic test-time view of an utterance: drop ``shift_s`` from the start,
    keep the centre ``keep`` share of the rest, then change the level by ``gain_db``."""

    shift_s: float = 0.0
    keep: float = 1.0
    gain_db: float = 0.0


#: Plain; a 5 ms shift (half a 10 ms hop: every STFT frame moves); the centre 90 %
#: (where a VAD might cut the segment); +/-6 dB (recording level, which speaker
#: history does not cancel: the history was heard at the plain level). Five
#: forward passes, no randomness, so TTA figures are reproducible.
TTA_VARIANTS: tuple[TtaVariant, ...] = (
    TtaVariant(),
    TtaVariant(shift_s=0.005),
    TtaVariant(keep=0.9),
    TtaVariant(gain_db=6.0),
    TtaVariant(gain_db=-6.0),
)

#: Shifts and crops never cut a clip below this many seconds (the monitor's shortest window).
TTA_MIN_S = 0.5


def tta_view(audio: np.ndarray, variant: TtaVariant, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """``audio`` as ``variant`` sees it; a clip too short to cut keeps its length."""
    a = audio
    shortest = int(TTA_MIN_S * sample_rate)
    shift = int(round(variant.shift_s * sample_rate))
    if shift > 0 and len(a) - shift >= shortest:
        a = a[shift:]
    if variant.keep < 1.0:
        keep = max(int(round(variant.keep * len(a))), shortest)
        if keep < len(a):
            start = (len(a) - keep) // 2
            a = a[start : start + keep]
    if variant.gain_db != 0.0:
        # Clipped at full scale, as a louder recording would be.
        a = np.clip(a * np.float32(10.0 ** (variant.gain_db / 20.0)), -1.0, 1.0).astype(np.float32)
    return a


def speaker_orders(speakers: np.ndarray, order_seed: int = 0) -> dict[str, np.ndarray]:
    """Per speaker (in sorted order), the positions in ``speakers`` in the order online adaptation hears them.

    One generator walks the speakers in sorted order, so an order depends on
    the seed and on which speakers are scored together: ``onnx-eval`` calls
    this with the same speakers to feed the monitor the same sequence.
    """
    rng = np.random.default_rng(order_seed)
    orders = {}
    for spk in np.unique(speakers):
        rows = np.flatnonzero(speakers == spk)
        orders[str(spk)] = rows[rng.permutation(len(rows))]
    return orders


def _own_stats(model: EmotionNet, corpus: CachedCorpus, idx: np.ndarray, order: np.ndarray, batch: int) -> torch.Tensor:
    """Speaker-state rows [n, state_width] of each plain utterance (what a speaker history sums)."""
    own = torch.zeros(len(idx), model.state_width)
    for s in range(0, len(idx), batch):
        rows = order[s : s + batch]
        audio, lengths = crop_batch(corpus, idx[rows], None, None)
        logmel, mask = model.frontend.log_mel(audio, lengths)
        own[rows] = model.own_stats(logmel, mask, model.track_pitch(audio, lengths))
    return own


def _history(own: torch.Tensor, speakers: np.ndarray, mode: str, order_seed: int) -> torch.Tensor:
    """Speaker statistics fed with each utterance under ``mode``."""
    history = torch.zeros_like(own)
    if mode == "online":
        for rows in speaker_orders(speakers, order_seed).values():
            running = torch.zeros(own.shape[1])
            for r in rows:
                history[r] = running
                running = running + own[r]
    elif mode == "full":
        for spk in np.unique(speakers):
            rows = np.flatnonzero(speakers == spk)
            total = own[rows].sum(dim=0)
            history[rows] = total - own[rows]
    return history


def _plain_clips(corpus: CachedCorpus, train_idx: np.ndarray, seed: int, per_speaker: int) -> np.ndarray:
    """Up to ``per_speaker`` clips of each training speaker, drawn without replacement."""
    rng = np.random.default_rng(seed)
    picked = []
    for spk in np.unique(corpus.speaker[train_idx]):
        mine = train_idx[corpus.speaker[train_idx] == spk]
        picked.append(rng.choice(mine, size=min(per_speaker, len(mine)), replace=False))
    return np.concatenate(picked)


def _corpus_balanced_mean(per_speaker: np.ndarray, corpora: np.ndarray) -> np.ndarray:
    """Mean over corpora of the mean over each corpus's speakers (ASED's 65 speakers count as one corpus)."""
    return np.mean([per_speaker[corpora == name].mean(axis=0) for name in np.unique(corpora)], axis=0)


@torch.no_grad()
def set_population_prior(model: EmotionNet, corpus: CachedCorpus, train_idx: np.ndarray, seed: int,
                         per_speaker: int = 20, batch: int = 32) -> dict[str, np.ndarray]:
    """Set the population prior's buffers (``ModelConfig.prior_frames``) from the training speakers.

    Per speaker, from up to ``per_speaker`` whole clips: each band's mean and variance over all
    their frames, and the mean of their raw window statistics. The prior's band shape (band means
    less their mean over bands) and window statistics are averaged over corpora with equal weight;
    its band variance is the median over speakers, like the window statistics' std floor.
    """
    rows = _plain_clips(corpus, train_idx, seed, per_speaker)
    device = next(model.parameters()).device
    sums, windows = [], []
    for s in range(0, len(rows), batch):
        audio, lengths = crop_batch(corpus, rows[s : s + batch], None, None)
        logmel, mask = model.frontend.log_mel(audio.to(device), lengths.to(device))
        sums.append(model.frontend.own_stats(logmel, mask).double().cpu().numpy())
        if model.config.prior_windows:
            windows.append(model.raw_window_stats(logmel, mask).double().cpu().numpy())
    clip_sums = np.concatenate(sums)
    clip_windows = np.concatenate(windows) if windows else None
    n_mels = model.config.frontend.n_mels
    speakers = corpus.speaker[rows]
    names = np.unique(speakers)
    shape, var, window_mean, corpora = [], [], [], []
    for name in names:
        total = clip_sums[speakers == name].sum(axis=0)
        count = max(total[2 * n_mels], 1.0)
        mean = total[:n_mels] / count
        shape.append(mean - mean.mean())
        var.append(np.maximum(total[n_mels : 2 * n_mels] / count - mean * mean, 1e-6))
        corpora.append(corpus.corpus[rows][speakers == name][0])
        if clip_windows is not None:
            window_mean.append(clip_windows[speakers == name].mean(axis=0))
    corpus_of = np.array(corpora)
    prior = {"band_shape": _corpus_balanced_mean(np.array(shape), corpus_of),
             "band_var": np.median(np.array(var), axis=0)}
    if model.config.prior_frames:
        model.prior_band_shape.copy_(torch.from_numpy(prior["band_shape"].astype(np.float32)))
        model.prior_band_var.copy_(torch.from_numpy(prior["band_var"].astype(np.float32)))
    if model.config.prior_windows:
        prior["window_mean"] = _corpus_balanced_mean(np.array(window_mean), corpus_of)
        model.prior_window_mean.copy_(torch.from_numpy(prior["window_mean"].astype(np.float32)))
    return prior


@torch.no_grad()
def set_window_std_floor(model: EmotionNet, corpus: CachedCorpus, train_idx: np.ndarray, seed: int,
                         per_speaker: int = 20, batch: int = 32) -> np.ndarray:
    """Set ``model.window_std_floor`` from up to ``per_speaker`` plain clips of each training speaker.

    The median over the training speakers of each raw window statistic's within-speaker std
    (what the classical baseline floors its online z-scores with). Returns the floor.
    """
    rows = _plain_clips(corpus, train_idx, seed, per_speaker)
    stats = []
    for s in range(0, len(rows), batch):
        audio, lengths = crop_batch(corpus, rows[s : s + batch], None, None)
        audio, lengths = audio.to(model.window_std_floor.device), lengths.to(model.window_std_floor.device)
        logmel, mask = model.frontend.log_mel(audio, lengths)
        stats.append(model.raw_window_stats(logmel, mask).float().cpu().numpy())
    floor = np.maximum(median_within_speaker_std(np.concatenate(stats), corpus.speaker[rows]), 1e-3)
    model.window_std_floor.copy_(torch.from_numpy(floor.astype(np.float32)))
    return floor


def _forward(model: EmotionNet, corpus: CachedCorpus, idx: np.ndarray, order: np.ndarray, history: torch.Tensor,
             batch: int, variant: TtaVariant) -> dict[str, np.ndarray]:
    """Model outputs [n, ...] for one view of every utterance."""
    out: dict[str, np.ndarray] = {}
    rate = model.frontend.config.sample_rate
    for s in range(0, len(idx), batch):
        rows = order[s : s + batch]
        if variant == TtaVariant():
            audio, lengths = crop_batch(corpus, idx[rows], None, None)
        else:
            audio, lengths = pad_batch([tta_view(corpus.clip(int(i)), variant, rate) for i in idx[rows]])
        logits, avd, gender, _, _ = model(audio, lengths, history[rows])
        for k, v in zip(("emotion_logits", "avd", "gender_logits"), (logits, avd, gender)):
            v = v.float().numpy()
            if k not in out:
                out[k] = np.zeros((len(idx), v.shape[1]), dtype=np.float32)
            out[k][rows] = v
    return out


@torch.no_grad()
def predict(
    model: EmotionNet,
    corpus: CachedCorpus,
    idx: np.ndarray,
    mode: str = "online",
    order_seed: int = 0,
    batch: int = 32,
    tta: bool | Sequence[TtaVariant] = False,
) -> dict[str, np.ndarray]:
    """Score utterances ``idx``; speaker statistics per ``mode``.

    none: no history (per-utterance normalisation). online: each speaker's
    utterances in a fixed shuffled order (:func:`speaker_orders`), each one
    normalised with the statistics of the ones before it, as the monitor does
    live. full: every other utterance of the speaker (transductive, still
    label-free).

    ``tta``: True for :data:`TTA_VARIANTS`, or a sequence of variants; the
    outputs are averaged over the variants. Logits are averaged (a normalised
    geometric mean of the probabilities), so the result is still a logit that
    temperature scaling and the calibration figures treat like a plain one.
    The speaker history is always built from the plain utterances: that is
    what the monitor has heard.
    """
    if mode not in ADAPTATION_MODES:
        raise ValueError(f"unknown adaptation mode {mode!r}")
    variants = tuple(TTA_VARIANTS if tta is True else (tta or (TtaVariant(),)))
    model.eval()
    order = np.argsort([corpus.offsets[i + 1] - corpus.offsets[i] for i in idx])  # similar lengths share a batch
    own = _own_stats(model, corpus, idx, order, batch)
    history = _history(own, corpus.speaker[idx], mode, order_seed)
    result: dict[str, np.ndarray] = {}
    for variant in variants:
        for k, v in _forward(model, corpus, idx, order, history, batch, variant).items():
            result[k] = result[k] + v if k in result else v
    if len(variants) > 1:
        result = {k: v / np.float32(len(variants)) for k, v in result.items()}
    result["label"] = corpus.label[idx]
    result["gender"] = corpus.gender[idx]
    result["intensity"] = corpus.intensity[idx]
    result["speaker"] = corpus.speaker[idx]
    if corpus.sentence is None or corpus.common is None:  # CachedCorpus.__post_init__ fills both
        raise ValueError("the corpus has no sentence/common columns (a CachedCorpus fills them when built)")
    result["sentence"] = corpus.sentence[idx]
    result["common"] = corpus.common[idx]
    return result


def _voice_augment(audio: torch.Tensor, lengths: torch.Tensor, config: TrainConfig,
                   gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Pitch shift and tempo change of chosen rows (the speaker's voice, before the channel)."""
    from .tempo import pitch_shift, time_stretch

    if config.pitch_prob > 0:
        audio, lengths = pitch_shift(audio, lengths, gen, p=config.pitch_prob)
    if config.stretch_prob > 0:
        audio, lengths = time_stretch(audio, lengths, gen, p=config.stretch_prob)
    return audio, lengths


def _uar(y: np.ndarray, pred: np.ndarray) -> float:
    recalls = [np.mean(pred[y == c] == c) for c in np.unique(y)]
    return float(np.mean(recalls))


def _lr_at(step: int, total: int, config: TrainConfig) -> float:
    warm = max(1, int(config.warmup_frac * total))
    if step < warm:
        return config.lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train_model(
    corpus: CachedCorpus,
    train_idx: np.ndarray,
    val_idx: np.ndarray | None,
    config: TrainConfig,
    out_dir: Path,
    *,
    resume: bool = True,
    progress: bool = True,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
) -> TrainResult:
    """Train on ``train_idx``; pick the epoch with the best validation UAR (online adaptation).

    With ``config.mask_loss`` each row's emotion loss covers only the classes
    its corpus has, and validation UAR takes the argmax over each validation
    clip's corpus classes (so an ASED validation speaker is not scored on calm).
    """
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    device = torch.device(config.device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = EmotionNet(config.model).to(device)
    if config.model.speaker_window_stats:  # (a resumed run loads the floor with the weights)
        floor = set_window_std_floor(model, corpus, train_idx, config.seed)
        log(f"window statistics std floor: median {np.median(floor):.3f} over {floor.size}")
    if config.model.prior_frames or config.model.prior_windows:
        prior = set_population_prior(model, corpus, train_idx, config.seed)
        log(f"population prior: {config.model.prior_frames:g} frames, {config.model.prior_windows:g} windows; "
            f"band shape {prior['band_shape'].min():+.2f}..{prior['band_shape'].max():+.2f}, "
            f"band std median {np.sqrt(np.median(prior['band_var'])):.2f}")
    loss_fn = MultitaskLoss(unmasked_weight=config.unmasked_weight if config.mask_loss else 0.0).to(device)
    params = list(model.parameters()) + list(loss_fn.parameters())
    optimiser = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    sampler = make_sampler(corpus, train_idx, config, rng)
    class_masks = corpus_class_masks(corpus.corpus, corpus.label) if config.mask_loss else None
    if isinstance(sampler, BalancedSampler):
        log(f"balanced sampling, corpus weights: {sampler.describe()}")
    augment = None
    if config.augment:
        augment = GroupChannelAugment(seed=config.seed)
    gen = torch.Generator().manual_seed(config.seed + 1)
    avd_table = avd_lookup()
    crop = int(config.crop_s * config.model.frontend.sample_rate)
    total_steps = config.epochs * config.steps_per_epoch
    history: list[dict] = []
    if config.select not in ("best", "last"):
        raise ValueError(f"unknown weight selection {config.select!r} (best or last)")
    best: _BestWeights = {"uar": -1.0, "epoch": -1, "state": None}
    start_epoch = 0
    ckpt_path = out_dir / "checkpoint.pt"
    average = WeightAverage(model, config.ema_decay) if config.ema_decay > 0 else None
    if resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, weights_only=False)
        model.load_state_dict(ckpt["model"])
        if average is not None and "average" in ckpt:
            average.load_state(ckpt["average"])
        loss_fn.load_state_dict(ckpt["loss"])
        optimiser.load_state_dict(ckpt["optimiser"])
        rng.bit_generator.state = ckpt["rng"]
        gen.set_state(ckpt["gen"])
        if augment is not None and "augment" in ckpt:
            augment.load_state(ckpt["augment"])
        history, best, start_epoch = ckpt["history"], ckpt["best"], ckpt["epoch"] + 1
        log(f"resumed from {ckpt_path} at epoch {start_epoch}")
    autocast = config.bf16 and device.type == "cpu"
    try:
        from tqdm import tqdm
    except ImportError:  # no bar without tqdm
        tqdm = None
    stale = 0 if best["epoch"] < 0 else (start_epoch - 1 - best["epoch"])
    for epoch in range(start_epoch, config.epochs):
        model.train()
        t0 = time.perf_counter()
        sums: dict[str, float] = {}
        steps = range(config.steps_per_epoch)
        bar = tqdm(steps, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False, file=sys.stderr) if (tqdm and progress) else steps
        for step in bar:
            global_step = epoch * config.steps_per_epoch + step
            for group in optimiser.param_groups:
                group["lr"] = _lr_at(global_step, total_steps, config)
            idx, groups = sampler.sample()
            audio, lengths = crop_batch(corpus, idx, crop, rng)
            if config.augment and (config.pitch_prob > 0 or config.stretch_prob > 0):
                audio, lengths = _voice_augment(audio, lengths, config, gen)
            if augment is not None:
                audio = augment(audio, lengths, torch.from_numpy(groups))
            audio, lengths = audio.to(device), lengths.to(device)
            with torch.no_grad():
                logmel, mask = model.frontend.log_mel(audio, lengths)
                pitch = model.track_pitch(audio, lengths)
                own = model.own_stats(logmel, mask, pitch)
                hist = torch.from_numpy(history_matrix(groups, rng, config.cold_start_prob)).to(device) @ own
                normed, window_features = model.normalise(logmel, mask, own, hist, pitch)
                if config.augment:
                    normed = spec_mask(normed, mask, config.spec_time_masks, config.spec_freq_masks, gen)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast):
                out = model.heads(model.encode(normed, mask, window_features=window_features))
            targets = {k: v.to(device) for k, v in _targets(corpus, idx, avd_table, class_masks).items()}
            loss, parts = loss_fn(out, targets)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, 5.0)
            optimiser.step()
            if average is not None:
                average.update(model)
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
        record = {"epoch": epoch, "seconds": round(time.perf_counter() - t0, 1)}
        record.update({f"loss_{k}": round(v / config.steps_per_epoch, 4) for k, v in sums.items()})
        scored = average.model if average is not None else model
        if val_idx is not None and len(val_idx):
            pred = predict(scored, corpus, val_idx, mode="online", order_seed=config.seed)
            val_pred = own_class_prediction(pred["emotion_logits"], corpus.corpus[val_idx], class_masks)
            record["val_uar"] = round(_uar(pred["label"], val_pred), 4)
            if config.select == "best" and record["val_uar"] > best["uar"]:
                best = {"uar": record["val_uar"], "epoch": epoch, "state": copy.deepcopy(scored.state_dict())}
                stale = 0
            else:
                stale += 1
        history.append(record)
        log(" ".join(f"{k}={v}" for k, v in record.items()))
        ckpt = {
            "model": model.state_dict(), "loss": loss_fn.state_dict(), "optimiser": optimiser.state_dict(),
            "rng": rng.bit_generator.state, "gen": gen.get_state(), "history": history, "best": best,
            "epoch": epoch, "config": config.to_dict(),
        }
        if augment is not None:
            ckpt["augment"] = augment.state()
        if average is not None:
            ckpt["average"] = average.state()
        torch.save(ckpt, ckpt_path)
        if val_idx is not None and config.select == "best" and stale >= config.patience:
            log(f"early stop: validation UAR has not improved for {stale} epochs")
            break
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    elif average is not None:  # no validation set, or --select last: the averaged weights of the last step
        model.load_state_dict(average.model.state_dict())
    model.eval()
    if config.select == "last" and history:
        last = history[-1]
        return TrainResult(model=model, history=history, best_epoch=int(last["epoch"]),
                           best_val_uar=float(last.get("val_uar", -1.0)))
    return TrainResult(model=model, history=history, best_epoch=int(best["epoch"]), best_val_uar=float(best["uar"]))
