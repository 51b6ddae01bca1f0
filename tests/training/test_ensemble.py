"""Averaging the test predictions of several runs (training/ensemble.py): the arithmetic and its refusals."""

from __future__ import annotations

import numpy as np
import pytest

from training.ensemble import EnsembleError, average_predictions


def _fold(logits: np.ndarray, labels: np.ndarray, val_speakers: tuple[str, ...]) -> dict:
    n = len(labels)
    rows = {"label": labels, "speaker": np.array([f"ased:{i % 3:02d}" for i in range(n)]),
            "sentence": np.zeros(n, dtype=np.int64), "gender": np.zeros(n, dtype=np.int64),
            "emotion_logits": logits.astype(np.float32), "avd": np.full((n, 3), float(logits[0, 0]), np.float32),
            "gender_logits": np.zeros((n, 2), np.float32)}
    val = {"label": np.array([0]), "speaker": np.array(list(val_speakers[:1])), "emotion_logits": np.zeros((1, 8))}
    return {"val": val, "none": rows, "online": dict(rows)}


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_averaged_rows_are_the_mean_of_the_members_probabilities() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 8, 12)
    a, b = rng.normal(size=(12, 8)) * 3, rng.normal(size=(12, 8)) * 3
    out = average_predictions([_fold(a, labels, ("ravdess:01",)), _fold(b, labels, ("ravdess:02",))])
    assert set(out) == {"none", "online"}  # validation rows differ between seeds: left out
    expected = (_softmax(a) + _softmax(b)) / 2
    np.testing.assert_allclose(_softmax(out["none"]["emotion_logits"].astype(np.float64)), expected, atol=1e-5)
    np.testing.assert_array_equal(out["online"]["label"], labels)
    np.testing.assert_allclose(out["none"]["avd"], (a[0, 0] + b[0, 0]) / 2, rtol=1e-5)
    # a confident member outvotes an unsure one row by row: not the argmax of either alone
    sure = np.full((1, 8), -5.0)
    sure[0, 2] = 5.0
    unsure = np.zeros((1, 8))
    unsure[0, 4] = 1.0
    one = average_predictions([_fold(sure, np.array([2]), ("x",)), _fold(unsure, np.array([2]), ("y",))])
    assert int(one["none"]["emotion_logits"].argmax()) == 2


def test_runs_whose_rows_are_different_clips_are_refused() -> None:
    labels = np.arange(8)
    shuffled = labels[::-1].copy()
    with pytest.raises(EnsembleError, match="not the same clips"):
        average_predictions([_fold(np.zeros((8, 8)), labels, ("a",)), _fold(np.zeros((8, 8)), shuffled, ("a",))])
    with pytest.raises(EnsembleError, match="at least two"):
        average_predictions([_fold(np.zeros((8, 8)), labels, ("a",))])
