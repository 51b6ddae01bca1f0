"""Masked emotion loss (absent classes get no gradient) and the balanced batch sampler's rule."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from serstream.contract import LABELS  # noqa: E402
from training.mixing import (  # noqa: E402
    BalancedSampler,
    corpus_class_masks,
    masked_cross_entropy,
    restricted_argmax,
)
from training.model import MultitaskLoss  # noqa: E402

ASED = [LABELS.index(c) for c in ("neutral", "fearful", "happy", "sad", "angry")]


def _batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(6, len(LABELS), generator=gen) * 3
    mask = torch.zeros(6, len(LABELS), dtype=torch.bool)
    mask[:3, ASED] = True  # rows 0-2: an ASED-like corpus, 5 classes
    mask[3:] = True  # rows 3-5: RAVDESS-like, all 8
    target = torch.tensor([ASED[0], ASED[3], ASED[4], 1, 6, 7])  # 1 calm, 6 disgust: RAVDESS rows only
    return logits, mask, target


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_masked_loss_equals_cross_entropy_over_the_present_classes(smoothing) -> None:
    logits, mask, target = _batch()
    got = masked_cross_entropy(logits, target, mask, smoothing)
    f = torch.nn.functional
    sub = [ASED.index(int(t)) for t in target[:3]]
    ased = f.cross_entropy(logits[:3][:, ASED], torch.tensor(sub), label_smoothing=smoothing, reduction="sum")
    full = f.cross_entropy(logits[3:], target[3:], label_smoothing=smoothing, reduction="sum")
    assert float(got) == pytest.approx(float((ased + full) / 6), rel=1e-5)
    # and it differs from the unmasked loss: absent classes would otherwise count
    plain = f.cross_entropy(logits, target, label_smoothing=smoothing)
    assert abs(float(plain) - float(got)) > 1e-3


def test_masked_loss_gives_absent_classes_zero_gradient() -> None:
    logits, mask, target = _batch(1)
    logits.requires_grad_(True)
    masked_cross_entropy(logits, target, mask, 0.1).backward()
    grad = logits.grad
    absent = ~mask
    assert absent.sum() == 3 * 3
    assert torch.all(grad[absent] == 0) and torch.isfinite(grad).all()
    assert torch.all(grad[mask] != 0)  # every present class moves
    # raising an absent logit leaves the loss unchanged
    moved = logits.detach().clone()
    moved[0, LABELS.index("calm")] += 50.0
    assert float(masked_cross_entropy(moved, target, mask)) == pytest.approx(
        float(masked_cross_entropy(logits.detach(), target, mask)), rel=1e-6)


def test_masked_loss_refuses_a_target_outside_its_mask() -> None:
    logits, mask, target = _batch()
    target[0] = LABELS.index("calm")
    with pytest.raises(ValueError, match="masked out"):
        masked_cross_entropy(logits, target, mask)


def test_multitask_loss_uses_the_mask_when_given() -> None:
    logits, mask, target = _batch(2)
    out = {"emotion_logits": logits, "avd": torch.zeros(6, 3), "gender_logits": torch.zeros(6, 2),
           "intensity_logits": torch.zeros(6, 2)}
    tgt = {"emotion": target, "avd": torch.zeros(6, 3), "gender": torch.tensor([0, 1, -1, 0, 1, 0]),
           "intensity": torch.full((6,), -1)}
    loss = MultitaskLoss()
    _, parts = loss(out, {**tgt, "class_mask": mask})
    assert parts["emotion"] == pytest.approx(float(masked_cross_entropy(logits, target, mask, 0.1)), rel=1e-5)
    _, plain = loss(out, tgt)
    assert plain["emotion"] != pytest.approx(parts["emotion"], rel=1e-3)


def test_corpus_class_masks_and_restricted_argmax() -> None:
    corpora = np.array(["ased", "ased", "ravdess", "ravdess"])
    labels = np.array([0, 4, 1, 7])
    masks = corpus_class_masks(corpora, labels)
    assert np.flatnonzero(masks["ased"]).tolist() == [0, 4] and np.flatnonzero(masks["ravdess"]).tolist() == [1, 7]
    logits = np.array([[0.0, 9.0, 0.0, 0.0, 1.0, 0, 0, 0]])
    assert restricted_argmax(logits, masks["ased"]).tolist() == [4]


def _synthetic_list():
    """A lopsided list: corpus 'big' has 4 speakers x 400 clips, one class 10x the others;
    'two' has 2 speakers x 300 clips; 'many' has 16 speakers x 10 clips of 5 classes."""
    speaker, corpus, label = [], [], []
    for s in range(4):
        for i in range(400):
            speaker.append(f"big:{s}"), corpus.append("big"), label.append(0 if i < 300 else 1 + i % 7)
    for s in range(2):
        for i in range(300):
            speaker.append(f"two:{s}"), corpus.append("two"), label.append(i % 3)
    for s in range(16):
        for i in range(10):
            speaker.append(f"many:{s}"), corpus.append("many"), label.append(i % 5)
    return SimpleNamespace(speaker=np.array(speaker), corpus=np.array(corpus), label=np.array(label))


@pytest.mark.parametrize("rule, expected", [
    ("sqrt-speakers", {"big": 2.0, "two": np.sqrt(2), "many": 4.0}),
    ("sqrt-size", {"big": 40.0, "two": np.sqrt(600), "many": np.sqrt(160)}),
    ("uniform", {"big": 1.0, "two": 1.0, "many": 1.0}),
])
def test_balanced_sampler_draws_corpora_by_the_rule_and_classes_evenly(rule, expected) -> None:
    data = _synthetic_list()
    sampler = BalancedSampler(data, np.arange(len(data.label)), speakers_per_batch=4, per_speaker=8,
                              rng=np.random.default_rng(0), corpus_weight=rule)
    idx = np.concatenate([sampler.sample()[0] for _ in range(1500)])  # 48,000 rows in 6,000 groups
    total = sum(expected.values())
    for name, w in expected.items():
        share = np.mean(data.corpus[idx] == name)
        assert share == pytest.approx(w / total, abs=0.02), (rule, name, share)
    big = idx[data.corpus[idx] == "big"]
    class_share = np.bincount(data.label[big], minlength=8) / len(big)
    # 8 classes: 1/8 each, though class 0 is 300 of every speaker's 400 clips
    assert np.all(np.abs(class_share - 1 / 8) < 0.02), class_share
    speakers = np.unique(data.speaker[idx[data.corpus[idx] == "many"]], return_counts=True)[1]
    assert len(speakers) == 16 and speakers.min() > 0.6 * speakers.max()


def test_balanced_sampler_keeps_groups_to_one_speaker_and_training_rows() -> None:
    data = _synthetic_list()
    train = np.flatnonzero(data.speaker != "big:0")
    sampler = BalancedSampler(data, train, 3, 5, np.random.default_rng(1))
    for _ in range(50):
        idx, groups = sampler.sample()
        assert len(idx) == 15 and set(np.isin(idx, train)) == {True}
        for g in np.unique(groups):
            assert len(set(data.speaker[idx[groups == g]])) == 1
    with pytest.raises(ValueError, match="unknown corpus weighting"):
        BalancedSampler(data, train, 3, 5, np.random.default_rng(1), corpus_weight="log")


def test_unmasked_weight_mixes_the_plain_loss_back_in() -> None:
    logits, mask, target = _batch(3)
    out = {"emotion_logits": logits, "avd": torch.zeros(6, 3), "gender_logits": torch.zeros(6, 2),
           "intensity_logits": torch.zeros(6, 2)}
    tgt = {"emotion": target, "avd": torch.zeros(6, 3), "gender": torch.full((6,), -1),
           "intensity": torch.full((6,), -1), "class_mask": mask}
    masked = float(masked_cross_entropy(logits, target, mask, 0.1))
    plain = float(torch.nn.functional.cross_entropy(logits, target, label_smoothing=0.1))
    _, parts = MultitaskLoss(unmasked_weight=0.2)(out, tgt)
    assert parts["emotion"] == pytest.approx(0.8 * masked + 0.2 * plain, rel=1e-5)
    # and an absent class's logit now gets a (small) gradient
    logits.requires_grad_(True)
    loss, _ = MultitaskLoss(unmasked_weight=0.2)({**out, "emotion_logits": logits}, tgt)
    loss.backward()
    assert float(logits.grad[0, LABELS.index("calm")]) > 0


@pytest.mark.parametrize("pick, expected", [
    # 25 % other-corpus groups; "speaker": 2 of 18 other speakers are "two"'s, 16 "many"'s
    ("speaker", {"big": 0.75, "two": 0.25 * 2 / 18, "many": 0.25 * 16 / 18}),
    ("corpus", {"big": 0.75, "two": 0.125, "many": 0.125}),
])
def test_v03_sampler_picks_other_corpora_by_speaker_or_by_corpus(pick, expected) -> None:
    from training.train import BatchSampler, TrainConfig

    data = _synthetic_list()
    data.corpus = np.where(data.corpus == "big", "ravdess", data.corpus)  # the v0.3 sampler's main corpus
    config = TrainConfig(sampling="v0.3", other_corpus_pick=pick, speakers_per_batch=4, per_speaker=8)
    sampler = BatchSampler(data, np.arange(len(data.label)), config, np.random.default_rng(0))
    idx, groups = zip(*(sampler.sample() for _ in range(1500)))
    rows = np.concatenate(idx)
    for name, share in expected.items():
        got = np.mean(data.corpus[rows] == ("ravdess" if name == "big" else name))
        assert got == pytest.approx(share, abs=0.02), (pick, name, got)
    for one_idx, one_groups in zip(idx[:50], groups[:50]):
        for g in np.unique(one_groups):
            assert len(set(data.speaker[one_idx[one_groups == g]])) == 1  # a group is one speaker
    with pytest.raises(ValueError, match="unknown other-corpus pick"):
        BatchSampler(data, np.arange(len(data.label)), TrainConfig(other_corpus_pick="clip"), np.random.default_rng(0))
