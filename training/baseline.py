"""The classical baseline, in the same harness as the CNN: utterance statistics + a linear model.

Features per utterance (librosa): MFCC and delta-MFCC statistics (mean, std,
10/50/90th percentiles), log-mel band means and stds, and cheap prosody
proxies in the spirit of eGeMAPS (log-F0 from ``librosa.yin`` on the louder
frames, frame energy, their spread and slope, the voiced fraction). Then
standardisation and a class-weighted logistic regression (or a linear SVM),
trained on each fold's training and validation speakers and tested on its
test speakers, exactly the folds the CNN uses.

``speaker_norm=True`` z-scores each speaker's features by that speaker's own
mean and std first (no labels used; test speakers are normalised by their own
statistics too), the label-free adaptation the issue asks to measure.

Features are cached under ``~/.cache/serstream/`` (outside the repository:
they are derived from licensed corpora and must never be committed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from serstream.contract import LABELS, SAMPLE_RATE

from .cache import save_npz_atomically
from .datasets import DatasetError, Utterance, load_audio, scan_corpora
from .folds import Fold, make_split, partition, ravdess_actor_folds
from .metrics import (
    classification_metrics,
    confusion_matrix,
    format_comparison,
    format_table,
    gender_gap_interval,
    gender_uar_gap,
    median_within_speaker_std,
    plot_confusion,
    softmax,
    uar,
)

__all__ = [
    "DEFAULT_CACHE_DIR",
    "FeatureConfig",
    "FEATURE_GROUPS",
    "evaluate_baseline",
    "extract_features",
    "feature_columns",
    "main_from_args",
    "pooled_gender_gap",
    "run_baseline",
    "speaker_normalise",
    "speaker_normalise_online",
    "utterance_features",
]

DEFAULT_CACHE_DIR = Path(os.environ.get("SERSTREAM_CACHE", Path.home() / ".cache" / "serstream"))
TABLE_METRICS = ("accuracy", "uar", "macro_f1", "top3_accuracy", "uar_gap", "ece")
_SAVE_EVERY = 500


@dataclass(frozen=True)
class FeatureConfig:
    """Feature extraction settings; any change gives a new cache file."""

    sample_rate: int = SAMPLE_RATE
    n_fft: int = 512
    hop_length: int = 160
    n_mels: int = 40
    n_mfcc: int = 20
    f0_min_hz: float = 60.0
    f0_max_hz: float = 500.0
    #: Frames within this many dB of the loudest frame count as voiced for F0 stats.
    voiced_range_db: float = 25.0
    version: int = 1

    def key(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def _stats(values: np.ndarray) -> np.ndarray:
    """mean, std, 10th, 50th, 90th percentile along the last axis."""
    if values.shape[-1] == 0:
        return np.zeros(values.shape[:-1] + (5,))
    percentiles = np.percentile(values, (10, 50, 90), axis=-1)
    return np.stack([values.mean(-1), values.std(-1), *percentiles], axis=-1)


def _slope(values: np.ndarray) -> float:
    if values.size < 2:
        return 0.0
    t = np.linspace(-1.0, 1.0, values.size)
    return float(np.dot(t - t.mean(), values - values.mean()) / np.dot(t - t.mean(), t - t.mean()))


def utterance_features(audio: np.ndarray, config: FeatureConfig = FeatureConfig()) -> np.ndarray:
    """One fixed-length float32 feature vector for a mono 16 kHz clip."""
    import librosa

    audio = np.asarray(audio, dtype=np.float32)
    frame = 2 * config.n_fft
    if audio.size < frame:
        audio = np.pad(audio, (0, frame - audio.size))
    mel = librosa.feature.melspectrogram(
        y=audio,
        sr=config.sample_rate,
        n_fft=config.n_fft,
        hop_length=config.hop_length,
        n_mels=config.n_mels,
        power=2.0,
    )
    log_mel = np.log(mel + 1e-10)
    mfcc = librosa.feature.mfcc(S=librosa.power_to_db(mel), n_mfcc=config.n_mfcc)
    n_frames = mfcc.shape[1]
    delta = librosa.feature.delta(mfcc, width=min(9, n_frames if n_frames % 2 else n_frames - 1))
    rms = librosa.feature.rms(y=audio, frame_length=frame, hop_length=config.hop_length)[0]
    energy_db = 20.0 * np.log10(rms + 1e-8)
    f0 = librosa.yin(
        audio,
        fmin=config.f0_min_hz,
        fmax=config.f0_max_hz,
        sr=config.sample_rate,
        frame_length=frame,
        hop_length=config.hop_length,
    )
    n = min(f0.size, energy_db.size)
    loud = energy_db[:n] >= energy_db[:n].max() - config.voiced_range_db
    log_f0 = np.log2(f0[:n][loud])
    prosody = np.concatenate(
        [_stats(log_f0), [_slope(log_f0)], _stats(energy_db), [_slope(energy_db), loud.mean()]]
    )
    parts = [
        _stats(mfcc).ravel(),
        _stats(delta).ravel(),
        log_mel.mean(axis=1),
        log_mel.std(axis=1),
        prosody,
    ]
    return np.concatenate(parts).astype(np.float32)


def _file_key(path: Path) -> str:
    stat = path.stat()
    return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"


def extract_features(
    utterances: Sequence[Utterance],
    cache_dir: Path | str | None = None,
    config: FeatureConfig = FeatureConfig(),
    progress: bool = False,
) -> np.ndarray:
    """[N, D] features for the utterances, computed once and cached by file path, size and mtime.

    ``cache_dir`` None uses DEFAULT_CACHE_DIR (~/.cache/serstream); the cache
    holds one ``baseline-features-<config>.npz`` file.
    """
    cache_root = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
    cache_root.mkdir(parents=True, exist_ok=True)
    cache_file = cache_root / f"baseline-features-{config.key()}.npz"
    cached: dict[str, np.ndarray] = {}
    if cache_file.exists():
        try:
            with np.load(cache_file, allow_pickle=False) as data:
                cached = dict(zip(data["keys"].tolist(), data["features"]))
        except (OSError, ValueError, KeyError):
            cached = {}  # a damaged cache is rebuilt, not trusted
    keys = [_file_key(u.path) for u in utterances]
    missing = [i for i, k in enumerate(keys) if k not in cached]
    iterator: Iterable[int] = missing
    if progress and missing:
        from tqdm import tqdm

        iterator = tqdm(missing, desc="baseline features", unit="file")
    for done, i in enumerate(iterator, start=1):
        audio = load_audio(utterances[i].path, config.sample_rate)
        cached[keys[i]] = utterance_features(audio, config)
        if done % _SAVE_EVERY == 0:  # an interrupted extraction keeps what it has done
            _save_cache(cache_file, cached)
    if missing:
        _save_cache(cache_file, cached)
    return np.stack([cached[k] for k in keys]).astype(np.float64)


def _save_cache(cache_file: Path, cached: dict[str, np.ndarray]) -> None:
    keys = sorted(cached)
    save_npz_atomically(cache_file, keys=np.array(keys), features=np.stack([cached[k] for k in keys]))


def speaker_normalise(features: np.ndarray, speakers: Sequence[str]) -> np.ndarray:
    """Z-score each speaker's rows by that speaker's own mean and std (label-free)."""
    out = np.empty_like(features, dtype=np.float64)
    speaker_array = np.asarray(speakers)
    for speaker in np.unique(speaker_array):
        rows = speaker_array == speaker
        block = features[rows]
        out[rows] = (block - block.mean(axis=0)) / (block.std(axis=0) + 1e-6)
    return out


def speaker_normalise_online(features: np.ndarray, speakers: Sequence[str], floor: np.ndarray,
                             seed: int = 0) -> np.ndarray:
    """Each row z-scored by the mean and std of its speaker's rows heard so far, itself included.

    The monitor's way: a speaker's clips arrive one at a time (here in a random
    order per speaker, seeded), and a clip can only be compared with those before
    it. ``floor`` [D] bounds the std from below (a speaker's first clips have
    none): pass the training speakers' typical within-speaker std.
    """
    out = np.empty_like(features, dtype=np.float64)
    speaker_array = np.asarray(speakers)
    rng = np.random.default_rng(seed)
    for speaker in np.unique(speaker_array):
        rows = np.flatnonzero(speaker_array == speaker)
        rows = rows[rng.permutation(rows.size)]
        block = features[rows].astype(np.float64)
        count = np.arange(1, rows.size + 1)[:, None]
        mean = np.cumsum(block, axis=0) / count
        var = np.maximum(np.cumsum(block * block, axis=0) / count - mean * mean, 0.0)
        out[rows] = (block - mean) / np.maximum(np.sqrt(var), np.maximum(floor, 1e-6))
    return out


def feature_columns(groups: Sequence[str], config: FeatureConfig = FeatureConfig()) -> np.ndarray:
    """Column indices of :func:`utterance_features`'s vector for the named groups (``FEATURE_GROUPS``)."""
    k, m = config.n_mfcc, config.n_mels
    stats = {"mfcc": np.arange(0, 5 * k)}
    stats["mfcc_mean"], stats["mfcc_std"] = stats["mfcc"][0::5], stats["mfcc"][1::5]
    stats["dmfcc"] = np.arange(5 * k, 10 * k)
    stats["melmean"], stats["melstd"] = np.arange(10 * k, 10 * k + m), np.arange(10 * k + m, 10 * k + 2 * m)
    stats["prosody"] = np.arange(10 * k + 2 * m, 10 * k + 2 * m + 13)
    if not groups:
        raise DatasetError(f"no feature group named; choose from {', '.join(FEATURE_GROUPS)}")
    unknown = [g for g in groups if g not in stats]
    if unknown:
        raise DatasetError(f"unknown feature group(s) {', '.join(unknown)}; choose from {', '.join(FEATURE_GROUPS)}")
    return np.concatenate([stats[g] for g in groups])


#: Named slices of the feature vector, for ``--features`` (one variant per run of the ablation).
FEATURE_GROUPS = ("mfcc", "mfcc_mean", "mfcc_std", "dmfcc", "melmean", "melstd", "prosody")


def _sample_weights(utterances: Sequence[Utterance]) -> np.ndarray:
    """Equal total weight per (corpus, class) group, so TESS's neutral cannot swamp RAVDESS's."""
    groups = [(u.corpus, u.label) for u in utterances]
    counts: dict[tuple[str, str], int] = {}
    for g in groups:
        counts[g] = counts.get(g, 0) + 1
    weights = np.array([1.0 / counts[g] for g in groups])
    return weights * (len(weights) / weights.sum())


def _make_classifier(kind: str, seed: int) -> object:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    if kind == "logreg":
        model = LogisticRegression(C=0.1, max_iter=3000, random_state=seed)
    elif kind == "svm":
        model = LinearSVC(C=0.01, max_iter=20000, random_state=seed)
    else:
        raise ValueError(f"classifier must be 'logreg' or 'svm', not {kind!r}")
    return make_pipeline(StandardScaler(), model)


def evaluate_baseline(
    utterances: Sequence[Utterance],
    features: np.ndarray,
    folds: Sequence[Fold],
    speaker_norm: bool,
    classifier: str = "logreg",
    seed: int = 0,
    n_val_actors: int = 2,
    online: bool = False,
) -> list[dict]:
    """Train and test on each fold; one dict of metrics per fold (metrics.classification_metrics).

    The baseline has no early stopping, so it trains on training and validation speakers together.
    ``online`` (with ``speaker_norm``): test clips are normalised by their speaker's clips so far
    (:func:`speaker_normalise_online`), training clips by all of their speaker's.
    """
    if features.shape[0] != len(utterances):
        raise ValueError(f"{features.shape[0]} feature rows for {len(utterances)} utterances")
    speakers = [u.speaker for u in utterances]
    x = speaker_normalise(features, speakers) if speaker_norm else features
    label_index = {label: i for i, label in enumerate(LABELS)}
    y = np.array([label_index[u.label] for u in utterances])
    row_of = {id(u): i for i, u in enumerate(utterances)}
    results = []
    for fold_spec in folds:
        fold = fold_spec
        if not fold.train_speakers:
            fold = make_split(utterances, fold_spec, n_val_actors=n_val_actors, seed=seed)
        data = partition(utterances, fold)
        train_utts = data.train + data.val
        train_rows = np.array([row_of[id(u)] for u in train_utts])
        test_rows = np.array([row_of[id(u)] for u in data.test])
        model = _make_classifier(classifier, seed)
        last_step = model.steps[-1][0]  # type: ignore[attr-defined]
        weights = {f"{last_step}__sample_weight": _sample_weights(train_utts)}
        model.fit(x[train_rows], y[train_rows], **weights)  # type: ignore[attr-defined]
        x_test = x[test_rows]
        if speaker_norm and online:
            floor = median_within_speaker_std(features[train_rows], [speakers[i] for i in train_rows])
            x_test = speaker_normalise_online(features[test_rows], [speakers[i] for i in test_rows], floor, seed)
        scores = model.decision_function(x_test)  # type: ignore[attr-defined]
        # Scatter the classes the model saw into the full label order.
        full = np.full((test_rows.size, len(LABELS)), -1e9)
        full[:, model.classes_] = scores  # type: ignore[attr-defined]
        probs = softmax(full)
        y_test = y[test_rows]
        metrics = classification_metrics(y_test, probs, genders=[u.gender for u in data.test])
        if classifier != "logreg":
            metrics["ece"] = float("nan")  # SVM margins are not probabilities
        metrics.update(_restricted_uars(y_test, full))
        common = np.array([bool(u.common) for u in data.test])
        if common.any():  # ASED's two sentences read in every emotion: only the voice tells them apart
            metrics["uar_common"] = uar(y_test[common], probs.argmax(axis=1)[common])
        cm = confusion_matrix(y_test, probs.argmax(axis=1), n_classes=len(LABELS))
        held_out = sorted({u.corpus for u in data.test})
        results.append(
            {
                "fold": fold.index,
                "held_out": "+".join(held_out),
                "test_speakers": sorted(fold.test_speakers),
                "n_train": int(train_rows.size),
                "n_test": int(test_rows.size),
                **metrics,
                "confusion": cm.tolist(),
                # per test clip, for figures pooled over folds (pooled_gender_gap)
                "clips": {"label": y_test.tolist(), "predicted": probs.argmax(axis=1).tolist(),
                          "speaker": [u.speaker for u in data.test], "gender": [u.gender for u in data.test],
                          "common": common.tolist()},
            }
        )
    return results


def _restricted_uars(y_test: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """UAR with the argmax over the test clips' own classes, and 4-class UAR (neutral, happy, sad,
    angry: the classes every corpus shares), as the CNN's leave-one-corpus-out figures are scored."""
    from .mixing import FOUR_CLASSES

    present = np.unique(y_test)
    out = {"uar_own_classes": uar(y_test, present[scores[:, present].argmax(axis=1)])}
    four = np.array([LABELS.index(c) for c in FOUR_CLASSES])
    rows = np.isin(y_test, four)
    if rows.any():
        out["uar_four_class"] = uar(y_test[rows], four[scores[rows][:, four].argmax(axis=1)])
    return out


def pooled_gender_gap(results: Sequence[dict]) -> tuple[float, tuple[float, float] | None]:
    """Female-minus-male UAR over all folds' test clips pooled, and its 95 % speaker-bootstrap interval.

    A fold's 2-4 speakers per gender say little; pooled, the folds test every speaker once.
    """
    clips: dict[str, list] = {k: sum((r["clips"][k] for r in results), []) for k in ("label", "predicted", "speaker", "gender")}
    gap = gender_uar_gap(clips["label"], clips["predicted"], clips["gender"])
    return gap, gender_gap_interval(clips["label"], clips["predicted"], clips["gender"], clips["speaker"])


def run_baseline(
    data_root: Path | str,
    folds: Sequence[Fold] | None = None,
    speaker_norm: bool = False,
    cache_dir: Path | str | None = None,
    corpora: Sequence[str] = ("ravdess", "tess"),
    classifier: str = "logreg",
    seed: int = 0,
    progress: bool = False,
) -> list[dict]:
    """Scan the corpora under ``data_root``, extract (cached) features, evaluate on ``folds``.

    ``folds`` None means the six RAVDESS actor folds.
    """
    scan = scan_corpora(data_root, corpora, check_audio=True)
    features = extract_features(scan.utterances, cache_dir, progress=progress)
    return evaluate_baseline(
        scan.utterances, features, folds or ravdess_actor_folds(), speaker_norm, classifier, seed
    )


def _fold_selection(text: str, utterances: Sequence[Utterance], corpora: Sequence[str]) -> list[Fold]:
    """``--folds``: "all" or "1,3,5" (RAVDESS actor folds), "ased" (ASED's 5 speaker folds) or
    "loco" (leave one corpus out: each of ``corpora`` in turn is tested, the others train).

    An ASED fold trains on every other speaker of the scanned corpora (its
    validation speakers too: the baseline does not early-stop).
    """
    if text.strip().lower() == "loco":
        if len(corpora) < 2:
            raise DatasetError(f"--folds loco needs two corpora or more in --corpora, got {','.join(corpora)}")
        by_corpus = {c: frozenset(u.speaker for u in utterances if u.corpus == c) for c in corpora}
        everyone = frozenset(u.speaker for u in utterances)
        return [Fold(index=k + 1, test_speakers=by_corpus[c], train_speakers=everyone - by_corpus[c])
                for k, c in enumerate(corpora)]
    if text.strip().lower() == "ased":
        from .generalise import ased_folds, ased_split

        try:
            # min_val_clips 0: two validation speakers, who train here like the rest
            return [ased_split(utterances, f, min_val_clips=0) for f in ased_folds(u.speaker for u in utterances)]
        except ValueError as exc:  # no or too few ASED speakers among --corpora
            raise DatasetError(str(exc)) from None
    folds = ravdess_actor_folds()
    if text.strip().lower() in ("", "all"):
        return folds
    wanted = {int(k) for k in text.split(",") if k.strip()}
    unknown = wanted - {f.index for f in folds}
    if unknown:
        raise DatasetError(f"no RAVDESS fold {sorted(unknown)}; folds are 1..{len(folds)}")
    return [f for f in folds if f.index in wanted]


def main_from_args(args: argparse.Namespace, echo: Callable[[str], None] = print) -> int:
    """``python -m training baseline``: the figures with and without speaker normalisation.

    Reads ``args.data``, ``args.corpora`` (comma-separated), ``args.out``,
    ``args.cache`` (feature cache folder; None = ~/.cache/serstream),
    ``args.folds`` ("all" or "1,3,5"), ``args.seed`` and, when present,
    ``args.speaker_norm`` (only the speaker-normalised setting) and
    ``args.classifier`` ("logreg" or "svm"). Writes ``baseline.md``,
    ``baseline.json`` and one summed confusion PNG per setting to ``args.out``.
    Raises DatasetError for corpus problems (the CLI prints it as one line).
    """
    corpora = [c for c in str(args.corpora).split(",") if c.strip()]
    classifier = getattr(args, "classifier", None) or "logreg"
    seed = int(getattr(args, "seed", 0) or 0)
    out = Path(getattr(args, "out", None) or "runs/baseline")
    scan = scan_corpora(args.data, corpora, check_audio=True)
    echo(scan.summary())
    protocol = str(getattr(args, "folds", "all"))
    folds = _fold_selection(protocol, scan.utterances, corpora)
    features = extract_features(scan.utterances, getattr(args, "cache", None), progress=True)
    groups = str(getattr(args, "features", None) or "all")
    if groups != "all":
        features = features[:, feature_columns([g for g in groups.split("+") if g])]
    choices = [("per-utterance features", False, False), ("per-speaker normalisation", True, False)]
    if getattr(args, "speaker_norm", False):
        choices = choices[1:]
    if protocol.strip().lower() == "loco":  # a corpus nobody has heard is met one clip at a time
        choices.append(("online speaker normalisation (test clips: their speaker's clips so far)", True, True))
    settings = {
        name: evaluate_baseline(scan.utterances, features, folds, norm, classifier, seed, online=online)
        for name, norm, online in choices
    }
    out.mkdir(parents=True, exist_ok=True)
    has_common = any("uar_common" in r for results in settings.values() for r in results)
    columns = TABLE_METRICS + (("uar_common",) if has_common else ())
    key = "fold"
    if protocol.strip().lower() == "loco":  # the CNN's leave-one-corpus-out figures, one row per held-out corpus
        columns, key = ("uar_four_class", "uar_own_classes", "uar", "uar_gap", "ece"), "held_out"
    comparison = format_comparison(settings, columns)
    sections = [f"# Classical baseline ({classifier}; features: {groups})", "", comparison, ""]
    if has_common:
        sections += ["uar_common: UAR on ASED's common sentences (SS 01-02, read in every emotion) alone; "
                     "in its other sentences the words give the emotion away.", ""]
    for name, results in settings.items():
        sections += [f"## {name}", "", format_table(results, columns, key=key), ""]
        gap, interval = pooled_gender_gap(results)
        # pooled over one corpus's speakers only: across corpora it would mix TESS's two women in
        if not np.isnan(gap) and len({r["held_out"] for r in results}) == 1:
            span = f" (95 % over speakers: {100 * interval[0]:+.1f} to {100 * interval[1]:+.1f})" if interval else ""
            sections += [f"Female-minus-male UAR, all folds' test clips pooled: {100 * gap:+.1f} points{span}.", ""]
        total = np.sum([np.array(r["confusion"]) for r in results], axis=0)
        slug = "online-norm" if name.startswith("online") else "speaker-norm" if "speaker" in name else "utterance"
        plot_confusion(total, LABELS, out / f"confusion-{slug}.png", f"baseline, {name}")
    report = "\n".join(sections)
    (out / "baseline.md").write_text(report, encoding="utf-8")
    (out / "baseline.json").write_text(json.dumps(settings, indent=2), encoding="utf-8")
    echo(report)
    return 0
