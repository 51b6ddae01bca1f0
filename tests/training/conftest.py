"""Session fixtures of the training tests: a tiny synthetic RAVDESS+TESS corpus,
a tiny model trained on it for a few steps, and that model exported to ONNX.

Trained once per session: test_pipeline, test_tta and test_onnxeval share them.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from serstream.contract import LABELS

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
    """8 RAVDESS-named actors x 8 emotions x 2 takes; 2 TESS speakers x 3 emotions x 2 words."""
    import soundfile as sf

    rng = np.random.default_rng(0)
    for actor in range(1, 9):
        folder = root / "ravdess" / f"Actor_{actor:02d}"
        folder.mkdir(parents=True)
        base = 120.0 if actor % 2 else 210.0
        for code in EMOTION_CODES.values():
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


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """(corpus, TrainResult, test indices (actors 1-2), run folder, TrainConfig, corpus root)."""
    pytest.importorskip("torch")
    from training.cache import build_cache
    from training.datasets import scan_corpora
    from training.model import ModelConfig
    from training.train import TrainConfig, train_model

    root = make_corpus(tmp_path_factory.mktemp("corpus"))
    scan = scan_corpora(root, ("ravdess", "tess"))
    corpus = build_cache(scan.utterances, root, tmp_path_factory.mktemp("cache"), progress=False)
    tiny = ModelConfig(cnn_channels=(8, 8, 16, 16), embed_dim=32, attention_dim=16)
    config = replace(TrainConfig(), epochs=2, steps_per_epoch=3, speakers_per_batch=2, per_speaker=4, crop_s=0.8,
                     threads=1, model=tiny, patience=5)
    test = corpus.indices([f"ravdess:{a:02d}" for a in (1, 2)])
    val = corpus.indices(["ravdess:03", "ravdess:04"])
    train = np.setdiff1d(np.arange(len(corpus)), np.concatenate([test, val]))
    out = tmp_path_factory.mktemp("run")
    result = train_model(corpus, train, val, config, out, progress=False)
    return corpus, result, test, out, config, root


@pytest.fixture(scope="session")
def exported(trained, tmp_path_factory) -> Path:
    """The trained model as ONNX (temperature 1.7, version "test"); export_onnx checks parity."""
    pytest.importorskip("onnxruntime")
    from training.export import export_onnx

    _, result, *_ = trained
    return export_onnx(result.model, tmp_path_factory.mktemp("onnx") / "tiny.onnx", temperature=1.7, version="test",
                       extra={"training_data": "synthetic"})
