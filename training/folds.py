"""Speaker-independent splits: RAVDESS's six actor folds and a cross-corpus split.

The RAVDESS standard holds out four actors per fold (1-4, 5-8, ..., 21-24).
:func:`make_split` completes a fold from the utterances at hand: two
validation actors (one male, one female, drawn with a seed from the fold's
training actors) and every remaining speaker, of every corpus, in training.
:func:`cross_corpus_split` trains on RAVDESS alone and tests on another corpus
(TESS by default). A :class:`Fold` refuses to hold a speaker in two sets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from .datasets import Utterance

__all__ = [
    "Fold",
    "FoldData",
    "RAVDESS_CORPUS",
    "cross_corpus_split",
    "make_split",
    "partition",
    "ravdess_actor_folds",
]

RAVDESS_CORPUS = "ravdess"
_ACTORS_PER_FOLD = 4
_N_ACTORS = 24


@dataclass(frozen=True)
class Fold:
    """One split over speaker ids. ``index`` is 1-based (fold 3 holds out actors 9-12).

    :func:`ravdess_actor_folds` returns folds with only ``test_speakers`` set;
    :func:`make_split` fills in validation and training speakers.
    """

    index: int
    test_speakers: frozenset[str]
    val_speakers: frozenset[str] = frozenset()
    train_speakers: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        for name in ("test_speakers", "val_speakers", "train_speakers"):
            object.__setattr__(self, name, frozenset(getattr(self, name)))
        pairs = (
            ("test", self.test_speakers, "validation", self.val_speakers),
            ("test", self.test_speakers, "training", self.train_speakers),
            ("validation", self.val_speakers, "training", self.train_speakers),
        )
        for name_a, a, name_b, b in pairs:
            shared = a & b
            if shared:
                raise ValueError(
                    f"fold {self.index}: speakers {sorted(shared)} are in both the "
                    f"{name_a} and the {name_b} set"
                )

    def role(self, speaker: str) -> str | None:
        """'train', 'val', 'test' or None for a speaker outside this fold."""
        if speaker in self.test_speakers:
            return "test"
        if speaker in self.val_speakers:
            return "val"
        if speaker in self.train_speakers:
            return "train"
        return None

    def describe(self) -> str:
        def short(speakers: frozenset[str]) -> str:
            return ", ".join(sorted(speakers)) or "-"

        return (
            f"fold {self.index}: test {short(self.test_speakers)}; "
            f"val {short(self.val_speakers)}; {len(self.train_speakers)} training speakers"
        )


@dataclass
class FoldData:
    """The utterances of one fold, by role; ``excluded`` lists speakers in no set."""

    train: list[Utterance] = field(default_factory=list)
    val: list[Utterance] = field(default_factory=list)
    test: list[Utterance] = field(default_factory=list)
    excluded: list[Utterance] = field(default_factory=list)


def _ravdess_speaker(actor: int) -> str:
    return f"{RAVDESS_CORPUS}:{actor:02d}"


def ravdess_actor_folds() -> list[Fold]:
    """The six standard RAVDESS folds: fold k holds out actors 4k-3 .. 4k."""
    folds = []
    for k in range(_N_ACTORS // _ACTORS_PER_FOLD):
        actors = range(k * _ACTORS_PER_FOLD + 1, (k + 1) * _ACTORS_PER_FOLD + 1)
        folds.append(Fold(index=k + 1, test_speakers=frozenset(map(_ravdess_speaker, actors))))
    return folds


def _speaker_genders(utterances: Iterable[Utterance]) -> dict[str, str | None]:
    genders: dict[str, str | None] = {}
    for u in utterances:
        if genders.get(u.speaker) is None:
            genders[u.speaker] = u.gender
    return genders


def _draw_validation(
    candidates: Sequence[str], genders: dict[str, str | None], n_val: int, rng: np.random.Generator
) -> frozenset[str]:
    """Draw ``n_val`` speakers balanced by gender: female, male, female, ...

    When one gender runs out the other fills in, so the count is always met
    while there are candidates.
    """
    pools = {
        gender: [s for s in sorted(candidates) if genders.get(s) == gender]
        for gender in ("female", "male")
    }
    others = [s for s in sorted(candidates) if genders.get(s) not in ("female", "male")]
    for pool in (*pools.values(), others):
        rng.shuffle(pool)
    chosen: list[str] = []
    order = ["female", "male"]
    while len(chosen) < n_val and any(pools.values()):
        gender = order[len(chosen) % 2]
        pool = pools[gender] if pools[gender] else pools[order[(len(chosen) + 1) % 2]]
        chosen.append(pool.pop())
    while len(chosen) < n_val and others:
        chosen.append(others.pop())
    return frozenset(chosen)


def make_split(
    utterances: Sequence[Utterance],
    fold: Fold,
    n_val_actors: int = 2,
    seed: int = 0,
    test_corpus: str | None = None,
) -> Fold:
    """Complete ``fold`` for these utterances.

    Test: the fold's RAVDESS actors that are present. Validation:
    ``n_val_actors`` RAVDESS actors from the rest, one male and one female for
    the default two, drawn with ``(seed, fold.index)``. Training: every other
    speaker, of every corpus. With ``test_corpus`` the split is the
    cross-corpus one instead (see :func:`cross_corpus_split`; the fold's test
    actors then train like the others). Raises ValueError when the fold's test
    actors are absent or too few training actors remain.
    """
    if test_corpus is not None:
        return cross_corpus_split(
            utterances,
            test_corpus=test_corpus,
            n_val_actors=n_val_actors,
            seed=seed,
            index=fold.index,
        )
    genders = _speaker_genders(utterances)
    present = set(genders)
    test = fold.test_speakers & present
    if not test:
        raise ValueError(
            f"fold {fold.index}: none of its test speakers "
            f"({', '.join(sorted(fold.test_speakers))}) have utterances"
        )
    ravdess_rest = sorted(s for s in present - test if s.startswith(f"{RAVDESS_CORPUS}:"))
    if n_val_actors > len(ravdess_rest):
        raise ValueError(
            f"fold {fold.index}: {n_val_actors} validation actors asked for, "
            f"only {len(ravdess_rest)} RAVDESS actors are left after the test set"
        )
    rng = np.random.default_rng([seed, fold.index])
    val = _draw_validation(ravdess_rest, genders, n_val_actors, rng)
    train = frozenset(present - test - val)
    return Fold(index=fold.index, test_speakers=test, val_speakers=val, train_speakers=train)


def cross_corpus_split(
    utterances: Sequence[Utterance],
    test_corpus: str = "tess",
    train_corpus: str = RAVDESS_CORPUS,
    n_val_actors: int = 2,
    seed: int = 0,
    index: int = 0,
) -> Fold:
    """Train on ``train_corpus`` alone (less the validation actors), test on ``test_corpus``.

    Speakers of any other corpus are left out of every set.
    """
    if test_corpus == train_corpus:
        raise ValueError("cross-corpus split needs two different corpora")
    genders = _speaker_genders(utterances)
    corpus_of = {u.speaker: u.corpus for u in utterances}
    test = frozenset(s for s, c in corpus_of.items() if c == test_corpus)
    pool = sorted(s for s, c in corpus_of.items() if c == train_corpus)
    if not test:
        raise ValueError(f"cross-corpus split: no utterances of the test corpus {test_corpus!r}")
    if n_val_actors >= len(pool):
        raise ValueError(
            f"cross-corpus split: {len(pool)} {train_corpus} speakers cannot give "
            f"{n_val_actors} validation speakers and a training set"
        )
    rng = np.random.default_rng([seed, index])
    val = _draw_validation(pool, genders, n_val_actors, rng)
    train = frozenset(pool) - val
    return Fold(index=index, test_speakers=test, val_speakers=val, train_speakers=train)


def partition(utterances: Sequence[Utterance], fold: Fold) -> FoldData:
    """Sort utterances into the fold's train/val/test lists (order preserved)."""
    data = FoldData()
    for u in utterances:
        role = fold.role(u.speaker)
        if role is None:
            data.excluded.append(u)
        else:
            getattr(data, role).append(u)
    return data
