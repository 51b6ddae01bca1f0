"""The whole training path on a tiny synthetic corpus: read, cache, augment, train,
evaluate, export to ONNX with the parity check, and run the export in `serstream analyze`."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
sf = pytest.importorskip("soundfile")

from serstream.contract import LABELS, ModelInfo  # noqa: E402
from serstream.inference.session import EmotionModel  # noqa: E402
from training.cache import build_cache  # noqa: E402
from training.cv import MODES, fold_metrics  # noqa: E402
from training.datasets import scan_corpora  # noqa: E402
from training.export import export_onnx  # noqa: E402
from training.model import ModelConfig  # noqa: E402
from training.train import TrainConfig, predict, train_model  # noqa: E402

SR = 16_000
EMOTION_CODES = {label: i + 1 for i, label in enumerate(LABELS)}


def voiced(f0: float, seconds: float, amp: float, rng: np.random.Generator) -> np.ndarray:
    """A harmonic vowel-like sound with a little vibrato and noise: class-dependent pitch and level."""
    t = np.arange(int(seconds * SR)) / SR
    phase = 2 * np.pi * np.cumsum(f0 * (1 + 0.02 * np.sin(2 * np.pi * 5 * t))) / SR
    sig = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = np.minimum(1, np.minimum(t, t[-1] - t) / 0.05)
    return (amp * sig * envelope + 0.002 * rng.standard_normal(len(t))).astype(np.float32)


def make_corpus(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for actor in range(1, 9):
        folder = root / "ravdess" / f"Actor_{actor:02d}"
        folder.mkdir(parents=True)
        base = 120.0 if actor % 2 else 210.0
        for label, code in EMOTION_CODES.items():
            for rep in (1, 2):
                f0 = base * (1 + 0.12 * code)
                amp = 0.02 * (1 + code)
                name = f"03-01-{code:02d}-01-01-{rep:02d}-{actor:02d}.wav"
                sf.write(folder / name, voiced(f0, 0.9, amp, rng), SR)
    for speaker in ("OAF", "YAF"):
        for label in ("angry", "sad", "neutral"):
            folder = root / "tess" / f"{speaker}_{label}"
            folder.mkdir(parents=True)
            for word in ("back", "bar"):
                sf.write(folder / f"{speaker}_{word}_{label}.wav", voiced(230.0, 0.7, 0.1, rng), SR)
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = make_corpus(tmp_path_factory.mktemp("corpus"))
    scan = scan_corpora(root, ("ravdess", "tess"))
    corpus = build_cache(scan.utterances, root, tmp_path_factory.mktemp("cache"), progress=False)
    tiny = ModelConfig(stem_channels=8, channels=(16, 16, 32, 32), embed_dim=32, attention_dim=16)
    config = replace(TrainConfig(), epochs=2, steps_per_epoch=3, speakers_per_batch=2, per_speaker=4, crop_s=0.8,
                     threads=1, model=tiny, patience=5)
    test = corpus.indices([f"ravdess:{a:02d}" for a in (1, 2)])
    val = corpus.indices(["ravdess:03", "ravdess:04"])
    train = np.setdiff1d(np.arange(len(corpus)), np.concatenate([test, val]))
    out = tmp_path_factory.mktemp("run")
    result = train_model(corpus, train, val, config, out, progress=False)
    return corpus, result, test, out, config, root


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


def test_export_parity_and_analyze(trained, tmp_path) -> None:
    corpus, result, test, _, _, root = trained
    path = export_onnx(result.model, tmp_path / "tiny.onnx", temperature=1.7, version="test",
                       extra={"training_data": "synthetic"})
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
