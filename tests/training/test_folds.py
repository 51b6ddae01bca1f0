"""Speaker-independent folds: six RAVDESS folds, one male and one female validation actor."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.datasets import Utterance
from training.folds import Fold, cross_corpus_split, make_split, partition, ravdess_actor_folds


def _corpus(actors=range(1, 25), tess=True, crema=False) -> list[Utterance]:
    """Two utterances per speaker: real readers are tested elsewhere, folds only need the fields."""
    utterances = []
    for actor in actors:
        gender = "male" if actor % 2 else "female"
        for label in ("angry", "sad"):
            path = Path(f"03-01-{actor:02d}-{label}.wav")
            speaker = f"ravdess:{actor:02d}"
            utterances.append(Utterance(path, "ravdess", speaker, label, gender, "normal"))
    if tess:
        for speaker in ("OAF", "YAF"):
            path = Path(f"{speaker}.wav")
            utterances.append(Utterance(path, "tess", f"tess:{speaker}", "happy", "female"))
    if crema:
        utterances.append(Utterance(Path("1001.wav"), "crema-d", "crema-d:1001", "sad", "male"))
    return utterances


def test_six_standard_folds_cover_every_actor_once() -> None:
    folds = ravdess_actor_folds()
    assert [f.index for f in folds] == [1, 2, 3, 4, 5, 6]
    assert folds[2].test_speakers == {"ravdess:09", "ravdess:10", "ravdess:11", "ravdess:12"}
    every = [s for f in folds for s in f.test_speakers]
    assert sorted(every) == [f"ravdess:{a:02d}" for a in range(1, 25)]


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_splits_are_disjoint_with_one_male_one_female_validation_actor(seed: int) -> None:
    utterances = _corpus()
    genders = {u.speaker: u.gender for u in utterances}
    for spec in ravdess_actor_folds():
        fold = make_split(utterances, spec, seed=seed)
        assert fold.test_speakers == spec.test_speakers
        assert not (fold.test_speakers & fold.val_speakers)
        assert not (fold.test_speakers & fold.train_speakers)
        assert not (fold.val_speakers & fold.train_speakers)
        assert sorted(genders[s] for s in fold.val_speakers) == ["female", "male"]
        assert all(s.startswith("ravdess:") for s in fold.val_speakers)
        assert {"tess:OAF", "tess:YAF"} <= fold.train_speakers
        assert fold.test_speakers | fold.val_speakers | fold.train_speakers == set(genders)


def test_validation_draw_is_seeded() -> None:
    utterances = _corpus()
    spec = ravdess_actor_folds()[0]
    assert make_split(utterances, spec, seed=3) == make_split(utterances, spec, seed=3)
    draws = {make_split(utterances, spec, seed=s).val_speakers for s in range(8)}
    assert len(draws) > 1


def test_a_speaker_in_two_sets_is_refused() -> None:
    with pytest.raises(ValueError, match="ravdess:01"):
        Fold(1, frozenset({"ravdess:01"}), frozenset(), frozenset({"ravdess:01", "ravdess:02"}))


def test_fold_without_its_test_actors_or_enough_training_actors_is_an_error() -> None:
    with pytest.raises(ValueError, match="none of its test speakers"):
        make_split(_corpus(actors=range(1, 5)), ravdess_actor_folds()[3])
    with pytest.raises(ValueError, match="validation actors"):
        make_split(_corpus(actors=range(1, 6)), ravdess_actor_folds()[0], n_val_actors=2)


def test_partition_sorts_utterances_by_role() -> None:
    utterances = _corpus()
    fold = make_split(utterances, ravdess_actor_folds()[1])
    data = partition(utterances, fold)
    assert len(data.test) == 4 * 2 and len(data.val) == 2 * 2
    assert len(data.train) == len(utterances) - 12 and data.excluded == []
    assert {u.speaker for u in data.test} == fold.test_speakers


def test_cross_corpus_split_trains_on_ravdess_only_and_tests_on_tess() -> None:
    utterances = _corpus(crema=True)
    fold = cross_corpus_split(utterances, test_corpus="tess")
    assert fold.test_speakers == {"tess:OAF", "tess:YAF"}
    assert all(s.startswith("ravdess:") for s in fold.train_speakers | fold.val_speakers)
    assert len(fold.train_speakers) == 22
    data = partition(utterances, fold)
    assert [u.speaker for u in data.excluded] == ["crema-d:1001"]
    via_make_split = make_split(utterances, ravdess_actor_folds()[0], test_corpus="tess")
    assert via_make_split.test_speakers == fold.test_speakers
