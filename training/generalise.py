"""Evaluations of generalisation: ASED 5-fold, leave-one-corpus-out, pooled calibration and gender gaps.

Every evaluation trains its folds with :func:`training.cv.run_cv` (so ``--workers``
runs folds in parallel processes, each fold saves ``fold-K/predictions.npz``)
and then scores the saved predictions here, without the model:

- **Class restriction.** A corpus is scored over its own classes: the argmax
  runs over the logits of the classes the corpus holds (ASED: 5, TESS: 7,
  RAVDESS: all 8), as the monitor would if it were told which labels exist.
  Leave-one-corpus-out also scores the four classes every corpus here shares
  (:data:`training.mixing.FOUR_CLASSES`): argmax over those 4 logits, on the
  clips labelled with one of them.
- **Calibration.** One temperature per run, fitted on the validation
  predictions of all folds pooled (a fold's 2 validation speakers give about
  120 clips, too few to fit on alone), each validation clip over its own
  corpus's classes; expected calibration error (ECE) is then measured on every
  fold's held-out predictions with that temperature, and on all of them pooled.
- **Calibration on a corpus nobody trained on** (leave-one-corpus-out only,
  :func:`held_out_temperatures`). The validation temperature comes from the
  training corpora and sharpens (T < 1), which makes a held-out corpus's ECE
  worse. The alternative measured here: each held-out corpus gets the
  temperature fitted on the *other* held-out corpora's test predictions (other
  models, each on a corpus it never saw), so no clip calibrates itself; the
  temperature fitted on all of them pooled is what such a recipe would ship.
- **Fairness.** Female-minus-male UAR gap per corpus, over the held-out
  predictions of all folds pooled (a corpus with one gender, TESS, has none);
  per class and gender, recall (:func:`recall_by_gender`) and where the
  misreadings go (:func:`misreadings_by_gender`), the gap per intensity
  (:func:`gender_gap_by_intensity`), and whether a
  per-gender class bias fitted on validation speakers would close the gap
  (:func:`gender_bias_check`).

Pure functions over prediction dicts (``emotion_logits``, ``label``,
``gender``, ``speaker``, ``common``) apart from :func:`load_predictions`.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from serstream.contract import LABELS

from .datasets import GENDERS, INTENSITIES
from .folds import Fold, _draw_validation, _speaker_genders
from .mixing import FOUR_CLASSES

__all__ = [
    "ased_folds",
    "ased_split",
    "calibration_and_fairness",
    "gender_bias_check",
    "gender_gap_by_intensity",
    "held_out_temperatures",
    "corpus_of",
    "load_predictions",
    "open_figures",
    "loco_splits",
    "misreadings_by_gender",
    "recall_by_gender",
    "restricted_figures",
    "select",
]

ASED_CORPUS = "ased"
#: A temperature fitted on this many clips or fewer is flagged (``temperature_fit_enough`` false):
#: one fold's 120 validation clips gave a noisy temperature in v0.3.0.
MIN_TEMPERATURE_CLIPS = 120
#: Training corpora with at least this many speakers give validation speakers in leave-one-corpus-out.
MIN_VAL_CORPUS_SPEAKERS = 6


def corpus_of(speakers: np.ndarray) -> np.ndarray:
    """Corpus name of each corpus-qualified speaker id (``"ased:09"`` -> ``"ased"``)."""
    return np.array([str(s).split(":", 1)[0] for s in speakers])


def select(pred: Mapping[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    """The prediction dict restricted to ``rows`` (a bool mask or indices)."""
    return {k: np.asarray(v)[rows] for k, v in pred.items()}


def concat(preds: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Prediction dicts stacked row-wise (keys common to all)."""
    keys = set.intersection(*(set(p) for p in preds)) if preds else set()
    return {k: np.concatenate([np.asarray(p[k]) for p in preds]) for k in sorted(keys)}


# --------------------------------------------------------------------------- splits


def ased_folds(speakers: Iterable[str], n_folds: int = 5) -> list[Fold]:
    """ASED's speakers dealt round-robin by PP number into ``n_folds`` folds (13 each for 65).

    Deterministic: with 65 speakers fold 1 holds PP 01, 06, 11, ..., 61, fold 2 PP
    02, 07, ..., 62. Not contiguous blocks: in ASED speakers 51-65 have no
    common-sentence clip and many of 02-49 have nothing else, so a block of
    PP 53-65 would leave one fold without the common-sentence figure.
    """
    ased = sorted({s for s in speakers if s.startswith(f"{ASED_CORPUS}:")}, key=lambda s: int(s.split(":")[1]))
    if len(ased) < n_folds:
        raise ValueError(f"ASED cross-validation: {len(ased)} ASED speakers cannot fill {n_folds} folds")
    return [Fold(index=k + 1, test_speakers=frozenset(ased[k::n_folds])) for k in range(n_folds)]


def ased_split(utterances: Sequence, fold: Fold, min_val_clips: int = 120, seed: int = 0) -> Fold:
    """Complete an ASED fold: validation speakers from the other ASED speakers, every other speaker trains.

    ASED speakers hold 8 to 70 judged clips each, so a fixed number of
    validation speakers can give 16 clips. Instead speakers are drawn
    alternately female and male (seeded with ``(seed, fold.index)``) until they
    hold at least ``min_val_clips`` clips (at least two speakers); at least one
    other ASED speaker must remain for training, else ValueError.
    """
    genders = _speaker_genders(utterances)
    clips = Counter(u.speaker for u in utterances)
    present = set(genders)
    test = fold.test_speakers & present
    rest = sorted(s for s in present - test if s.startswith(f"{ASED_CORPUS}:"))
    order = _alternating_order(rest, genders, np.random.default_rng([seed, fold.index]))
    val: list[str] = []
    for s in order:
        if len(val) >= 2 and sum(clips[v] for v in val) >= min_val_clips:
            break
        val.append(s)
    if not test or len(val) >= len(rest):
        raise ValueError(f"ASED fold {fold.index}: {len(test)} test and {len(rest)} other ASED speakers "
                         f"cannot give a test set, validation speakers with {min_val_clips} clips and training speakers")
    return Fold(index=fold.index, test_speakers=test, val_speakers=frozenset(val),
                train_speakers=frozenset(present - test - set(val)))


def _alternating_order(candidates: Sequence[str], genders: Mapping[str, str | None],
                       rng: np.random.Generator) -> list[str]:
    """Every candidate, shuffled within gender, then interleaved female, male, female, ... (others last)."""
    pools = {g: [s for s in candidates if genders.get(s) == g] for g in ("female", "male")}
    others = [s for s in candidates if genders.get(s) not in ("female", "male")]
    for pool in (*pools.values(), others):
        rng.shuffle(pool)
    order: list[str] = []
    turn = 0
    while pools["female"] or pools["male"]:
        gender = ("female", "male")[turn % 2]
        pool = pools[gender] or pools[("female", "male")[(turn + 1) % 2]]
        order.append(pool.pop())
        turn += 1
    return order + others


def loco_splits(utterances: Sequence, corpora: Sequence[str], n_val: int = 2, seed: int = 0) -> list[Fold]:
    """Leave-one-corpus-out: fold i holds out every speaker of ``corpora[i]``.

    Validation: ``n_val`` speakers (female, male) from each training corpus with
    at least :data:`MIN_VAL_CORPUS_SPEAKERS` speakers (RAVDESS, ASED; never one of
    TESS's two), or from the largest training corpus when none has that many;
    every other speaker of the training corpora trains. Corpora not named in
    ``corpora`` are left out of every fold.
    """
    genders = _speaker_genders(utterances)
    by_corpus: dict[str, list[str]] = {}
    for s in genders:
        by_corpus.setdefault(s.split(":", 1)[0], []).append(s)
    missing = [c for c in corpora if c not in by_corpus]
    if missing or len(corpora) < 2:
        raise ValueError(f"leave-one-corpus-out needs at least two corpora with utterances; "
                         f"missing: {', '.join(missing) or 'none'}")
    folds = []
    for i, held_out in enumerate(corpora):
        training = [c for c in corpora if c != held_out]
        donors = [c for c in training if len(by_corpus[c]) >= MIN_VAL_CORPUS_SPEAKERS]
        if not donors:
            donors = [max(training, key=lambda c: len(by_corpus[c]))]
        rng = np.random.default_rng([seed, i + 1])
        val: set[str] = set()
        for c in donors:
            if n_val >= len(by_corpus[c]):
                raise ValueError(f"leave out {held_out}: {c} has {len(by_corpus[c])} speakers, too few for "
                                 f"{n_val} validation speakers and training")
            val |= _draw_validation(sorted(by_corpus[c]), genders, n_val, rng)
        train = {s for c in training for s in by_corpus[c]} - val
        folds.append(Fold(index=i + 1, test_speakers=frozenset(by_corpus[held_out]), val_speakers=frozenset(val),
                          train_speakers=frozenset(train)))
    return folds


# --------------------------------------------------------------------------- scoring


def load_predictions(fold_dir: Path) -> dict[str, dict[str, np.ndarray]]:
    """``fold-K/predictions.npz`` as {"val": {...}, "none": {...}, "online": {...}, ...}."""
    z = np.load(Path(fold_dir) / "predictions.npz", allow_pickle=False)
    groups: dict[str, dict[str, np.ndarray]] = {}
    for key in z.files:
        prefix, name = key.split(".", 1)
        groups.setdefault(prefix, {})[name] = z[key]
    return groups


def own_class_masks(pred: Mapping[str, np.ndarray]) -> np.ndarray:
    """bool [N, C]: for each row, the classes its corpus holds among these rows' labels."""
    corpora = corpus_of(pred["speaker"])
    mask = np.zeros((len(corpora), len(LABELS)), dtype=bool)
    for name in np.unique(corpora):
        rows = corpora == name
        mask[np.ix_(rows, np.unique(pred["label"][rows]))] = True
    return mask


def _masked_softmax(logits: np.ndarray, mask: np.ndarray, temperature: float) -> np.ndarray:
    z = np.where(mask, np.asarray(logits, dtype=np.float64) / temperature, -np.inf)
    z = z - z.max(axis=1, keepdims=True)
    e = np.where(mask, np.exp(z), 0.0)
    return e / e.sum(axis=1, keepdims=True)


def fit_pooled_temperature(val_preds: Sequence[Mapping[str, np.ndarray]]) -> tuple[float, int]:
    """(temperature, clips) fitted on the pooled validation predictions, each over its corpus's classes."""
    from . import metrics as M

    pooled = concat(val_preds)
    mask = own_class_masks(pooled)
    logits = np.where(mask, pooled["emotion_logits"].astype(np.float64), -1e9)  # absent classes: no mass
    return M.fit_temperature(logits, pooled["label"]), int(len(pooled["label"]))


def restricted_figures(pred: Mapping[str, np.ndarray], classes: Sequence[int] | None = None,
                       temperature: float = 1.0, gap_interval: bool = False) -> dict:
    """UAR, accuracy, ECE (at ``temperature``), confusion and gender gap with the argmax over ``classes``.

    ``classes`` None: each row over its own corpus's classes. Otherwise only the
    rows labelled with one of ``classes`` are scored, argmax over those classes.
    ``gap_interval``: also the gap's 95 % speaker-bootstrap interval
    (:func:`training.metrics.gender_gap_interval`), where each gender has 2 speakers or more.
    """
    from . import metrics as M

    if classes is None:
        mask = own_class_masks(pred)
        rows = np.ones(len(pred["label"]), dtype=bool)
    else:
        allowed = np.zeros(len(LABELS), dtype=bool)
        allowed[list(classes)] = True
        rows = allowed[pred["label"]]
        mask = np.broadcast_to(allowed, (int(rows.sum()), len(LABELS)))
    y = pred["label"][rows]
    if len(y) == 0:
        return {"n": 0}
    probs = _masked_softmax(pred["emotion_logits"][rows], mask, temperature)
    yhat = probs.argmax(1)
    present = sorted(set(np.flatnonzero(mask.any(axis=0)).tolist()))
    g = pred["gender"][rows]
    names = np.where(g == 1, "male", np.where(g == 0, "female", "unknown"))
    out = {
        "n": int(len(y)),
        "classes": [LABELS[c] for c in present],
        "uar": round(M.uar(y, yhat), 4),
        "accuracy": round(M.accuracy(y, yhat), 4),
        "ece": round(M.ece(probs, y), 4),
        "confusion": M.confusion_matrix(y, yhat, len(LABELS))[np.ix_(present, present)].tolist(),
    }
    if {"female", "male"} <= set(names.tolist()):
        out["uar_gap_female_minus_male"] = round(float(M.gender_uar_gap(y, yhat, names)), 4)
        interval = M.gender_gap_interval(y, yhat, names, pred["speaker"][rows]) if gap_interval else None
        if interval is not None:
            out["uar_gap_interval"] = [round(v, 4) for v in interval]
    return out


def open_figures(pred: Mapping[str, np.ndarray]) -> dict:
    """What the shipped model does: argmax over all labels. UAR over the classes present, and the
    share of clips given a label outside their corpus's classes (``predicted_absent``): masked
    training never tells the model that an ASED clip is not calm, so this shows what that costs."""
    from . import metrics as M

    y, yhat = pred["label"], pred["emotion_logits"].argmax(1)
    if len(y) == 0:
        return {"n": 0}
    own = own_class_masks(pred)
    return {"n": int(len(y)), "uar": round(M.uar(y, yhat), 4), "accuracy": round(M.accuracy(y, yhat), 4),
            "predicted_absent": round(float(np.mean(~own[np.arange(len(y)), yhat])), 4)}


def calibration_and_fairness(folds: Sequence[Mapping[str, Mapping[str, np.ndarray]]], mode: str = "online") -> dict:
    """Pooled-temperature ECE per fold and pooled, and per-corpus gender gaps, for one history mode.

    ``folds``: each fold's predictions as :func:`load_predictions` returns them.
    """
    have = [f for f in folds if "val" in f and mode in f]
    if not have:
        return {}
    temperature, n_val = fit_pooled_temperature([f["val"] for f in have])
    tests = [f[mode] for f in have]
    pooled = concat(tests)
    per_fold_raw = [restricted_figures(t)["ece"] for t in tests]
    per_fold = [restricted_figures(t, temperature=temperature)["ece"] for t in tests]
    corpora = corpus_of(pooled["speaker"])
    gaps, intervals = {}, {}
    for name in sorted(set(corpora.tolist())):
        figs = restricted_figures(select(pooled, corpora == name), gap_interval=True)
        gaps[name] = figs.get("uar_gap_female_minus_male")  # None: one gender only
        intervals[name] = figs.get("uar_gap_interval")  # None: under 2 speakers of a gender (TESS)
    return {
        "mode": mode,
        "temperature": round(float(temperature), 4),
        "temperature_fitted_on": n_val,
        "temperature_fit_enough": n_val > MIN_TEMPERATURE_CLIPS,
        "ece_raw_pooled": restricted_figures(pooled)["ece"],
        "ece_pooled": restricted_figures(pooled, temperature=temperature)["ece"],
        "ece_folds": per_fold,
        "ece_raw_folds": per_fold_raw,
        "ece_mean": round(float(np.mean(per_fold)), 4),
        "uar_gap_female_minus_male": gaps,
        "uar_gap_interval_95": intervals,
    }


def held_out_temperatures(tests: Sequence[Mapping[str, np.ndarray]]) -> dict:
    """ECE of each held-out corpus at the temperature fitted on the other held-out corpora (module docstring).

    ``tests``: one prediction dict per leave-one-corpus-out fold, each on a corpus its model never
    saw. Empty with fewer than two folds (nothing else to fit on).
    """
    if len(tests) < 2:
        return {}
    folds = []
    for i, test in enumerate(tests):
        temperature, n = fit_pooled_temperature([t for j, t in enumerate(tests) if j != i])
        folds.append({"temperature": round(float(temperature), 4), "fitted_on": n,
                      "ece_raw": restricted_figures(test)["ece"],
                      "ece": restricted_figures(test, temperature=temperature)["ece"]})
    pooled_t, pooled_n = fit_pooled_temperature(list(tests))
    return {"folds": folds, "ece_mean": round(float(np.mean([f["ece"] for f in folds])), 4),
            "temperature_all": round(float(pooled_t), 4), "fitted_on_all": pooled_n}


def recall_by_gender(folds: Sequence[Mapping[str, Mapping[str, np.ndarray]]], mode: str = "online") -> dict:
    """Per gender ("female", "male"): n and recall of every class present, over all folds' test clips pooled."""
    from . import metrics as M

    tests = [f[mode] for f in folds if mode in f]
    if not tests:
        return {}
    pooled = concat(tests)
    y, yhat = pooled["label"], pooled["emotion_logits"].argmax(1)
    out = {}
    for code, name in enumerate(GENDERS):
        rows = pooled["gender"] == code
        if rows.any():
            cm = M.confusion_matrix(y[rows], yhat[rows], len(LABELS))
            out[name] = {"n": int(rows.sum()), "uar": round(M.uar(y[rows], yhat[rows]), 4),
                         "recall": {LABELS[c]: round(float(cm[c, c] / cm[c].sum()), 4)
                                    for c in range(len(LABELS)) if cm[c].sum()}}
    return out


def gender_gap_by_intensity(folds: Sequence[Mapping[str, Mapping[str, np.ndarray]]], mode: str = "online") -> dict:
    """Per intensity ("normal", "strong"): n, female and male UAR and the female-minus-male gap.

    Why: RAVDESS's gap is a question of *which* speech men are misread on; subtle (normal
    intensity) expressions may carry less of the cues the model reads. UAR is taken over the
    classes recorded at every intensity present (RAVDESS has no strong neutral), so the rows
    compare like with like. Empty unless the clips carry at least two intensities.
    """
    from . import metrics as M

    tests = [f[mode] for f in folds if mode in f and "intensity" in f[mode]]
    if not tests:
        return {}
    pooled = concat(tests)
    y, yhat, level, gender = pooled["label"], pooled["emotion_logits"].argmax(1), pooled["intensity"], pooled["gender"]
    levels = [k for k in range(len(INTENSITIES)) if (level == k).any()]  # the cache's codes; -1 unknown
    if len(levels) < 2:
        return {}
    shared = set.intersection(*(set(np.unique(y[level == k]).tolist()) for k in levels))
    out = {}
    for k in levels:
        row: dict = {"n": int(((level == k) & np.isin(y, list(shared))).sum()), "classes": len(shared)}
        for code, name in enumerate(GENDERS):
            rows = (level == k) & (gender == code) & np.isin(y, list(shared))
            row[name] = round(M.uar(y[rows], yhat[rows]), 4) if rows.any() else None
        if row.get("female") is not None and row.get("male") is not None:
            row["gap_female_minus_male"] = round(row["female"] - row["male"], 4)
        out[INTENSITIES[k]] = row
    return out


def speaker_uar_by_gender(folds: Sequence[Mapping[str, Mapping[str, np.ndarray]]], mode: str = "online") -> dict:
    """Per gender: each test speaker's UAR (over their own clips), lowest first, with the mean and median,
    and how many of the men read above the women's median (and of the women, below the men's).

    Why: a female-minus-male gap could be a few men the model misreads or all of them read a little
    worse; the pooled UAR cannot tell, the spread of speakers can.
    """
    from . import metrics as M

    tests = [f[mode] for f in folds if mode in f and "speaker" in f[mode]]
    if not tests:
        return {}
    pooled = concat(tests)
    y, yhat, speaker, gender = pooled["label"], pooled["emotion_logits"].argmax(1), pooled["speaker"], pooled["gender"]
    out: dict = {}
    for code, name in enumerate(GENDERS):
        scores = sorted((round(M.uar(y[rows], yhat[rows]), 4), str(spk))
                        for spk in np.unique(speaker[gender == code]) for rows in [(speaker == spk) & (gender == code)])
        if scores:
            values = [v for v, _ in scores]
            out[name] = {"speakers": [[spk, v] for v, spk in scores], "mean": round(float(np.mean(values)), 4),
                         "median": round(float(np.median(values)), 4)}
    if len(out) == len(GENDERS):
        female, male = out["female"], out["male"]
        male["above_female_median"] = sum(v > female["median"] for _, v in male["speakers"])
        female["below_male_median"] = sum(v < male["median"] for _, v in female["speakers"])
    return out


def misreadings_by_gender(folds: Sequence[Mapping[str, Mapping[str, np.ndarray]]], mode: str = "online",
                          top: int = 2) -> dict:
    """Per gender and true class: the ``top`` wrong labels given most often, with their share of the class's clips.

    Says where a gender's errors go (e.g. men's happy read as angry: arousal kept, valence lost),
    which a recall table alone does not.
    """
    from . import metrics as M

    tests = [f[mode] for f in folds if mode in f]
    if not tests:
        return {}
    pooled = concat(tests)
    y, yhat = pooled["label"], pooled["emotion_logits"].argmax(1)
    out: dict = {}
    for code, name in enumerate(GENDERS):
        rows = pooled["gender"] == code
        if not rows.any():
            continue
        cm = M.confusion_matrix(y[rows], yhat[rows], len(LABELS))
        per_class = {}
        for c in range(len(LABELS)):
            total = cm[c].sum()
            if not total:
                continue
            wrong = [(int(cm[c, j]), LABELS[j]) for j in range(len(LABELS)) if j != c and cm[c, j]]
            wrong.sort(key=lambda t: (-t[0], t[1]))
            per_class[LABELS[c]] = [[label, round(count / float(total), 4)] for count, label in wrong[:top]]
        out[name] = per_class
    return out


def gender_bias_check(folds: Sequence[Mapping[str, Mapping[str, np.ndarray]]], mode: str = "online") -> dict:
    """UAR and female-minus-male gap of the test clips as they are, and with a per-gender class bias added.

    Asks whether the gap is a per-gender prior (e.g. men's speech pushed toward one class), which a
    post-hoc offset per gender could remove. For each fold, the offsets of each gender are fitted
    (:func:`training.metrics.fit_class_bias`) on the other folds' validation clips of that gender,
    leaving out this fold's test speakers; a test clip gets the offsets of the gender the model
    predicts for it (what a deployed model would know). Empty without validation predictions.
    """
    from . import metrics as M

    have = [f for f in folds if "val" in f and mode in f]
    if len(have) < 2:
        return {}
    labels, plain, biased, genders = [], [], [], []
    for k, fold in enumerate(have):
        test = fold[mode]
        val = concat([f["val"] for j, f in enumerate(have) if j != k])
        unseen = ~np.isin(val["speaker"], np.unique(test["speaker"]))
        offsets = np.zeros((len(GENDERS), len(LABELS)))
        for code in range(len(GENDERS)):
            rows = unseen & (val["gender"] == code)
            if rows.any():
                offsets[code] = M.fit_class_bias(val["emotion_logits"][rows], val["label"][rows], len(LABELS))
        predicted_gender = test["gender_logits"].argmax(1)
        labels.append(test["label"])
        plain.append(test["emotion_logits"].argmax(1))
        biased.append((test["emotion_logits"] + offsets[predicted_gender]).argmax(1))
        genders.append(test["gender"])
    y, g = np.concatenate(labels), np.concatenate(genders)
    names = np.where(g == 1, "male", np.where(g == 0, "female", "unknown"))
    out = {}
    for key, yhat in (("as_is", np.concatenate(plain)), ("gender_bias", np.concatenate(biased))):
        out[key] = {"uar": round(M.uar(y, yhat), 4), "uar_gap_female_minus_male": round(M.gender_uar_gap(y, yhat, names), 4)}
    return out


def four_class_indices() -> list[int]:
    return [LABELS.index(c) for c in FOUR_CLASSES]
