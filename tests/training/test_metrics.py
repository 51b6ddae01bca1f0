"""Metrics against hand-computed examples and scikit-learn."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from training.metrics import (
    accuracy,
    ccc,
    classification_metrics,
    confusion_matrix,
    ece,
    fit_class_bias,
    fit_temperature,
    format_comparison,
    format_table,
    gender_gap_interval,
    gender_uar_gap,
    macro_f1,
    nll,
    plot_confusion,
    softmax,
    summarise,
    top_k_accuracy,
    uar,
    uar_by_gender,
)

Y_TRUE = [0, 0, 0, 0, 1, 1, 2, 2]
Y_PRED = [0, 0, 0, 1, 1, 0, 2, 1]


def test_hand_computed_small_example() -> None:
    assert accuracy(Y_TRUE, Y_PRED) == pytest.approx(5 / 8)
    # recalls: class 0 3/4, class 1 1/2, class 2 1/2
    assert uar(Y_TRUE, Y_PRED) == pytest.approx((0.75 + 0.5 + 0.5) / 3)
    cm = confusion_matrix(Y_TRUE, Y_PRED, n_classes=4)
    assert cm.tolist() == [[3, 1, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0]]
    # F1: class 0 p=3/4 r=3/4 -> .75; class 1 p=1/3 r=1/2 -> .4; class 2 p=1 r=1/2 -> 2/3
    assert macro_f1(Y_TRUE, Y_PRED) == pytest.approx((0.75 + 0.4 + 2 / 3) / 3)


def test_uar_ignores_classes_absent_from_the_truth() -> None:
    assert uar([0, 0, 1], [0, 2, 1]) == pytest.approx((0.5 + 1.0) / 2)


def test_against_sklearn() -> None:
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    y = rng.integers(0, 8, 300)
    scores = rng.normal(size=(300, 8)) + 1.5 * np.eye(8)[y]
    pred = scores.argmax(axis=1)
    assert accuracy(y, pred) == pytest.approx(sk.accuracy_score(y, pred))
    assert uar(y, pred) == pytest.approx(sk.balanced_accuracy_score(y, pred))
    assert macro_f1(y, pred) == pytest.approx(sk.f1_score(y, pred, average="macro"))
    assert top_k_accuracy(y, scores, 3) == pytest.approx(sk.top_k_accuracy_score(y, scores, k=3))
    assert (confusion_matrix(y, pred, 8) == sk.confusion_matrix(y, pred, labels=range(8))).all()


def test_top_k() -> None:
    scores = np.array([[0.1, 0.5, 0.4], [0.6, 0.3, 0.1]])
    assert top_k_accuracy([2, 2], scores, 1) == 0.0
    assert top_k_accuracy([2, 2], scores, 2) == 0.5
    assert top_k_accuracy([2, 2], scores, 3) == 1.0


def test_ccc() -> None:
    x = np.array([0.1, 0.4, -0.3, 0.8])
    assert ccc(x, x) == pytest.approx(1.0)
    centred = x - x.mean()
    assert ccc(centred, -centred) == pytest.approx(-1.0)
    # a constant offset lowers agreement though correlation stays 1
    shifted = ccc(x, x + 0.5)
    expected = 2 * x.var() / (2 * x.var() + 0.25)
    assert shifted == pytest.approx(expected)
    assert ccc([0.2, 0.2], [0.2, 0.2]) == 1.0


def test_ece_hand_example() -> None:
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    y = [0, 1, 0, 0]
    # bin of 0.9: accuracy .5, confidence .9 -> .4 * 1/2 ; bin of 0.6: accuracy 1, confidence .6 -> .4 * 1/2
    assert ece(probs, y, n_bins=10) == pytest.approx(0.4)
    perfect = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert ece(perfect, [0, 1]) == pytest.approx(0.0)


def test_fit_temperature_recovers_overconfidence() -> None:
    rng = np.random.default_rng(1)
    true_logits = rng.normal(size=(4000, 8))
    y = np.array([rng.choice(8, p=p) for p in softmax(true_logits)])
    overconfident = 3.0 * true_logits
    t = fit_temperature(overconfident, y)
    assert t == pytest.approx(3.0, rel=0.1)
    assert nll(overconfident, y, t) < nll(overconfident, y, 1.0)
    assert ece(softmax(overconfident, t), y) < ece(softmax(overconfident), y)


def test_gender_gap() -> None:
    genders = ["female"] * 4 + ["male"] * 4
    y = [0, 1, 0, 1, 0, 1, 0, 1]
    pred = [0, 1, 0, 1, 0, 0, 0, 0]  # female perfect, male recall 1 and 0
    assert uar_by_gender(y, pred, genders) == {"uar_female": 1.0, "uar_male": 0.5}
    assert gender_uar_gap(y, pred, genders) == pytest.approx(0.5)
    assert math.isnan(gender_uar_gap(y, pred, ["female"] * 8))


def _naive_gap_interval(y, pred, genders, speakers, level, n_resamples, seed):
    """The speaker bootstrap spelled out with metrics.uar, drawing the same speakers as the vectorised one."""
    y, pred, genders, speakers = map(np.asarray, (y, pred, genders, speakers))
    rng = np.random.default_rng(seed)
    per_gender = []
    for gender in ("female", "male"):
        names = np.unique(speakers[genders == gender])
        draws = rng.integers(0, len(names), size=(n_resamples, len(names)))
        values = []
        for row in draws:
            rows = np.concatenate([np.flatnonzero(speakers == names[k]) for k in row])
            values.append(uar(y[rows], pred[rows]))
        per_gender.append(np.array(values))
    tail = 100 * (1 - level) / 2
    return tuple(np.percentile(per_gender[0] - per_gender[1], [tail, 100 - tail]))


def test_gender_gap_interval_matches_a_plain_speaker_bootstrap() -> None:
    rng = np.random.default_rng(3)
    speakers, genders, y, pred = [], [], [], []
    for k in range(9):  # 4 women and 5 men of different skill, 3 classes, uneven clip counts
        n = 12 + 3 * k
        truth = rng.integers(0, 3, n)
        right = rng.random(n) < 0.3 + 0.07 * k
        speakers += [f"s{k}"] * n
        genders += ["female" if k < 4 else "male"] * n
        y += truth.tolist()
        pred += np.where(right, truth, (truth + 1) % 3).tolist()
    low, high = gender_gap_interval(y, pred, genders, speakers, level=0.9, n_resamples=300, seed=5)
    assert (low, high) == pytest.approx(_naive_gap_interval(y, pred, genders, speakers, 0.9, 300, 5))
    assert low < gender_uar_gap(y, pred, genders) < high and high - low > 0.05
    # a wider level widens it
    low95, high95 = gender_gap_interval(y, pred, genders, speakers, level=0.95, n_resamples=300, seed=5)
    assert low95 <= low and high95 >= high


def test_gender_gap_interval_edge_cases() -> None:
    # speakers alike within each gender: every resample gives the same gap
    genders = ["female"] * 8 + ["male"] * 8
    speakers = ["f1"] * 4 + ["f2"] * 4 + ["m1"] * 4 + ["m2"] * 4
    y = [0, 1, 0, 1] * 4
    pred = [0, 1, 0, 1] * 2 + [0, 0, 0, 0] * 2  # women perfect, men recall 1 and 0
    assert gender_gap_interval(y, pred, genders, speakers) == pytest.approx((0.5, 0.5))
    # one speaker of a gender (TESS): no interval
    assert gender_gap_interval(y, pred, genders, ["f1"] * 8 + ["m1"] * 4 + ["m2"] * 4) is None
    with pytest.raises(ValueError, match="15 speakers for 16 samples"):
        gender_gap_interval(y, pred, genders, speakers[:15])


def test_classification_metrics_from_probabilities() -> None:
    probs = np.eye(3)[[0, 1, 2, 0]] * 0.8 + 0.2 / 3
    result = classification_metrics([0, 1, 2, 1], probs, genders=["female", "male", "female", None])
    assert result["accuracy"] == pytest.approx(0.75)
    assert result["uar"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert result["top3_accuracy"] == 1.0
    assert result["uar_gap"] == pytest.approx(result["uar_female"] - result["uar_male"])


def test_summarise_and_tables() -> None:
    folds = [
        {"fold": 1, "uar": 0.5, "ece": 0.10, "confusion": [[1]]},
        {"fold": 2, "uar": 0.7, "ece": float("nan")},
        {"fold": 3, "uar": 0.6, "ece": 0.20},
    ]
    summary = summarise(folds)
    assert summary["uar"]["mean"] == pytest.approx(0.6)
    assert summary["uar"]["std"] == pytest.approx(0.1)
    ece_std = np.std([0.1, 0.2], ddof=1)
    assert summary["ece"] == {"mean": pytest.approx(0.15), "std": pytest.approx(ece_std), "n": 2}
    assert "confusion" not in summary
    table = format_table(folds, ["uar", "ece"])
    lines = table.splitlines()
    assert lines[0] == "| fold | uar | ece |" and len(lines) == 2 + 3 + 1
    assert lines[2] == "| 1 | 50.0 | 0.100 |"
    assert lines[-1] == "| mean ± std | 60.0 ± 10.0 | 0.150 ± 0.071 |"
    comparison = format_comparison({"plain": folds, "adapted": folds[:1]}, ["uar"])
    assert "| adapted | 50.0 ± 0.0 |" in comparison


def test_plot_confusion_writes_a_png(tmp_path: Path) -> None:
    path = plot_confusion(np.array([[3, 1], [0, 4]]), ["angry", "sad"], tmp_path / "cm.png", "fold 1")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError):
        plot_confusion(np.array([[1]]), ["angry", "sad"], tmp_path / "x.png")


def test_per_class_table_sums_the_folds_and_names_the_main_confusions() -> None:
    from serstream.contract import LABELS
    from training.cv import per_class_markdown, summed_confusion

    n = len(LABELS)
    fold_a, fold_b = np.zeros((n, n), int), np.zeros((n, n), int)
    sad, fearful, neutral = LABELS.index("sad"), LABELS.index("fearful"), LABELS.index("neutral")
    fold_a[sad, sad], fold_a[sad, fearful] = 2, 1
    fold_b[sad, sad], fold_b[sad, neutral], fold_b[neutral, neutral] = 1, 2, 4
    results = [{"fold": 1, "online": {"confusion": fold_a.tolist()}}, {"fold": 2, "online": {"confusion": fold_b.tolist()}}]
    assert summed_confusion(results, "online")[sad].sum() == 6
    table = per_class_markdown(results, "online")
    assert "| sad | 6 | 0.50 | neutral 0.33, fearful 0.17 |" in table
    assert "| neutral | 4 | 1.00 |  |" in table
    assert "| calm |" not in table  # classes without test utterances are left out


def test_fit_class_bias_removes_a_constant_offset_and_weighs_classes_equally() -> None:
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), [400, 100, 100, 100])  # class 0 four times as common
    logits = rng.normal(0, 1, (len(y), 4))
    logits[np.arange(len(y)), y] += 2.0
    shift = np.array([0.0, 0.0, 2.5, 0.0])  # every clip pushed toward class 2
    b = fit_class_bias(logits + shift, y, l2=0.0, steps=2000)
    assert b[2] - b[[0, 1, 3]].mean() == pytest.approx(-2.5, abs=0.3)
    assert b.sum() == pytest.approx(0.0, abs=1e-9)
    assert uar(y, (logits + shift + b).argmax(1)) > uar(y, (logits + shift).argmax(1)) + 0.1
    with pytest.raises(ValueError):
        fit_class_bias(logits[:, :3], y, n_classes=4)
