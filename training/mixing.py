"""Training on corpora with different label sets: masked emotion loss and balanced batches.

Corpora disagree on which emotions exist: calm is RAVDESS-only, TESS has 7
classes, ASED 5 (neutral, fearful, happy, sad, angry). With a plain softmax
over all 8 labels, every TESS or ASED clip would teach the model "this is not
calm", though the corpus simply never asked for calm. So the emotion loss of
each example is computed over the classes its corpus has: the logits of
absent classes are set to -inf before the softmax (:func:`masked_cross_entropy`),
which leaves them exactly zero gradient from that example.

Batches: :class:`BalancedSampler` draws speaker groups (the speaker-history
simulation of train.py needs several clips of one speaker) by this rule:

1. a corpus, with probability proportional to the square root of its number of
   training speakers (``corpus_weight="sqrt-speakers"``, the default), of its
   training clips (``"sqrt-size"``), or uniformly (``"uniform"``);
2. a speaker of that corpus, uniformly;
3. for each row of the group, a class uniformly among the classes that
   speaker has, then a clip of that class uniformly.

So no corpus dominates by its clip count (TESS: 2 speakers, 2800 clips), and
within a corpus every class is drawn about equally often whatever its count.
The default weights speakers because unseen speakers are what the model is
scored on: a corpus of 2 speakers gives little voice variety however many clips
it holds. Pure numpy/torch; no I/O.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from serstream.contract import LABELS

__all__ = [
    "CORPUS_WEIGHTS",
    "FOUR_CLASSES",
    "BalancedSampler",
    "corpus_class_masks",
    "corpus_weights",
    "masked_cross_entropy",
    "restricted_argmax",
    "row_class_mask",
]

#: How a balanced batch picks its corpus (see the module docstring).
CORPUS_WEIGHTS = ("sqrt-speakers", "sqrt-size", "uniform")

#: The classes every corpus here shares: leave-one-corpus-out scores these.
FOUR_CLASSES = ("neutral", "happy", "sad", "angry")


def corpus_class_masks(corpus_names: np.ndarray, labels: np.ndarray, n_labels: int = len(LABELS)) -> dict[str, np.ndarray]:
    """Corpus name -> bool [n_labels]: the classes that corpus has among ``labels``."""
    masks = {}
    for name in np.unique(corpus_names):
        mask = np.zeros(n_labels, dtype=bool)
        mask[np.unique(labels[corpus_names == name])] = True
        masks[str(name)] = mask
    return masks


def row_class_mask(corpus_names: np.ndarray, masks: Mapping[str, np.ndarray], n_labels: int = len(LABELS)) -> np.ndarray:
    """bool [B, n_labels]: each row's corpus mask (all True for a corpus not in ``masks``)."""
    out = np.ones((len(corpus_names), n_labels), dtype=bool)
    for r, name in enumerate(corpus_names):
        if str(name) in masks:
            out[r] = masks[str(name)]
    return out


def masked_cross_entropy(logits: torch.Tensor, target: torch.Tensor, class_mask: torch.Tensor,
                         label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy of each row over its present classes only.

    ``class_mask`` [B, C] bool: True where the row's corpus has the class. Absent
    logits become -inf before the log-softmax, so they get no probability and no
    gradient; label smoothing spreads its mass over the present classes only.
    Equal to ``F.cross_entropy`` on the present columns alone. Raises ValueError
    when a target is itself masked out (a corpus mask that misses its own label).
    """
    mask = class_mask.to(torch.bool)
    if not bool(mask.gather(1, target[:, None]).all()):
        raise ValueError("masked_cross_entropy: a target class is masked out for its own row")
    z = logits.float().masked_fill(~mask, float("-inf"))
    log_p = torch.log_softmax(z, dim=1)
    log_p = torch.where(mask, log_p, torch.zeros_like(log_p))  # 0 * -inf would be NaN
    nll = -log_p.gather(1, target[:, None]).squeeze(1)
    if label_smoothing > 0:
        k = mask.sum(dim=1).clamp(min=1).float()
        smooth = -log_p.sum(dim=1) / k
        nll = (1.0 - label_smoothing) * nll + label_smoothing * smooth
    return nll.mean()


def restricted_argmax(logits: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Argmax over the allowed classes: ``allowed`` bool [C] for all rows or [N, C] per row."""
    z = np.where(np.broadcast_to(allowed, logits.shape), logits, -np.inf)
    return z.argmax(axis=1)


def corpus_weights(names: Sequence[str], n_speakers: Sequence[int], n_clips: Sequence[int], rule: str) -> np.ndarray:
    """Probability of drawing each corpus for a speaker group under ``rule`` (see the module docstring)."""
    if rule not in CORPUS_WEIGHTS:
        raise ValueError(f"unknown corpus weighting {rule!r}; known: {', '.join(CORPUS_WEIGHTS)}")
    if rule == "uniform":
        w = np.ones(len(names))
    elif rule == "sqrt-speakers":
        w = np.sqrt(np.asarray(n_speakers, dtype=np.float64))
    else:
        w = np.sqrt(np.asarray(n_clips, dtype=np.float64))
    return w / w.sum()


class BalancedSampler:
    """Speaker groups drawn corpus -> speaker -> class -> clip (the rule of the module docstring).

    ``corpus``: any object with ``speaker``, ``corpus`` and ``label`` arrays
    (a :class:`training.cache.CachedCorpus`). ``sample()`` returns utterance
    indices [B] and group ids [B], like train.py's v0.3 sampler.
    """

    def __init__(self, corpus, train_idx: np.ndarray, speakers_per_batch: int, per_speaker: int,
                 rng: np.random.Generator, corpus_weight: str = "sqrt-speakers") -> None:
        self.rng = rng
        self.speakers_per_batch, self.per_speaker = speakers_per_batch, per_speaker
        train_idx = np.asarray(train_idx)
        by_corpus: dict[str, dict[str, dict[int, np.ndarray]]] = {}
        for spk in np.unique(corpus.speaker[train_idx]):
            rows = train_idx[corpus.speaker[train_idx] == spk]
            name = str(corpus.corpus[rows[0]])
            by_corpus.setdefault(name, {})[str(spk)] = {int(c): rows[corpus.label[rows] == c]
                                                         for c in np.unique(corpus.label[rows])}
        if not by_corpus:
            raise ValueError("BalancedSampler: no training utterances")
        self.names = sorted(by_corpus)
        self.speakers = {n: sorted(by_corpus[n]) for n in self.names}
        self.classes = by_corpus
        n_clips = [sum(len(r) for s in by_corpus[n].values() for r in s.values()) for n in self.names]
        self.weights = corpus_weights(self.names, [len(self.speakers[n]) for n in self.names], n_clips, corpus_weight)

    def describe(self) -> str:
        return ", ".join(f"{n} {w:.2f} ({len(self.speakers[n])} speakers)" for n, w in zip(self.names, self.weights))

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        idx, groups = [], []
        for g in range(self.speakers_per_batch):
            name = self.names[int(self.rng.choice(len(self.names), p=self.weights))]
            speakers = self.speakers[name]
            classes = self.classes[name][speakers[int(self.rng.integers(len(speakers)))]]
            keys = list(classes)
            for _ in range(self.per_speaker):
                rows = classes[keys[int(self.rng.integers(len(keys)))]]
                idx.append(int(rows[int(self.rng.integers(len(rows)))]))
                groups.append(g)
        return np.asarray(idx), np.asarray(groups)

