"""Test-time augmentation: the variants, their mean in predict, and the online_tta mode of a CV fold."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from training.cv import MODES, TTA_MODE, collect, markdown_report, rescore_fold, run_fold, summarise  # noqa: E402
from training.folds import Fold  # noqa: E402
from training.train import TTA_MIN_S, TTA_VARIANTS, TtaVariant, predict, tta_view  # noqa: E402


def test_tta_views_shift_crop_and_scale() -> None:
    audio = np.linspace(-0.6, 0.6, 16_000, dtype=np.float32)
    assert tta_view(audio, TtaVariant()) is audio
    shifted = tta_view(audio, TtaVariant(shift_s=0.005))
    np.testing.assert_array_equal(shifted, audio[80:])
    cropped = tta_view(audio, TtaVariant(keep=0.9))
    assert len(cropped) == 14_400
    np.testing.assert_array_equal(cropped, audio[800:15_200])  # the centre
    louder = tta_view(audio, TtaVariant(gain_db=6.0))
    assert louder.dtype == np.float32 and float(np.abs(louder).max()) == 1.0  # 0.6 x 2 clips at full scale
    np.testing.assert_allclose(louder[7_000:9_000], 10 ** 0.3 * audio[7_000:9_000], rtol=1e-6)
    quieter = tta_view(audio, TtaVariant(gain_db=-6.0))
    np.testing.assert_allclose(quieter, 10 ** -0.3 * audio, rtol=1e-6)
    shortest = int(TTA_MIN_S * 16_000)
    short = audio[:shortest]
    assert len(tta_view(short, TtaVariant(shift_s=0.005))) == shortest  # never cut below the shortest window
    assert len(tta_view(short, TtaVariant(keep=0.9))) == shortest
    assert len(tta_view(audio[: shortest + 4_000], TtaVariant(keep=0.5))) == shortest
    assert len(set(TTA_VARIANTS)) == len(TTA_VARIANTS) and TTA_VARIANTS[0] == TtaVariant()


def test_predict_tta_is_the_mean_of_its_variants(trained) -> None:
    corpus, result, test, *_ = trained
    plain = predict(result.model, corpus, test, mode="online")
    np.testing.assert_array_equal(predict(result.model, corpus, test, mode="online", tta=[TtaVariant()])["emotion_logits"],
                                  plain["emotion_logits"])
    both = predict(result.model, corpus, test, mode="online", tta=True)
    again = predict(result.model, corpus, test, mode="online", tta=True)
    for key in ("emotion_logits", "avd", "gender_logits"):
        np.testing.assert_array_equal(both[key], again[key])  # deterministic
        parts = [predict(result.model, corpus, test, mode="online", tta=[v])[key] for v in TTA_VARIANTS]
        np.testing.assert_allclose(both[key], np.mean(parts, axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(both["label"], plain["label"])
    # Without history, per-utterance normalisation all but cancels a level change;
    # with history the speaker was heard at the plain level, so +6 dB shows.
    def gain_effect(mode: str) -> float:
        base = predict(result.model, corpus, test, mode=mode)["emotion_logits"]
        louder = predict(result.model, corpus, test, mode=mode, tta=[TtaVariant(gain_db=6.0)])["emotion_logits"]
        return float(np.abs(louder - base).max())

    assert gain_effect("online") > 10 * gain_effect("none") > 0


def _strip_tta(npz_path) -> None:
    """Rewrite a predictions.npz as a run from before TTA would have written it."""
    z = np.load(npz_path, allow_pickle=False)
    kept = {k: z[k] for k in z.files if not k.startswith((TTA_MODE + ".", "val_tta."))}
    np.savez(npz_path, **kept)


def test_fold_with_tta_reports_and_rescores_it(trained, tmp_path) -> None:
    corpus, _, _, _, config, _ = trained
    speakers = set(map(str, np.unique(corpus.speaker)))
    test, val = {"ravdess:01", "ravdess:02"}, {"ravdess:03", "ravdess:04"}
    split = Fold(index=1, test_speakers=test, val_speakers=val, train_speakers=speakers - test - val)
    figures = run_fold(corpus, split, replace(config, epochs=1), tmp_path, tta=True)
    assert set(MODES) | {TTA_MODE} <= set(figures) and "temperature_tta" in figures
    assert figures[TTA_MODE]["n"] == figures["online"]["n"] == len(corpus.indices(test))
    saved = json.loads((tmp_path / "fold-1.json").read_text())
    assert saved[TTA_MODE] == figures[TTA_MODE]
    z = np.load(tmp_path / "fold-1" / "predictions.npz")
    assert {f"{TTA_MODE}.emotion_logits", "val_tta.emotion_logits"} <= set(z.files)
    rescored = rescore_fold(tmp_path / "fold-1")
    for mode in (*MODES, TTA_MODE):
        assert rescored[mode] == figures[mode]
    assert rescored["temperature_tta"] == figures["temperature_tta"]

    # A fold from before TTA: its predictions lack the mode, and so do its figures.
    old = tmp_path / "fold-2"
    old.mkdir()
    (old / "predictions.npz").write_bytes((tmp_path / "fold-1" / "predictions.npz").read_bytes())
    _strip_tta(old / "predictions.npz")
    results = collect(tmp_path)
    by_fold = {r["fold"]: r for r in results}
    assert TTA_MODE in by_fold[1] and TTA_MODE not in by_fold[2] and "temperature_tta" not in by_fold[2]
    assert by_fold[2]["online"] == figures["online"]

    summary = summarise(results)
    assert summary[TTA_MODE]["uar"]["folds"] == [figures[TTA_MODE]["uar"]]
    assert len(summary["online"]["uar"]["folds"]) == 2
    report = markdown_report(results)
    assert f"**Speaker history: {TTA_MODE}**" in report
    assert f"| {TTA_MODE} | 1 |" in report and "| online | 2 |" in report
    old_only = markdown_report([by_fold[2]])
    assert TTA_MODE not in old_only and TTA_MODE not in summarise([by_fold[2]])


def test_add_tta_rescores_a_finished_run_from_its_weights(trained, tmp_path) -> None:
    from training.cv import add_tta

    corpus, _, _, _, config, _ = trained
    speakers = set(map(str, np.unique(corpus.speaker)))
    test, val = {"ravdess:01", "ravdess:02"}, {"ravdess:03", "ravdess:04"}
    split = Fold(index=1, test_speakers=test, val_speakers=val, train_speakers=speakers - test - val)
    config = replace(config, epochs=1)
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    plain = run_fold(corpus, split, config, tmp_path, tta=False)
    assert TTA_MODE not in plain
    [added] = add_tta(corpus, tmp_path)
    saved = json.loads((tmp_path / "fold-1.json").read_text())
    assert saved == added and saved["history"] == plain["history"]
    for mode in MODES:  # the same weights give the same plain figures
        assert saved[mode] == plain[mode]
    assert saved[TTA_MODE]["n"] == plain["online"]["n"] and "temperature_tta" in saved
