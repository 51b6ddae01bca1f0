"""Derived arousal/valence/dominance targets: range, the lexicon's ordering, intensity moves."""

from __future__ import annotations

import numpy as np
import pytest

from serstream.contract import LABELS
from training.targets import CATEGORY_AVD, NRC_VAD_V1, avd_target, avd_targets

AROUSAL, VALENCE, DOMINANCE = 0, 1, 2


def test_every_label_has_a_target_in_range() -> None:
    assert set(CATEGORY_AVD) == set(LABELS)
    for label in LABELS:
        for intensity in (None, "normal", "strong"):
            point = avd_target(label, intensity)
            assert len(point) == 3 and all(-1.0 <= v <= 1.0 for v in point)


def test_lexicon_values_are_mapped_to_signed_range_in_model_order() -> None:
    valence, arousal, dominance = NRC_VAD_V1["angry"]
    assert avd_target("angry") == pytest.approx((2 * arousal - 1, 2 * valence - 1, 2 * dominance - 1))


def test_orderings_follow_the_words() -> None:
    a = {label: avd_target(label) for label in LABELS}
    assert a["angry"][AROUSAL] > a["sad"][AROUSAL]
    assert a["angry"][AROUSAL] > a["calm"][AROUSAL]
    assert a["surprised"][AROUSAL] > a["neutral"][AROUSAL]
    assert a["happy"][VALENCE] > a["neutral"][VALENCE] > a["sad"][VALENCE]
    assert a["calm"][VALENCE] > a["angry"][VALENCE]
    assert a["angry"][DOMINANCE] > a["fearful"][DOMINANCE]


def test_normal_moves_toward_neutral_and_strong_away() -> None:
    neutral = np.array(avd_target("neutral"))
    for label in LABELS:
        if label == "neutral":
            continue
        base = np.linalg.norm(np.array(avd_target(label)) - neutral)
        normal = np.linalg.norm(np.array(avd_target(label, "normal")) - neutral)
        strong = np.linalg.norm(np.array(avd_target(label, "strong")) - neutral)
        assert normal == pytest.approx(0.75 * base)
        assert strong > base  # 25 % further, less where a coordinate clips at 1
    assert avd_target("neutral", "strong") == avd_target("neutral")


def test_strong_is_clipped_to_the_range() -> None:
    # happy's valence is 1.0 in the lexicon: strong pushes it further out, clipping keeps it at 1.
    assert avd_target("happy")[VALENCE] == pytest.approx(1.0)
    assert avd_target("happy", "strong")[VALENCE] == pytest.approx(1.0)


def test_batch_targets_and_errors() -> None:
    out = avd_targets(["angry", "sad"], ["strong", None])
    assert out.dtype == np.float32 and out.shape == (2, 3)
    assert out[0] == pytest.approx(np.array(avd_target("angry", "strong"), dtype=np.float32))
    with pytest.raises(ValueError, match="boredom"):
        avd_target("boredom")
    with pytest.raises(ValueError, match="extreme"):
        avd_target("angry", "extreme")
    with pytest.raises(ValueError):
        avd_targets(["angry"], [])
