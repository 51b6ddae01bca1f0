"""The classical baseline end to end on a synthetic corpus: features, cache, folds, above chance."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("librosa")

from serstream.contract import LABELS  # noqa: E402
from tests.training.synthcorpus import make_ased_like, make_ravdess_like, make_tess_like  # noqa: E402
from training.baseline import (  # noqa: E402
    FEATURE_GROUPS,
    FeatureConfig,
    _restricted_uars,
    feature_columns,
    main_from_args,
    pooled_gender_gap,
    run_baseline,
    speaker_normalise,
    speaker_normalise_online,
    utterance_features,
)
from training.datasets import DatasetError  # noqa: E402
from training.folds import ravdess_actor_folds  # noqa: E402
from training.metrics import gender_uar_gap, uar  # noqa: E402

CHANCE = 1 / len(LABELS)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    make_ravdess_like(root / "ravdess", actors=range(1, 9), n_per=1, seconds=0.6)
    make_tess_like(root / "tess", seconds=0.6)
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One feature cache for the module: features are extracted once."""
    return tmp_path_factory.mktemp("cache")


def test_features_are_finite_and_fixed_length() -> None:
    rng = np.random.default_rng(0)
    long = utterance_features(0.1 * rng.standard_normal(16000).astype(np.float32))
    short = utterance_features(0.1 * rng.standard_normal(300).astype(np.float32))
    assert long.shape == short.shape and long.ndim == 1
    assert np.isfinite(long).all() and np.isfinite(short).all()
    assert FeatureConfig().key() != FeatureConfig(n_mels=64).key()


def test_speaker_normalise_zscores_each_speaker() -> None:
    features = np.array([[1.0, 10.0], [3.0, 30.0], [100.0, 0.0], [300.0, 2.0]])
    out = speaker_normalise(features, ["a", "a", "b", "b"])
    assert np.allclose(out.mean(axis=0), 0.0)
    assert np.allclose(out[:2], [[-1, -1], [1, 1]], atol=1e-4)


def test_baseline_beats_chance_with_and_without_speaker_norm(corpus: Path, cache: Path) -> None:
    folds = ravdess_actor_folds()[:2]
    plain = run_baseline(corpus, folds, speaker_norm=False, cache_dir=cache)
    cache_files = list(cache.glob("baseline-features-*.npz"))
    assert len(cache_files) == 1
    stamp = cache_files[0].stat().st_mtime_ns
    adapted = run_baseline(corpus, folds, speaker_norm=True, cache_dir=cache)
    assert cache_files[0].stat().st_mtime_ns == stamp  # second run read the cache, wrote nothing
    for results in (plain, adapted):
        assert [r["fold"] for r in results] == [1, 2]
        for r in results:
            assert r["n_test"] == 4 * 8
            assert r["uar"] > 2.5 * CHANCE, r
            assert np.array(r["confusion"]).sum() == r["n_test"]
            assert 0.0 <= r["ece"] <= 1.0
    assert plain == run_baseline(corpus, folds, speaker_norm=False, cache_dir=cache)


def test_cli_entry_writes_tables_and_pngs(corpus: Path, cache: Path, tmp_path: Path) -> None:
    args = argparse.Namespace(
        data=str(corpus),
        corpora="ravdess,tess",
        out=str(tmp_path / "out"),
        cache=str(cache),
        folds="1",
        seed=0,
        speaker_norm=False,
    )
    lines: list[str] = []
    assert main_from_args(args, echo=lines.append) == 0
    out = tmp_path / "out"
    report = (out / "baseline.md").read_text()
    assert "per-speaker normalisation" in report and "per-utterance features" in report
    settings = json.loads((out / "baseline.json").read_text())
    assert set(settings) == {"per-utterance features", "per-speaker normalisation"}
    assert (out / "confusion-utterance.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "confusion-speaker-norm.png").exists()
    with pytest.raises(DatasetError, match="fold"):
        main_from_args(argparse.Namespace(**{**vars(args), "folds": "9"}), echo=lines.append)


def test_ased_speaker_folds_and_the_pooled_gender_gap(tmp_path: Path, corpus: Path, cache: Path) -> None:
    root = tmp_path / "data"
    make_ased_like(root / "ased", speakers=range(1, 21), seconds=0.6)  # odd PP female, even male
    args = argparse.Namespace(data=str(root), corpora="ased", out=str(tmp_path / "out"), cache=str(cache),
                              folds="ased", seed=0, speaker_norm=True)
    lines: list[str] = []
    assert main_from_args(args, echo=lines.append) == 0
    results = json.loads((tmp_path / "out" / "baseline.json").read_text())["per-speaker normalisation"]
    # PP dealt round-robin: fold 1 tests 01, 06, 11, 16; every speaker is tested once
    assert results[0]["test_speakers"] == ["ased:01", "ased:06", "ased:11", "ased:16"]
    assert sorted(s for r in results for s in r["test_speakers"]) == sorted(f"ased:{k:02d}" for k in range(1, 21))
    assert all(r["n_test"] == 4 * 5 * 2 for r in results)
    # sentences 1 (common) and 3 (not): the common-sentence UAR is over half of each fold's clips
    first = results[0]["clips"]
    assert sum(first["common"]) == 20
    common = [(y, p) for y, p, c in zip(first["label"], first["predicted"], first["common"]) if c]
    assert results[0]["uar_common"] == pytest.approx(uar(*map(list, zip(*common))))
    assert "| ece | uar_common |" in (tmp_path / "out" / "baseline.md").read_text()
    gap, interval = pooled_gender_gap(results)
    clips = [c for r in results for c in zip(r["clips"]["label"], r["clips"]["predicted"], r["clips"]["gender"])]
    assert len(clips) == 200
    assert gap == pytest.approx(gender_uar_gap(*map(list, zip(*clips))))
    assert interval is not None and interval[0] <= gap <= interval[1]
    report = (tmp_path / "out" / "baseline.md").read_text()
    assert f"Female-minus-male UAR, all folds' test clips pooled: {100 * gap:+.1f} points (95 % over speakers:" in report
    # ASED folds need ASED speakers: one line, no traceback
    with pytest.raises(DatasetError, match="0 ASED speakers cannot fill 5 folds"):
        main_from_args(argparse.Namespace(**{**vars(args), "data": str(corpus), "corpora": "ravdess"}),
                       echo=lines.append)


def test_restricted_uars_take_the_argmax_over_the_allowed_classes() -> None:
    idx = {c: LABELS.index(c) for c in ("neutral", "calm", "happy", "sad", "fearful")}
    y = np.array([idx["neutral"], idx["happy"], idx["sad"], idx["fearful"]])
    scores = np.full((4, len(LABELS)), -5.0)
    scores[0, [idx["calm"], idx["neutral"]]] = [3.0, 1.0]  # calm wins overall; not a class of these clips
    scores[1, [idx["fearful"], idx["happy"]]] = [3.0, 1.0]  # fearful is theirs: wrong over own classes,
    scores[2, idx["sad"]] = 2.0  # right over the four shared classes
    scores[3, idx["fearful"]] = 2.0
    figures = _restricted_uars(y, scores)
    # own classes (neutral, happy, sad, fearful): neutral right, happy -> fearful, sad right, fearful right
    assert figures["uar_own_classes"] == pytest.approx(3 / 4)
    # four shared classes: rows 0-2 (fearful is not one), all right
    assert figures["uar_four_class"] == pytest.approx(1.0)


def test_leave_one_corpus_out_protocol(corpus: Path, cache: Path, tmp_path: Path) -> None:
    args = argparse.Namespace(data=str(corpus), corpora="ravdess,tess", out=str(tmp_path / "out"), cache=str(cache),
                              folds="loco", seed=0, speaker_norm=True)
    lines: list[str] = []
    assert main_from_args(args, echo=lines.append) == 0
    results = json.loads((tmp_path / "out" / "baseline.json").read_text())["per-speaker normalisation"]
    assert [r["held_out"] for r in results] == ["ravdess", "tess"]
    settings = json.loads((tmp_path / "out" / "baseline.json").read_text())
    assert len(settings) == 2 and list(settings)[1].startswith("online speaker normalisation")
    # --features: one slice of the vector
    sliced = argparse.Namespace(**{**vars(args), "out": str(tmp_path / "sliced"), "features": "mfcc_mean+prosody"})
    assert main_from_args(sliced, echo=lines.append) == 0
    assert "features: mfcc_mean+prosody" in (tmp_path / "sliced" / "baseline.md").read_text()
    assert [r["n_test"] for r in results] == [8 * 8, 28]  # 8 actors x 8 emotions; TESS: 2 speakers x 7 x 2 words
    assert all(r["test_speakers"] == sorted({s for s in r["clips"]["speaker"]}) for r in results)
    assert results[0]["n_train"] == 28 and results[1]["n_train"] == 64
    assert all(0.0 <= r["uar_four_class"] <= 1.0 for r in results)
    report = (tmp_path / "out" / "baseline.md").read_text()
    assert "| held_out | uar_four_class | uar_own_classes |" in report and "| tess |" in report
    assert "all folds' test clips pooled" not in report  # a gap pooled across corpora would mean nothing
    with pytest.raises(DatasetError, match="needs two corpora"):
        main_from_args(argparse.Namespace(**{**vars(args), "corpora": "ravdess"}), echo=lines.append)


def test_online_normalisation_uses_only_the_clips_heard_so_far() -> None:
    rng = np.random.default_rng(1)
    features = rng.standard_normal((12, 3)) * [1.0, 5.0, 0.1] + [0.0, 10.0, -3.0]
    speakers = ["a"] * 5 + ["b"] * 7
    out = speaker_normalise_online(features, speakers, floor=np.full(3, 1e-9), seed=4)
    full = speaker_normalise(features, speakers)
    for name in ("a", "b"):
        rows = np.flatnonzero(np.asarray(speakers) == name)
        first = [r for r in rows if np.allclose(out[r], 0.0)]
        assert len(first) == 1  # a speaker's first clip is compared with itself only
        # the clip heard last is normalised by all its speaker's clips, as the offline normalisation
        assert sum(np.allclose(out[r], full[r], atol=1e-4) for r in rows) >= 1
    floored = speaker_normalise_online(features, speakers, floor=np.full(3, 100.0), seed=4)
    assert np.abs(floored).max() < np.abs(features - features.mean(0)).max() / 100 + 1e-9


def test_feature_groups_slice_the_feature_vector() -> None:
    width = utterance_features(np.zeros(16000, dtype=np.float32)).size
    assert sorted(feature_columns(["mfcc", "dmfcc", "melmean", "melstd", "prosody"]).tolist()) == list(range(width))
    assert feature_columns(["mfcc_mean"]).tolist() == list(range(0, 100, 5))
    assert set(feature_columns(["mfcc_mean", "mfcc_std"])) <= set(feature_columns(["mfcc"]))
    assert set(FEATURE_GROUPS) >= {"mfcc_std", "prosody"}
    with pytest.raises(DatasetError, match="unknown feature group"):
        feature_columns(["pitch"])
    with pytest.raises(DatasetError, match="no feature group named"):
        feature_columns([])


@pytest.mark.parametrize("flag", [["--epochs", "3"], ["--speaker-window-stats"], ["--cepstral-stats", "20"]])
def test_baseline_rejects_the_networks_training_flags(flag, tmp_path, capsys) -> None:
    """The linear baseline trains no network: a flag it would ignore is argparse's one-line error instead."""
    from training.__main__ import main

    with pytest.raises(SystemExit) as exited:
        main(["baseline", "--data", str(tmp_path), *flag])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"unrecognized arguments: {' '.join(flag)}" in err and "Traceback" not in err
