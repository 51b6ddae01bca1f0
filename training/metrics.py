"""Evaluation metrics in numpy: classification, calibration, agreement, fold summaries.

Class indices follow :data:`serstream.contract.LABELS`. ``uar`` (unweighted
average recall) averages recall over the classes present in ``y_true``;
``macro_f1`` averages F1 over classes present in ``y_true`` or ``y_pred`` (the
scikit-learn convention). :func:`summarise` turns per-fold dicts into mean and
std (sample std, ddof=1) per metric; :func:`format_table` and
:func:`format_comparison` print them as Markdown. :func:`plot_confusion` is the
one function that needs matplotlib (Agg backend, PNG out).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence, TypeAlias, TypeGuard

import numpy as np

__all__ = [
    "PERCENT_METRICS",
    "accuracy",
    "ccc",
    "classification_metrics",
    "confusion_matrix",
    "ece",
    "fit_class_bias",
    "fit_temperature",
    "format_comparison",
    "format_table",
    "gender_gap_interval",
    "gender_uar_gap",
    "macro_f1",
    "median_within_speaker_std",
    "nll",
    "plot_confusion",
    "softmax",
    "summarise",
    "top_k_accuracy",
    "uar",
    "uar_by_gender",
]

# What the metric functions take: a list, or (what the training code mostly passes) a 1-D numpy array.
ClassIndices: TypeAlias = Sequence[int] | np.ndarray  # indices into serstream.contract.LABELS
RealValues: TypeAlias = Sequence[float] | np.ndarray
GenderNames: TypeAlias = Sequence[str | None] | np.ndarray  # "female", "male"; anything else is left out
SpeakerNames: TypeAlias = Sequence[str] | np.ndarray


def _labels(y: ClassIndices) -> np.ndarray:
    array = np.asarray(y)
    if array.ndim != 1:
        raise ValueError(f"expected a 1-D array of class indices, got shape {array.shape}")
    return array.astype(np.int64)


def _pair(y_true: ClassIndices, y_pred: ClassIndices) -> tuple[np.ndarray, np.ndarray]:
    t, p = _labels(y_true), _labels(y_pred)
    if t.shape != p.shape:
        raise ValueError(f"y_true has {t.size} entries, y_pred {p.size}")
    if t.size == 0:
        raise ValueError("no samples to score")
    return t, p


def accuracy(y_true: ClassIndices, y_pred: ClassIndices) -> float:
    """Fraction of exact matches (weighted accuracy, WA)."""
    t, p = _pair(y_true, y_pred)
    return float(np.mean(t == p))


def confusion_matrix(
    y_true: ClassIndices, y_pred: ClassIndices, n_classes: int | None = None
) -> np.ndarray:
    """Counts [n_classes, n_classes]; row = true class, column = predicted class."""
    t, p = _pair(y_true, y_pred)
    n = int(n_classes if n_classes is not None else max(t.max(), p.max()) + 1)
    if t.min() < 0 or p.min() < 0 or t.max() >= n or p.max() >= n:
        raise ValueError(f"class indices must lie in [0, {n})")
    cm = np.zeros((n, n), dtype=np.int64)
    np.add.at(cm, (t, p), 1)
    return cm


def uar(y_true: ClassIndices, y_pred: ClassIndices) -> float:
    """Unweighted average recall over the classes present in ``y_true``."""
    t, p = _pair(y_true, y_pred)
    recalls = [float(np.mean(p[t == c] == c)) for c in np.unique(t)]
    return float(np.mean(recalls))


def macro_f1(y_true: ClassIndices, y_pred: ClassIndices) -> float:
    """Mean F1 over classes present in ``y_true`` or ``y_pred`` (0 where undefined)."""
    t, p = _pair(y_true, y_pred)
    scores = []
    for c in np.union1d(np.unique(t), np.unique(p)):
        tp = float(np.sum((t == c) & (p == c)))
        fp = float(np.sum((t != c) & (p == c)))
        fn = float(np.sum((t == c) & (p != c)))
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def top_k_accuracy(y_true: ClassIndices, scores: np.ndarray, k: int = 3) -> float:
    """Share of samples whose true class is among the k highest scores (ties: lower index first)."""
    t = _labels(y_true)
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] != t.size:
        raise ValueError(f"scores must be [n_samples, n_classes], got {s.shape}")
    k = min(k, s.shape[1])
    top = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return float(np.mean(np.any(top == t[:, None], axis=1)))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(logits: np.ndarray, y: ClassIndices, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true classes under softmax(logits / T)."""
    t = _labels(y)
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-np.mean(log_probs[np.arange(t.size), t]))


def ece(probs: np.ndarray, y: ClassIndices, n_bins: int = 15) -> float:
    """Expected calibration error: confidence vs accuracy over equal-width bins of max prob."""
    t = _labels(y)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != t.size:
        raise ValueError(f"probs must be [n_samples, n_classes], got {p.shape}")
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == t).astype(np.float64)
    # Bin i holds confidences in (i/n, (i+1)/n]; a confidence of exactly 0 joins bin 0.
    bins = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        in_bin = bins == b
        if in_bin.any():
            total += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(total)


def fit_temperature(
    logits: np.ndarray, y: ClassIndices, bounds: tuple[float, float] = (0.05, 20.0)
) -> float:
    """Temperature T minimising the NLL of softmax(logits / T) on a held-out set.

    Golden-section search over log T within ``bounds`` (the NLL is unimodal in T).
    """
    low, high = math.log(bounds[0]), math.log(bounds[1])
    ratio = (math.sqrt(5.0) - 1.0) / 2.0

    def loss(log_t: float) -> float:
        return nll(logits, y, math.exp(log_t))

    a, b = low, high
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = loss(c), loss(d)
    while b - a > 1e-5:
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = loss(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = loss(d)
    return float(math.exp((a + b) / 2.0))


def fit_class_bias(logits: np.ndarray, y: ClassIndices, n_classes: int | None = None, l2: float = 0.01,
                   steps: int = 500, step_size: float = 0.5) -> np.ndarray:
    """Per-class offsets b [C] (mean 0) minimising the class-balanced NLL of softmax(logits + b), plus l2 |b|^2 / 2.

    Class-balanced: every class present weighs the same, whatever its count, as UAR does. Plain
    gradient descent on a convex loss; a class absent from ``y`` is only pulled toward 0 by ``l2``.
    """
    t = _labels(y)
    z = np.asarray(logits, dtype=np.float64)
    c = n_classes or z.shape[1]
    if z.ndim != 2 or z.shape[0] != t.size or z.shape[1] != c:
        raise ValueError(f"logits must be [n_samples, {c}] for {t.size} labels, got {z.shape}")
    weight = 1.0 / np.bincount(t, minlength=c)[t]
    weight = weight / weight.sum()
    onehot = np.eye(c)[t]
    b = np.zeros(c)
    for _ in range(steps):
        p = softmax(z + b)
        b -= step_size * ((weight[:, None] * (p - onehot)).sum(axis=0) + l2 * b)
    return b - b.mean()


def ccc(x: RealValues, y: RealValues) -> float:
    """Lin's concordance correlation coefficient (population moments).

    1 for perfect agreement; two equal constants count as perfect, a constant
    against a different constant or a varying series scores by the formula.
    """
    a = np.asarray(x, dtype=np.float64)
    b = np.asarray(y, dtype=np.float64)
    if a.shape != b.shape or a.size == 0:
        raise ValueError("ccc needs two non-empty sequences of the same length")
    mean_a, mean_b = a.mean(), b.mean()
    covariance = np.mean((a - mean_a) * (b - mean_b))
    denominator = a.var() + b.var() + (mean_a - mean_b) ** 2
    if denominator == 0:
        return 1.0
    return float(2.0 * covariance / denominator)


def uar_by_gender(
    y_true: ClassIndices, y_pred: ClassIndices, genders: GenderNames
) -> dict[str, float]:
    """{"uar_female", "uar_male"}; other or missing genders are left out, absent ones are NaN."""
    t, p = _pair(y_true, y_pred)
    g = np.asarray([str(x) if x is not None else "" for x in genders])
    if g.size != t.size:
        raise ValueError(f"{g.size} genders for {t.size} samples")
    result = {}
    for gender in ("female", "male"):
        mask = g == gender
        result[f"uar_{gender}"] = uar(t[mask], p[mask]) if mask.any() else float("nan")
    return result


def gender_uar_gap(
    y_true: ClassIndices, y_pred: ClassIndices, genders: GenderNames
) -> float:
    """UAR on female speakers minus UAR on male speakers (NaN if either is absent)."""
    by_gender = uar_by_gender(y_true, y_pred, genders)
    return by_gender["uar_female"] - by_gender["uar_male"]


def gender_gap_interval(
    y_true: ClassIndices,
    y_pred: ClassIndices,
    genders: GenderNames,
    speakers: SpeakerNames,
    level: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float] | None:
    """Speaker-bootstrap interval of the female-minus-male UAR gap, or None with under 2 speakers of a gender.

    A speaker's clips are not independent samples: RAVDESS tests 12 actresses
    and 12 actors, and which actors a corpus holds moves its gap by many points.
    Each resample draws, within each gender, as many speakers as it has, with
    replacement, and keeps all their clips (a speaker drawn twice counts twice);
    the interval is the central ``level`` share of the resampled gaps. With few
    speakers per gender (a RAVDESS fold's 2) it is too narrow: read it over
    pooled folds or a whole held-out corpus.
    """
    t, p = _pair(y_true, y_pred)
    g = np.asarray([str(x) if x is not None else "" for x in genders])
    s = np.asarray([str(x) for x in speakers])
    if g.size != t.size or s.size != t.size:
        raise ValueError(f"{g.size} genders and {s.size} speakers for {t.size} samples")
    n_classes = int(max(t.max(), p.max()) + 1)
    rng = np.random.default_rng(seed)
    uars = []
    for gender in ("female", "male"):
        names = np.unique(s[g == gender])
        if len(names) < 2:
            return None
        # Per speaker, a flat confusion matrix; a resample is a count-weighted sum of them.
        per_speaker = np.stack([np.bincount(t[s == n] * n_classes + p[s == n], minlength=n_classes * n_classes)
                                for n in names]).astype(np.float64)
        draws = rng.integers(0, len(names), size=(n_resamples, len(names)))
        weights = np.zeros((n_resamples, len(names)))
        np.add.at(weights, (np.arange(n_resamples)[:, None], draws), 1.0)
        cm = (weights @ per_speaker).reshape(n_resamples, n_classes, n_classes)
        support = cm.sum(axis=2)
        recall = np.divide(np.diagonal(cm, axis1=1, axis2=2), support, out=np.zeros_like(support), where=support > 0)
        uars.append(recall.sum(axis=1) / np.maximum((support > 0).sum(axis=1), 1))  # over the classes present
    gaps = uars[0] - uars[1]
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(gaps, [tail, 100.0 - tail])
    return float(low), float(high)


def classification_metrics(
    y_true: ClassIndices,
    probs: np.ndarray,
    genders: GenderNames | None = None,
    k: int = 3,
) -> dict[str, float]:
    """The headline numbers for one fold from class probabilities."""
    p = np.asarray(probs, dtype=np.float64)
    y_pred = p.argmax(axis=1)
    result = {
        "accuracy": accuracy(y_true, y_pred),
        "uar": uar(y_true, y_pred),
        "macro_f1": macro_f1(y_true, y_pred),
        f"top{k}_accuracy": top_k_accuracy(y_true, p, k),
        "ece": ece(p, y_true),
    }
    if genders is not None:
        result.update(uar_by_gender(y_true, y_pred, genders))
        result["uar_gap"] = result["uar_female"] - result["uar_male"]
    return result


def plot_confusion(
    cm: np.ndarray, labels: Sequence[str], path: Path | str, title: str = ""
) -> Path:
    """Save a row-normalised confusion matrix (cells show share and count) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.asarray(cm, dtype=np.int64)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1] or counts.shape[0] != len(labels):
        raise ValueError(f"confusion matrix {counts.shape} does not match {len(labels)} labels")
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    n = len(labels)
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * n, 0.8 + 0.8 * n), dpi=110)
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(n), labels=list(labels), rotation=45, ha="right")
    ax.set_yticks(range(n), labels=list(labels))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    for i in range(n):
        for j in range(n):
            color = "white" if shares[i, j] > 0.6 else "black"
            text = f"{shares[i, j]:.2f}\n({counts[i, j]})"
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color=color)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    plt.close(fig)
    return out


def _is_number(value: object) -> TypeGuard[int | float | np.integer | np.floating]:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def summarise(folds: Sequence[Mapping[str, object]]) -> dict[str, dict[str, float]]:
    """metric -> {"mean", "std", "n"} over folds, for every scalar numeric metric.

    Non-numeric entries (confusion matrices, names) are ignored; NaNs are left
    out of that metric's mean (``n`` counts the folds used). ``std`` is the
    sample standard deviation (0 for a single fold).
    """
    keys: list[str] = []
    for fold in folds:
        keys.extend(k for k, v in fold.items() if _is_number(v) and k not in keys)
    summary: dict[str, dict[str, float]] = {}
    for key in keys:
        present = [f[key] for f in folds if key in f]
        values = np.array([float(v) for v in present if _is_number(v)], dtype=np.float64)
        values = values[~np.isnan(values)]
        if values.size == 0:
            summary[key] = {"mean": float("nan"), "std": float("nan"), "n": 0}
            continue
        std = float(values.std(ddof=1)) if values.size > 1 else 0.0
        summary[key] = {"mean": float(values.mean()), "std": std, "n": int(values.size)}
    return summary


#: Metrics that are shares and print as percentages in the tables.
PERCENT_METRICS = (
    "accuracy",
    "uar",
    "macro_f1",
    "top3_accuracy",
    "uar_female",
    "uar_male",
    "uar_gap",
    "uar_common",
    "uar_four_class",
    "uar_own_classes",
)


def _cell(value: object, percent: bool) -> str:
    if not _is_number(value):
        return str(value)
    number = float(value)
    if math.isnan(number):
        return "-"
    return f"{100 * number:.1f}" if percent else f"{number:.3f}"


def _summary_cell(stats: Mapping[str, float] | None, percent: bool) -> str:
    if stats is None or stats["n"] == 0:
        return "-"
    return f"{_cell(stats['mean'], percent)} ± {_cell(stats['std'], percent)}"


def format_table(
    folds: Sequence[Mapping[str, object]],
    metrics: Sequence[str],
    percent: Sequence[str] = PERCENT_METRICS,
    key: str = "fold",
) -> str:
    """Markdown: one row per fold, then a ``mean ± std`` row. Shares in ``percent`` print as %."""
    header = f"| {key} | " + " | ".join(metrics) + " |"
    rule = "|" + "---|" * (len(metrics) + 1)
    lines = [header, rule]
    for i, fold in enumerate(folds):
        name = fold.get(key, i + 1)
        cells = [_cell(fold.get(m, float("nan")), m in percent) for m in metrics]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    summary = summarise(folds)
    cells = [_summary_cell(summary.get(m), m in percent) for m in metrics]
    lines.append("| mean ± std | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_comparison(
    settings: Mapping[str, Sequence[Mapping[str, object]]],
    metrics: Sequence[str],
    percent: Sequence[str] = PERCENT_METRICS,
) -> str:
    """Markdown: one row per setting (e.g. with/without adaptation), cells mean ± std over folds."""
    lines = ["| setting | " + " | ".join(metrics) + " |", "|" + "---|" * (len(metrics) + 1)]
    for name, folds in settings.items():
        summary = summarise(folds)
        cells = [_summary_cell(summary.get(m), m in percent) for m in metrics]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def median_within_speaker_std(features: np.ndarray, speakers: SpeakerNames) -> np.ndarray:
    """[D] median over speakers of each feature's std across that speaker's rows.

    The typical spread of a feature within one voice: the floor under a speaker's
    running std when z-scoring online (a speaker's first clips have no spread yet).
    """
    speaker_array = np.asarray(speakers)
    if len(speaker_array) != len(features) or len(features) == 0:
        raise ValueError(f"need one speaker per row and at least one row, got {len(speaker_array)} for {len(features)}")
    return np.median([np.asarray(features)[speaker_array == s].std(axis=0) for s in np.unique(speaker_array)], axis=0)
