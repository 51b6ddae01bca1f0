"""Leave-one-corpus-out, ASED 5-fold, report --compare and export, end to end on three tiny
synthetic corpora with different label sets (RAVDESS-like 8 classes, TESS-like 7, ASED-like 5)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from serstream.contract import LABELS  # noqa: E402
from tests.training.synthcorpus import make_ased_like, make_ravdess_like, make_tess_like  # noqa: E402
from training.__main__ import main  # noqa: E402
from training.generalise import (  # noqa: E402
    gender_bias_check,
    gender_gap_by_intensity,
    held_out_temperatures,
    load_predictions,
    misreadings_by_gender,
    recall_by_gender,
    restricted_figures,
    speaker_uar_by_gender,
)
from training.mixing import FOUR_CLASSES  # noqa: E402

TINY = ["--epochs", "1", "--steps-per-epoch", "2", "--crop-s", "0.5", "--threads", "1"]
OWN = {
    "ravdess": list(LABELS),
    "tess": [c for c in LABELS if c != "calm"],
    "ased": ["neutral", "happy", "sad", "angry", "fearful"],
}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    make_ravdess_like(root / "ravdess", actors=range(1, 7), n_per=1, seconds=0.6)
    make_tess_like(root / "tess", words=("back",), seconds=0.6)
    make_ased_like(root / "ased", speakers=range(1, 7), sentences=(1, 3), seconds=0.6)
    return root


@pytest.fixture(scope="module")
def loco_run(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("loco")
    rc = main(["loco", "--data", str(data), "--out", str(out), "--cache", str(data / "cache"), *TINY, "--workers", "2"])
    assert rc == 0
    return out


def _recall_mean(cm) -> float:
    cm = np.asarray(cm)
    return float(np.mean([cm[i, i] / cm[i].sum() for i in range(len(cm)) if cm[i].sum()]))


def test_loco_holds_out_each_corpus_and_scores_four_and_own_classes(loco_run) -> None:
    results = json.loads((loco_run / "loco.json").read_text())
    splits = json.loads((loco_run / "splits.json").read_text())
    assert results["complete"] and list(results["held_out"]) == ["ravdess", "tess", "ased"]
    assert results["config"]["mask_loss"] is True and results["config"]["sampling"] == "v0.3"
    assert results["config"]["other_corpus_pick"] == "corpus" and results["config"]["select"] == "last"
    four = [LABELS.index(c) for c in FOUR_CLASSES]
    for corpus, row in results["held_out"].items():
        fold = json.loads((loco_run / f"fold-{row['fold']}.json").read_text())
        assert {s.split(":")[0] for s in fold["test_speakers"]} == {corpus}
        trained = {s.split(":")[0] for s in fold["val_speakers"]}
        assert corpus not in trained and "tess" not in trained  # TESS's two speakers never validate
        assert len(fold["val_speakers"]) == 2 * len(trained) == len(splits[corpus]["val_speakers"])
        preds = load_predictions(loco_run / f"fold-{row['fold']}")
        for mode in ("none", "online"):
            p = preds[mode]
            f4, own = row[mode]["four_class"], row[mode]["own_classes"]
            assert f4["classes"] == [c for c in LABELS if c in FOUR_CLASSES]
            assert f4["n"] == int(np.isin(p["label"], four).sum())
            assert sorted(own["classes"]) == sorted(OWN[corpus]) and own["n"] == len(p["label"])
            # the 4-class answer is the argmax over those 4 logits only
            rows = np.isin(p["label"], four)
            yhat = np.asarray(four)[p["emotion_logits"][rows][:, four].argmax(1)]
            assert np.mean(yhat == p["label"][rows]) == pytest.approx(f4["accuracy"], abs=1e-4)
            # 8-way: the shipped model's answer, and how often it names a class the corpus lacks
            full = p["emotion_logits"].argmax(1)
            opened = row[mode]["open"]
            assert opened["accuracy"] == pytest.approx(np.mean(full == p["label"]), abs=1e-4)
            absent = ~np.isin(np.asarray(LABELS)[full], OWN[corpus])
            assert opened["predicted_absent"] == pytest.approx(np.mean(absent), abs=1e-4)
            for figs in (f4, own):
                assert figs["uar"] == pytest.approx(_recall_mean(figs["confusion"]), abs=1e-4)
                assert np.asarray(figs["confusion"]).sum() == figs["n"]
    for mode in ("none", "online"):
        rows = results["held_out"].values()
        assert results["mean"][mode]["uar_four_class"] == pytest.approx(
            np.mean([r[mode]["four_class"]["uar"] for r in rows]), abs=1e-4)
        assert results["mean"][mode]["held_out"] == 3
    cal = results["calibration"]["online"]
    # one temperature from every fold's validation clips pooled
    assert cal["temperature_fitted_on"] == sum(len(load_predictions(loco_run / f"fold-{k}")["val"]["label"])
                                               for k in (1, 2, 3)) > 0
    assert 0.0 <= cal["ece_pooled"] <= 1.0 and len(cal["ece_folds"]) == 3
    gaps = cal["uar_gap_female_minus_male"]
    assert gaps["tess"] is None and isinstance(gaps["ravdess"], float) and isinstance(gaps["ased"], float)
    # each held-out corpus also at the temperature fitted on the other two held-out corpora's test clips
    cross = cal["held_out_temperature"]
    tests = [load_predictions(loco_run / f"fold-{k}")["online"] for k in (1, 2, 3)]
    for k, fold in enumerate(cross["folds"]):
        assert fold["fitted_on"] == sum(len(t["label"]) for j, t in enumerate(tests) if j != k)
        # the file keeps T to 4 decimals and the ECE was taken at the unrounded T: equal to within that rounding
        assert fold["ece"] == pytest.approx(restricted_figures(tests[k], temperature=fold["temperature"])["ece"],
                                            abs=5e-4)
    assert cross["fitted_on_all"] == sum(len(t["label"]) for t in tests)


def _overconfident_corpus(name: str, rng: np.random.Generator, n: int = 400, scale: float = 6.0) -> dict:
    """Predictions right 70 % of the time over the four shared classes but about 99 % sure of every answer."""
    classes = np.array([LABELS.index(c) for c in FOUR_CLASSES])
    label = rng.choice(classes, n)
    answer = np.where(rng.random(n) < 0.6, label, rng.choice(classes, n))
    logits = rng.normal(0, 0.3, (n, len(LABELS)))
    logits[np.arange(n), answer] += scale
    return {"emotion_logits": logits, "label": label, "gender": rng.integers(0, 2, n),
            "speaker": np.array([f"{name}:{i % 4}" for i in range(n)])}


def test_held_out_temperature_softens_overconfidence_without_a_clip_calibrating_itself() -> None:
    rng = np.random.default_rng(0)
    tests = [_overconfident_corpus(name, rng) for name in ("a", "b", "c")]
    cross = held_out_temperatures(tests)
    for fold in cross["folds"]:
        assert fold["temperature"] > 2.0  # softening: the answers are far surer than they are right
        assert fold["ece_raw"] > 0.25 and fold["ece"] < 0.1
    # fold 0's temperature comes from folds 1 and 2 only: making fold 0's own logits sharper leaves it alone
    sharper = dict(tests[0], emotion_logits=3 * tests[0]["emotion_logits"])
    again = held_out_temperatures([sharper, *tests[1:]])
    assert again["folds"][0]["temperature"] == cross["folds"][0]["temperature"]
    assert again["folds"][1]["temperature"] != cross["folds"][1]["temperature"]
    assert held_out_temperatures(tests[:1]) == {}  # nothing else to fit on


def test_loco_v03_recipe_and_report_compare(loco_run, data, tmp_path, capsys) -> None:
    old = tmp_path / "loco-v03"
    rc = main(["loco", "--data", str(data), "--out", str(old), "--cache", str(data / "cache"), *TINY, "--workers", "1",
               "--recipe", "v0.3", "--held-out", "ased"])
    assert rc == 0
    config = json.loads((old / "config.json").read_text())
    assert config["mask_loss"] is False and config["sampling"] == "v0.3"
    results = json.loads((old / "loco.json").read_text())
    assert list(results["held_out"]) == ["ased"] and not results["complete"]
    # a result file written before the gender gap's speaker interval existed: report scores it anew
    gaps = results["calibration"]["online"]["uar_gap_interval_95"]
    assert list(gaps) == ["ased"] and gaps["ased"][0] <= results["calibration"]["online"][
        "uar_gap_female_minus_male"]["ased"] <= gaps["ased"][1]
    for c in results["calibration"].values():
        del c["uar_gap_interval_95"]
    (old / "loco.json").write_text(json.dumps(results))
    capsys.readouterr()
    assert main(["report", "--loco", str(old), "--compare", str(loco_run), str(old)]) == 0
    out = capsys.readouterr().out
    assert json.loads((old / "loco.json").read_text())["calibration"]["online"]["uar_gap_interval_95"] == gaps
    assert f"ased {100 * results['calibration']['online']['uar_gap_female_minus_male']['ased']:+.1f} " \
           f"[{100 * gaps['ased'][0]:+.1f}, {100 * gaps['ased'][1]:+.1f}]" in out
    assert "Leave-one-corpus-out" in out and "(partial: 1 of 3 held-out corpora finished)" in out
    assert f"| figure | {loco_run.name} | loco-v03 |" in out
    line = next(row for row in out.splitlines() if row.startswith("| -> ased 4-class UAR (online) |"))
    assert line.count("|") == 4 and "-" not in line.split("|")[2:4]
    # two runs pooled as seeds of one recipe: mean, min to max, count
    assert main(["report", "--compare", f"both={loco_run},{old}", str(old)]) == 0
    out = capsys.readouterr().out
    assert "| figure | both | loco-v03 |" in out
    ased = [float(row.split("|")[k].split()[0]) for row in (line,) for k in (2, 3)]
    pooled = next(row for row in out.splitlines() if row.startswith("| -> ased 4-class UAR (online) |"))
    assert pooled.split("|")[2].strip() == (f"{sum(ased) / 2:.3f} ({min(ased):.3f} to {max(ased):.3f}, 2 seeds)")
    # a result file cut short: one line, no traceback
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "loco.json").write_text((old / "loco.json").read_text()[:50])
    assert main(["report", "--compare", f"x={old},{cut}"]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    # a figure only one of them has (the other corpora's held-out folds) is that run's, not a mean with a gap
    tess = next(row for row in out.splitlines() if row.startswith("| -> tess 4-class UAR (online) |"))
    assert "seeds" not in tess.split("|")[2] and tess.split("|")[3].strip() == "-"
    # a flag given explicitly overrides the recipe
    assert main(["loco", "--data", str(data), "--out", str(tmp_path / "x"), "--cache", str(data / "cache"), *TINY,
                 "--recipe", "v0.3", "--mask-loss", "--held-out", "nope"]) == 2
    assert "--held-out nope is not among --corpora" in capsys.readouterr().err


def test_ased_cv_scores_all_and_common_sentences(data, tmp_path, capsys) -> None:
    out = tmp_path / "ased"
    rc = main(["ased-cv", "--data", str(data), "--out", str(out), "--cache", str(data / "cache"), *TINY,
               "--workers", "1", "--folds", "1", "--val-clips", "15"])
    assert rc == 0
    results = json.loads((out / "ased-cv.json").read_text())
    fold = results["folds"]["1"]
    assert fold["test_speakers"] == ["ased:01", "ased:06"]  # 6 speakers dealt round-robin into 5 folds
    meta = json.loads((out / "fold-1.json").read_text())
    # each synthetic speaker holds 10 clips: two reach 15
    assert all(s.startswith("ased:") for s in meta["val_speakers"]) and len(meta["val_speakers"]) == 2
    for mode in ("none", "online", "full"):
        assert fold[mode]["all"]["n"] == 2 * 5 * 2 and fold[mode]["common"]["n"] == 2 * 5
        assert sorted(fold[mode]["all"]["classes"]) == sorted(OWN["ased"])
        assert results["summary"][mode]["common"]["folds"] == [fold[mode]["common"]["uar"]]
    assert "ASED 5-fold" in capsys.readouterr().out
    assert results["n_folds"] == 5 and not results["complete"]
    capsys.readouterr()
    assert main(["report", "--ased-cv", str(out)]) == 0
    assert "| 1 | 01,06 (2) |" in capsys.readouterr().out
    (out / "ased-cv.json").write_text("{")
    assert main(["report", "--ased-cv", str(out)]) == 2
    assert "ased-cv.json is not valid JSON" in capsys.readouterr().err


def test_ravdess_cv_trains_with_ased_and_writes_pooled_calibration(data, tmp_path) -> None:
    out = tmp_path / "cv"
    rc = main(["cv", "--data", str(data), "--corpora", "ravdess,tess,ased", "--out", str(out),
               "--cache", str(data / "cache"), *TINY, "--workers", "1", "--folds", "1"])
    assert rc == 0
    fold = json.loads((out / "fold-1.json").read_text())
    assert set(fold["test_speakers"]) == {f"ravdess:{a:02d}" for a in range(1, 5)}
    assert {s.split(":")[0] for s in fold["val_speakers"]} == {"ravdess"}
    gen = json.loads((out / "generalisation.json").read_text())
    assert gen["calibration"]["online"]["temperature_fitted_on"] == 2 * 8  # 2 val actors x 8 clips
    assert {g: r["n"] for g, r in gen["recall_by_gender"].items()} == {"female": 2 * 8, "male": 2 * 8}  # actors 1-4
    assert gen["gender_bias_check"] == {}  # one fold: no other fold's validation speakers to fit on
    assert set(gen["misreadings_by_gender"]) == {"female", "male"}
    assert set(gen["calibration"]["online"]["uar_gap_female_minus_male"]) == {"ravdess"}


def test_train_with_new_recipe_exports_the_unchanged_contract(data, tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    from serstream.inference.session import EmotionModel

    path = tmp_path / "m.onnx"
    rc = main(["train", "--data", str(data), "--corpora", "ravdess,tess,ased", "--out", str(tmp_path / "final"),
               "--cache", str(data / "cache"), *TINY,
               "--export", str(path), "--temperature", "1.3", "--version", "0.4.0-test"])
    assert rc == 0
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["labels"] == list(LABELS) and sidecar["temperature"] == 1.3
    cfg = sidecar["train_config"]
    assert cfg["mask_loss"] is True and cfg["sampling"] == "v0.3" and cfg["other_corpus_pick"] == "corpus"
    assert sidecar["training_data"] == "ravdess,tess,ased"
    # export later from the checkpoint: the training corpora come from it, not from a default
    again = tmp_path / "again.onnx"
    assert main(["export", "--checkpoint", str(tmp_path / "final" / "model.pt"), "--export", str(again),
                 "--temperature", "1.3", "--version", "0.4.0-test"]) == 0
    assert json.loads(again.with_suffix(".json").read_text())["training_data"] == "ravdess,tess,ased"
    model = EmotionModel.load(path)
    assert list(model.info.labels) == list(LABELS)
    rng = np.random.default_rng(0)
    out = model.infer((0.05 * rng.standard_normal((2, 16000))).astype(np.float32), np.array([16000, 9000]))
    assert out.probs.shape == (2, len(LABELS))
    np.testing.assert_allclose(out.probs.sum(axis=1), 1.0, atol=1e-5)


def test_ased_folds_are_13_speakers_each_dealt_by_pp() -> None:
    from training.generalise import ased_folds

    speakers = [f"ased:{p:02d}" for p in range(65, 0, -1)] + ["ravdess:01", "tess:OAF"]
    folds = ased_folds(speakers)
    assert [len(f.test_speakers) for f in folds] == [13] * 5
    assert sorted(folds[0].test_speakers) == [f"ased:{p:02d}" for p in range(1, 66, 5)]
    assert sorted(folds[4].test_speakers) == [f"ased:{p:02d}" for p in range(5, 66, 5)]
    assert set().union(*(f.test_speakers for f in folds)) == {f"ased:{p:02d}" for p in range(1, 66)}
    with pytest.raises(ValueError, match="cannot fill 5 folds"):
        ased_folds(["ased:01", "ased:02"])


def test_loco_validation_comes_from_multi_speaker_training_corpora() -> None:
    from types import SimpleNamespace

    from training.generalise import loco_splits

    utts = [SimpleNamespace(speaker=f"ravdess:{a:02d}", corpus="ravdess", gender="male" if a % 2 else "female")
            for a in range(1, 25)]
    utts += [SimpleNamespace(speaker=f"tess:{s}", corpus="tess", gender="female") for s in ("OAF", "YAF")]
    utts += [SimpleNamespace(speaker=f"ased:{p:02d}", corpus="ased", gender="female" if p % 3 else "male")
             for p in range(1, 66)]
    folds = loco_splits(utts, ["ravdess", "tess", "ased"], seed=3)
    for fold, held in zip(folds, ("ravdess", "tess", "ased")):
        assert {s.split(":")[0] for s in fold.test_speakers} == {held}
        donors = {s.split(":")[0] for s in fold.val_speakers}
        assert donors == {"ravdess", "tess", "ased"} - {held, "tess"}
        assert len(fold.val_speakers) == 2 * len(donors)
        assert not fold.train_speakers & (fold.val_speakers | fold.test_speakers)
        assert len(fold.train_speakers | fold.val_speakers | fold.test_speakers) == 24 + 2 + 65
    assert loco_splits(utts, ["ravdess", "tess", "ased"], seed=3) == folds  # deterministic


def test_ased_cv_with_too_few_speakers_for_validation_is_one_line(data, tmp_path, capsys) -> None:
    rc = main(["ased-cv", "--data", str(data), "--out", str(tmp_path / "o"), "--cache", str(data / "cache"), *TINY,
               "--folds", "1"])  # fold 1 tests 2 of 6 speakers; the other 4 hold 40 clips, short of 120 + training
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "cannot give a test set, validation speakers with 120 clips" in err.strip().splitlines()[-1]


def test_ased_validation_speakers_are_drawn_until_they_hold_enough_clips() -> None:
    from types import SimpleNamespace

    from training.generalise import ased_folds, ased_split

    rng = np.random.default_rng(0)
    utts = []
    for p in range(1, 66):
        n = int(rng.integers(8, 71))  # ASED speakers hold 8-70 clips
        utts += [SimpleNamespace(speaker=f"ased:{p:02d}", gender="female" if p % 3 == 0 else "male")] * n
    utts += [SimpleNamespace(speaker="ravdess:01", gender="male")] * 60
    clips = {u.speaker: sum(v.speaker == u.speaker for v in utts) for u in utts}
    for fold in ased_folds({u.speaker for u in utts}):
        split = ased_split(utts, fold, min_val_clips=120, seed=1)
        val = sorted(split.val_speakers, key=lambda s: s)
        total = sum(clips[s] for s in val)
        assert total >= 120 and len(val) >= 2 and all(s.startswith("ased:") for s in val)
        assert not split.val_speakers & fold.test_speakers and "ravdess:01" in split.train_speakers
        assert {u.gender for u in utts if u.speaker in split.val_speakers} == {"female", "male"}
        assert ased_split(utts, fold, min_val_clips=120, seed=1) == split


@pytest.mark.parametrize("argv, expected", [
    ([], {"mask_loss": True, "sampling": "v0.3", "other_corpus_pick": "corpus", "select": "last",
          "unmasked_weight": 0.0}),
    (["--recipe", "balanced"], {"mask_loss": True, "sampling": "balanced", "corpus_weight": "sqrt-speakers",
                                "select": "best"}),
    (["--select", "best"], {"sampling": "v0.3", "select": "best"}),
    (["--recipe", "v0.3"], {"mask_loss": False, "sampling": "v0.3", "other_corpus_pick": "speaker", "select": "best"}),
    (["--recipe", "v0.3", "--mask-loss", "--unmasked-weight", "0.1"], {"mask_loss": True, "sampling": "v0.3",
                                                                      "unmasked_weight": 0.1}),
    (["--recipe", "balanced", "--no-mask-loss", "--corpus-weight", "uniform"], {"mask_loss": False, "sampling": "balanced",
                                                         "corpus_weight": "uniform"}),
])
def test_recipe_flags_set_the_config_and_explicit_flags_win(argv, expected) -> None:
    from training.__main__ import _config, build_parser

    for command in ("cv", "train", "loco", "ased-cv", "crosscorpus"):
        config = _config(build_parser().parse_args([command, "--data", "x", *argv]))
        assert {k: getattr(config, k) for k in expected} == expected, command


def test_bare_train_config_is_the_shipped_recipe() -> None:
    """Code that builds a TrainConfig() without a recipe trains with the shipped settings (on v0.4.0's graph)."""
    from training.model import ModelConfig
    from training.train import DEFAULT_RECIPE, RECIPES, TrainConfig

    assert DEFAULT_RECIPE == "v0.6"
    shipped = {k: v for k, v in RECIPES[DEFAULT_RECIPE].items() if k != "model"}
    assert {k: getattr(TrainConfig(), k) for k in shipped} == shipped
    assert all(set(recipe) == set(RECIPES["v0.4"]) for recipe in RECIPES.values())  # each names every setting
    graph = {"cepstral_stats", "speaker_window_stats", "prior_frames", "prior_windows", "prior_cold_only", "f0_stats"}
    assert all(set(recipe["model"]) == graph for recipe in RECIPES.values())
    # v0.6 is v0.5 with the population prior, nothing else
    assert {k: v for k, v in RECIPES["v0.6"].items() if k != "model"} == {
        k: v for k, v in RECIPES["v0.5"].items() if k != "model"}
    changed = {k for k in graph if RECIPES["v0.6"]["model"][k] != RECIPES["v0.5"]["model"][k]}
    assert changed == {"prior_frames", "prior_windows"}
    # v0.5 is v0.4's training with the speaker-normalised window statistics; v0.4 is ModelConfig()'s graph
    assert {k: v for k, v in RECIPES["v0.4"].items() if k != "model"} == shipped
    assert {k: getattr(ModelConfig(), k) for k in RECIPES["v0.4"]["model"]} == RECIPES["v0.4"]["model"]


def test_ensemble_of_two_seeds_scores_their_averaged_predictions(loco_run, data, tmp_path, capsys) -> None:
    other = tmp_path / "loco-s1"
    assert main(["loco", "--data", str(data), "--out", str(other), "--cache", str(data / "cache"), *TINY,
                 "--workers", "2", "--seed", "1"]) == 0
    ens = tmp_path / "ens"
    capsys.readouterr()
    assert main(["ensemble", "--out", str(ens), str(loco_run), str(other)]) == 0
    assert "Leave-one-corpus-out" in capsys.readouterr().out
    results = json.loads((ens / "loco.json").read_text())
    assert results["complete"] and list(results["held_out"]) == ["ravdess", "tess", "ased"]
    assert results["calibration"] == {}  # the seeds validated on different speakers: no temperature
    for k in (1, 2, 3):
        members = [load_predictions(run / f"fold-{k}")["online"] for run in (loco_run, other)]
        probs = [np.exp(m["emotion_logits"] - m["emotion_logits"].max(1, keepdims=True)) for m in members]
        mean = sum(p / p.sum(1, keepdims=True) for p in probs) / 2
        averaged = load_predictions(ens / f"fold-{k}")["online"]
        np.testing.assert_array_equal(averaged["label"], members[0]["label"])
        np.testing.assert_allclose(np.exp(averaged["emotion_logits"]), mean, atol=1e-5)
    # runs of different kinds are refused with one line
    ased = tmp_path / "ased"
    (ased / "fold-1").mkdir(parents=True)
    (ased / "ased-cv.json").write_text(json.dumps({"folds": {}, "summary": {}, "complete": False}))
    assert main(["ensemble", "--out", str(tmp_path / "bad"), str(loco_run), str(ased)]) == 2
    assert "different kinds" in capsys.readouterr().err
    # a member whose predictions file is cut short: one line naming it, no traceback
    broken = tmp_path / "broken"
    shutil.copytree(other, broken)
    npz = broken / "fold-2" / "predictions.npz"
    npz.write_bytes(npz.read_bytes()[:100])
    assert main(["ensemble", "--out", str(tmp_path / "bad2"), str(loco_run), str(broken)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fold-2/predictions.npz cannot be read" in err and "Traceback" not in err
    assert json.loads((ens / "loco.json").read_text())["config"]["ensemble_of"] == [str(loco_run), str(other)]


def _fold_with_a_male_prior(k: int, rng: np.random.Generator, male_shift: float) -> dict:
    """One fold's validation and online predictions, 4 speakers each; men's logits pushed toward angry."""
    angry = LABELS.index("angry")

    def clips(speakers: list[int]) -> dict:
        spk = np.repeat(speakers, 64)
        gender = spk % 2  # odd ids male, as RAVDESS numbers them
        label = np.tile(np.arange(len(LABELS)), len(spk) // len(LABELS))
        logits = rng.normal(0, 1, (len(spk), len(LABELS)))
        logits[np.arange(len(spk)), label] += 2.0
        logits[gender == 1, angry] += male_shift
        gender_logits = np.stack([1.0 - gender, gender.astype(float)], axis=1)
        return {"emotion_logits": logits, "label": label, "gender": gender, "gender_logits": gender_logits,
                "speaker": np.array([f"ravdess:{s:02d}" for s in spk])}

    return {"val": clips([40 + 2 * k, 41 + 2 * k]), "online": clips([4 * k + 1, 4 * k + 2, 4 * k + 3, 4 * k + 4])}


def test_gender_bias_check_closes_a_per_gender_prior_and_recall_is_split_by_gender() -> None:
    rng = np.random.default_rng(0)
    folds = [_fold_with_a_male_prior(k, rng, male_shift=3.0) for k in range(4)]
    check = gender_bias_check(folds)
    assert check["as_is"]["uar_gap_female_minus_male"] > 0.2  # men's clips mostly read as angry
    assert abs(check["gender_bias"]["uar_gap_female_minus_male"]) < 0.05
    assert check["gender_bias"]["uar"] > check["as_is"]["uar"] + 0.05
    by_gender = recall_by_gender(folds)
    assert by_gender["male"]["n"] == by_gender["female"]["n"] == 4 * 2 * 64
    assert by_gender["male"]["recall"]["angry"] > 0.95 > by_gender["female"]["recall"]["angry"]
    assert by_gender["female"]["uar"] - by_gender["male"]["uar"] == pytest.approx(
        check["as_is"]["uar_gap_female_minus_male"], abs=1e-3)
    # no prior to remove: the offsets change little
    fair = gender_bias_check([_fold_with_a_male_prior(k, rng, male_shift=0.0) for k in range(4)])
    assert abs(fair["gender_bias"]["uar"] - fair["as_is"]["uar"]) < 0.03
    assert gender_bias_check(folds[:1]) == {}  # no other fold to fit on


def _fold_misreading_mens_normal_happy(k: int) -> dict:
    """Online predictions of one fold, RAVDESS-like: neutral only at normal intensity; every clip read right
    except men's normal-intensity happy, read as angry 3 times in 4 and as surprised once in 4."""
    happy, angry, surprised = (LABELS.index(c) for c in ("happy", "angry", "surprised"))
    label, intensity, gender, predicted = [], [], [], []
    for g in (0, 1):
        for level in (0, 1):
            for c in range(len(LABELS)):
                if LABELS[c] == "neutral" and level == 1:
                    continue
                for i in range(4):
                    label.append(c), intensity.append(level), gender.append(g)
                    wrong = g == 1 and level == 0 and c == happy
                    predicted.append((angry if i < 3 else surprised) if wrong else c)
    logits = np.eye(len(LABELS))[predicted] * 5.0
    n = len(label)
    return {"online": {"emotion_logits": logits, "label": np.array(label), "intensity": np.array(intensity),
                       "gender": np.array(gender), "speaker": np.array([f"ravdess:{k:02d}"] * n)}}


def test_gender_gap_is_split_by_intensity_and_misreadings_say_where_errors_go() -> None:
    from training.evaluate import gender_markdown

    folds = [_fold_misreading_mens_normal_happy(k) for k in (1, 2)]
    by_level = gender_gap_by_intensity(folds)
    # neutral has no strong clips, so both rows are over the other 7 classes
    assert {r["classes"] for r in by_level.values()} == {7}
    assert by_level["normal"]["n"] == by_level["strong"]["n"] == 2 * 2 * 7 * 4
    assert by_level["normal"]["female"] == by_level["strong"]["female"] == by_level["strong"]["male"] == 1.0
    assert by_level["normal"]["male"] == pytest.approx(6 / 7, abs=1e-4)  # happy's recall 0, six classes right
    assert by_level["normal"]["gap_female_minus_male"] == pytest.approx(1 / 7, abs=1e-4)
    assert by_level["strong"]["gap_female_minus_male"] == 0.0
    misread = misreadings_by_gender(folds)
    # men's happy: 8 normal (6 angry, 2 surprised) and 8 strong (right): shares of 16 clips
    assert misread["male"]["happy"] == [["angry", 0.375], ["surprised", 0.125]]
    assert misread["female"]["happy"] == [] and misread["male"]["angry"] == []
    # one intensity only, or none recorded: nothing to split
    one_level = [{"online": {**f["online"], "intensity": np.zeros_like(f["online"]["intensity"])}} for f in folds]
    assert gender_gap_by_intensity(one_level) == {}
    assert gender_gap_by_intensity([{"online": {k: v for k, v in f["online"].items() if k != "intensity"}}
                                    for f in folds]) == {}
    table = gender_markdown({"recall_by_gender": recall_by_gender(folds), "gender_gap_by_intensity": by_level,
                             "misreadings_by_gender": misread})
    assert "| normal | 112 | 1.000 | 0.857 | +14.3 |" in table
    assert "| happy | - | angry 38 %, surprised 12 % |" in table


def _fold_of_speakers(misread: dict[int, int]) -> dict:
    """Online predictions of RAVDESS-like actors (odd numbers men): actor k's first ``misread[k]`` classes read wrong."""
    label, gender, speaker, predicted = [], [], [], []
    for actor, wrong in misread.items():
        for c in range(len(LABELS)):
            for _ in range(2):
                label.append(c), gender.append(actor % 2 == 1), speaker.append(f"ravdess:{actor:02d}")
                predicted.append((c + 1) % len(LABELS) if c < wrong else c)
    return {"online": {"emotion_logits": np.eye(len(LABELS))[predicted] * 5.0, "label": np.array(label),
                       "gender": np.array(gender, dtype=int), "speaker": np.array(speaker)}}


def test_each_speakers_uar_says_whether_a_gap_is_a_few_men_or_all_of_them() -> None:
    from training.evaluate import gender_markdown

    # women 2, 4, 6 miss 0, 1, 2 of 8 classes; men 1, 3, 5, 7 miss 1, 2, 2, 6 (two folds)
    folds = [_fold_of_speakers({1: 1, 2: 0, 3: 2, 4: 1}), _fold_of_speakers({5: 2, 6: 2, 7: 6})]
    by = speaker_uar_by_gender(folds)
    assert by["female"]["speakers"] == [["ravdess:06", 0.75], ["ravdess:04", 0.875], ["ravdess:02", 1.0]]
    assert by["male"]["speakers"][0] == ["ravdess:07", 0.25] and by["male"]["speakers"][-1] == ["ravdess:01", 0.875]
    assert by["female"]["median"] == 0.875 and by["male"]["median"] == 0.75
    assert by["male"]["mean"] == pytest.approx((0.875 + 0.75 + 0.75 + 0.25) / 4, abs=1e-4)
    assert by["male"]["above_female_median"] == 0  # 0.875 is not above 0.875
    assert by["female"]["below_male_median"] == 0  # 0.75 is not below 0.75
    table = gender_markdown({"recall_by_gender": recall_by_gender(folds), "speaker_uar_by_gender": by})
    assert "| male | 0.656 | 0.750 | 07 0.25, 03 0.75, 05 0.75, 01 0.88 |" in table
    assert "0 of 4 men read above the women's median; 0 of 3 women below the men's." in table
    assert speaker_uar_by_gender([{"online": {k: v for k, v in f["online"].items() if k != "speaker"}}
                                  for f in folds]) == {}


@pytest.mark.parametrize("flag", ["--folds", "--workers"])
def test_train_refuses_fold_flags_it_would_ignore(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`train` fits one model on every speaker: a fold or worker count would be silently ignored, so it is refused."""
    from training.__main__ import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--data", "x", flag, "1"])
    assert f"unrecognized arguments: {flag} 1" in capsys.readouterr().err
    assert getattr(build_parser().parse_args(["cv", "--data", "x", flag, "1"]), flag[2:]) in ("1", 1)
