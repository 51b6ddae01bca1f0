"""The cross-corpus check (train on RAVDESS alone, test on TESS) through the CLI, its report and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from serstream.contract import LABELS  # noqa: E402
from tests.training.synthcorpus import make_ravdess_like, make_tess_like  # noqa: E402
from training.__main__ import main  # noqa: E402
from training.cv import MODES, TTA_MODE  # noqa: E402

ACTORS = tuple(range(1, 7))
TINY_RUN = ["--epochs", "1", "--steps-per-epoch", "2", "--crop-s", "0.5", "--threads", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    make_ravdess_like(root / "ravdess", actors=ACTORS, n_per=1, seconds=0.6)
    make_tess_like(root / "tess", words=("back",), seconds=0.6)
    return root


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    return err[-1]


def test_crosscorpus_scores_tess_on_its_classes_and_reports(data, tmp_path, capsys) -> None:
    out = tmp_path / "cross"
    rc = main(["crosscorpus", "--data", str(data), "--out", str(out), "--cache", str(tmp_path / "cache"), *TINY_RUN, "--tta"])
    assert rc == 0
    figures = json.loads((out / "crosscorpus.json").read_text())
    ravdess = {f"ravdess:{a:02d}" for a in ACTORS}
    assert set(figures["train_speakers"]) | set(figures["val_speakers"]) == ravdess
    assert len(figures["val_speakers"]) == 2 and not set(figures["train_speakers"]) & set(figures["val_speakers"])
    assert figures["test_speakers"] == ["tess:OAF", "tess:YAF"]
    assert figures["classes_scored"] == [name for name in LABELS if name != "calm"]
    assert figures["classes_absent"] == ["calm"] and "7 classes" in figures["scoring"]
    n_tess = 2 * 7
    for mode in (*MODES, TTA_MODE):
        row = figures[mode]
        assert row["n"] == n_tess and row["classes_present"] == figures["classes_scored"]
        cm = np.asarray(row["confusion"])
        assert cm.sum() == n_tess and cm[LABELS.index("calm")].sum() == 0
        assert row["predicted_absent"] == round(cm[:, LABELS.index("calm")].sum() / n_tess, 4)
        present = [LABELS.index(c) for c in row["classes_present"]]
        recall = [cm[c, c] / cm[c].sum() for c in present]
        assert row["uar"] == pytest.approx(np.mean(recall), abs=1e-4)  # mean over the 7, not 8
        assert {"accuracy", "macro_f1", "top3", "ece_calibrated", "ccc_arousal", "gender_accuracy"} <= set(row)
    assert (out / "config.json").is_file() and (out / "crosscorpus" / "model.pt").is_file()
    capsys.readouterr()

    assert main(["report", "--cv", str(out)]) == 0  # no folds there: the cross-corpus table alone
    printed = capsys.readouterr().out
    assert "Cross-corpus: trained on ravdess (6 speakers" in printed and "tested on tess" in printed
    for mode in (*MODES, TTA_MODE):
        assert f"| {mode} | {n_tess} |" in printed
    assert main(["report", "--crosscorpus", str(out / "crosscorpus.json")]) == 0
    assert "Cross-corpus" in capsys.readouterr().out
    assert main(["report", "--crosscorpus", str(tmp_path)]) == 2
    assert "no crosscorpus.json" in _error_line(capsys)


@pytest.mark.parametrize("case, message", [
    ("no-tess", "tess: expected its files in"),
    ("no-ravdess", "ravdess: expected its files in"),
    ("test-on-ravdess", "--test-corpus must name another corpus"),
    ("two-actors", "cannot give 2 validation speakers and a training set"),
    ("no-data", "does not exist"),
])
def test_crosscorpus_bad_input_is_one_line(case, message, data, tmp_path, capsys) -> None:
    root = tmp_path / "partial"
    if case == "no-tess":
        make_ravdess_like(root / "ravdess", actors=(1, 2, 3), emotions=("neutral",), n_per=1, seconds=0.3)
    elif case == "no-ravdess":
        make_tess_like(root / "tess", emotions=("angry",), words=("back",), seconds=0.3)
    elif case == "test-on-ravdess":
        root = data
    elif case == "two-actors":
        make_ravdess_like(root / "ravdess", actors=(1, 2), emotions=("neutral",), n_per=1, seconds=0.3)
        make_tess_like(root / "tess", emotions=("angry",), words=("back",), seconds=0.3)
    args = ["crosscorpus", "--data", str(root), "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache"), *TINY_RUN]
    if case == "test-on-ravdess":
        args += ["--test-corpus", "ravdess"]
    assert main(args) == 2
    line = _error_line(capsys)
    assert line.startswith("training: error:") and message in line
    assert not (tmp_path / "out" / "crosscorpus.json").exists()
