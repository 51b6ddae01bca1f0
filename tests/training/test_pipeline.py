"""The whole training path on a tiny synthetic corpus: read, cache, augment, train,
evaluate, export to ONNX with the parity check, and run the export in `serstream analyze`.

The corpus, the trained model and its export are session fixtures in conftest.py."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
sf = pytest.importorskip("soundfile")

from serstream.contract import LABELS, ModelInfo  # noqa: E402
from serstream.inference.session import EmotionModel  # noqa: E402
from training.cv import MODES, fold_metrics  # noqa: E402
from training.train import predict, train_model  # noqa: E402

SR = 16_000


def test_cache_holds_every_file_trimmed(trained) -> None:
    corpus, *_ = trained
    assert len(corpus) == 8 * 8 * 2 + 2 * 3 * 2
    assert set(np.unique(corpus.corpus)) == {"ravdess", "tess"}
    assert all(0 < corpus.offsets[i + 1] - corpus.offsets[i] <= int(0.9 * SR) for i in range(len(corpus)))


def test_training_records_history_and_checkpoint(trained) -> None:
    _, result, _, out, config, _ = trained
    assert len(result.history) == config.epochs
    assert all(np.isfinite(h["loss_emotion"]) for h in result.history)
    assert 0.0 <= result.best_val_uar <= 1.0
    assert (out / "checkpoint.pt").exists()


def test_resume_continues_from_the_checkpoint(trained) -> None:
    corpus, result, test, out, config, _ = trained
    longer = replace(config, epochs=config.epochs + 1)
    val = corpus.indices(["ravdess:03", "ravdess:04"])
    train = np.setdiff1d(np.arange(len(corpus)), np.concatenate([test, val]))
    resumed = train_model(corpus, train, val, longer, out, progress=False)
    assert [h["epoch"] for h in resumed.history] == list(range(config.epochs + 1))


def test_evaluation_modes_and_figures(trained) -> None:
    corpus, result, test, *_ = trained
    for mode in MODES:
        pred = predict(result.model, corpus, test, mode=mode)
        assert pred["emotion_logits"].shape == (len(test), len(LABELS))
        figures = fold_metrics(pred, temperature=1.0)
        assert 0.0 <= figures["uar"] <= 1.0 and figures["n"] == len(test)
        assert np.asarray(figures["confusion"]).sum() == len(test)
    with pytest.raises(ValueError):
        predict(result.model, corpus, test, mode="oracle")


def test_export_parity_and_analyze(trained, exported) -> None:
    corpus, result, test, _, _, root = trained
    path = exported  # export_onnx (with its parity check) ran in the fixture
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["labels"] == list(LABELS) and sidecar["temperature"] == 1.7
    model = EmotionModel.load(path)
    assert isinstance(model.info, ModelInfo) and model.info.state_inputs[0].name == "speaker_stats"
    audio = np.stack([corpus.clip(int(test[0]))[:8000], corpus.clip(int(test[1]))[:8000]])
    out = model.infer(audio, np.array([8000, 6000]))
    np.testing.assert_allclose(out.probs.sum(axis=1), 1.0, atol=1e-5)
    files = sorted((root / "ravdess" / "Actor_01").glob("*.wav"))[:2]
    proc = subprocess.run([sys.executable, "-m", "serstream", "analyze", "--model", str(path), *map(str, files)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    summaries = [e for e in lines if e["type"] == "file"]
    assert len(summaries) == 2
    assert all(abs(sum(s["probs"].values()) - 1.0) < 1e-3 for s in summaries if s["label"] is not None)


def test_voice_augmentation_changes_training_and_stays_finite(trained, tmp_path) -> None:
    corpus, _, test, _, config, _ = trained
    val = corpus.indices(["ravdess:03", "ravdess:04"])
    train = np.setdiff1d(np.arange(len(corpus)), np.concatenate([test, val]))
    short = replace(config, epochs=1, steps_per_epoch=2)
    plain = train_model(corpus, train, val, short, tmp_path / "plain", progress=False)
    voiced = train_model(corpus, train, val, replace(short, pitch_prob=1.0, stretch_prob=1.0), tmp_path / "voiced",
                         progress=False)
    assert np.isfinite(voiced.history[0]["loss_emotion"])
    # Same seed, so only the pitch and tempo changes can make the losses differ.
    assert voiced.history[0]["loss_emotion"] != plain.history[0]["loss_emotion"]


def test_select_last_runs_every_epoch_and_returns_the_last_weight_average(trained, tmp_path) -> None:
    import torch

    corpus, _, test, _, config, _ = trained
    val = corpus.indices(["ravdess:03", "ravdess:04"])
    train = np.setdiff1d(np.arange(len(corpus)), np.concatenate([test, val]))
    # patience 0 would stop "best" after its first epoch; "last" ignores it and runs all three
    last = replace(config, epochs=3, patience=0, select="last")
    result = train_model(corpus, train, val, last, tmp_path / "last", progress=False)
    assert [h["epoch"] for h in result.history] == [0, 1, 2]
    assert all("val_uar" in h for h in result.history)  # validation is still measured
    assert result.best_epoch == 2 and result.best_val_uar == result.history[-1]["val_uar"]
    average = torch.load(tmp_path / "last" / "checkpoint.pt", weights_only=False)["average"]["model"]
    returned = result.model.state_dict()
    assert all(torch.equal(returned[k], v) for k, v in average.items())
    best = train_model(corpus, train, val, replace(last, select="best"), tmp_path / "best", progress=False)
    assert len(best.history) == 1  # early stopping as before
    with pytest.raises(ValueError, match="unknown weight selection"):
        train_model(corpus, train, val, replace(last, select="median"), tmp_path / "bad", progress=False)
