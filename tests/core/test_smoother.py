"""Tests for serstream.core.smoother.MoodSmoother: half-life math, final weight, hysteresis."""

import numpy as np
import pytest

from serstream.core.smoother import MoodSmoother, SmootherConfig

LABELS = ("neutral", "happy", "sad")


def onehot(i: int, hot: float = 1.0) -> np.ndarray:
    p = np.full(3, (1 - hot) / 2)
    p[i] = hot
    return p


AVD0 = np.zeros(3)


def test_first_update_sets_the_state():
    smoother = MoodSmoother(LABELS)
    state = smoother.update(np.array([0.2, 0.7, 0.1]), np.array([0.5, -0.5, 0.1]), t=3.0, final=False)
    assert state.label == "happy" and state.confidence == pytest.approx(0.7)
    assert state.probs == pytest.approx({"neutral": 0.2, "happy": 0.7, "sad": 0.1})
    assert (state.arousal, state.valence, state.dominance) == pytest.approx((0.5, -0.5, 0.1))


def test_one_half_life_moves_halfway():
    smoother = MoodSmoother(LABELS, SmootherConfig(half_life_s=2.0))
    smoother.update(onehot(0), np.array([1.0, 0, 0]), t=0.0, final=False)
    state = smoother.update(onehot(1), np.array([0.0, 0, 0]), t=2.0, final=False)
    assert state.probs["neutral"] == pytest.approx(0.5)
    assert state.probs["happy"] == pytest.approx(0.5)
    assert state.arousal == pytest.approx(0.5)
    assert smoother.alpha(4.0, final=False) == pytest.approx(0.75)
    assert smoother.alpha(0.0, final=False) == 0.0


def test_many_small_steps_equal_one_big_step():
    a = MoodSmoother(LABELS, SmootherConfig(half_life_s=1.5))
    b = MoodSmoother(LABELS, SmootherConfig(half_life_s=1.5))
    for s in (a, b):
        s.update(onehot(0), AVD0, 0.0, False)
    for k in range(1, 11):
        state_a = a.update(onehot(2), AVD0, 0.3 * k, False)
    state_b = b.update(onehot(2), AVD0, 3.0, False)
    assert state_a.probs["sad"] == pytest.approx(state_b.probs["sad"])


def test_final_weighs_more_than_a_partial():
    smoother = MoodSmoother(LABELS, SmootherConfig(half_life_s=3.0, final_weight=2.0))
    base = smoother.alpha(1.0, final=False)
    heavy = smoother.alpha(1.0, final=True)
    assert heavy > base
    assert heavy / (1 - heavy) == pytest.approx(2 * base / (1 - base))


def test_converges_to_a_steady_input():
    smoother = MoodSmoother(LABELS, SmootherConfig(half_life_s=1.0))
    smoother.update(onehot(0), AVD0, 0.0, False)
    target = np.array([0.1, 0.3, 0.6])
    for k in range(1, 40):
        state = smoother.update(target, np.array([0.2, 0.4, -0.2]), 0.5 * k, False)
    assert state.label == "sad"
    assert list(state.probs.values()) == pytest.approx(list(target), abs=1e-4)
    assert state.valence == pytest.approx(0.4, abs=1e-4)


def test_label_switches_only_past_the_margin():
    smoother = MoodSmoother(LABELS, SmootherConfig(half_life_s=1.0, switch_margin=0.10))
    smoother.update(np.array([0.50, 0.45, 0.05]), AVD0, 0.0, False)
    # Happy now leads, but by less than the margin: the label stays.
    state = smoother.update(np.array([0.46, 0.50, 0.04]), AVD0, 100.0, False)
    assert state.probs["happy"] > state.probs["neutral"]
    assert state.label == "neutral" and state.confidence == pytest.approx(0.46)
    state = smoother.update(np.array([0.40, 0.55, 0.05]), AVD0, 200.0, False)
    assert state.label == "happy" and state.confidence == pytest.approx(0.55)


def test_bad_estimates_raise():
    smoother = MoodSmoother(LABELS)
    with pytest.raises(ValueError, match="probabilities"):
        smoother.update(np.ones(4) / 4, AVD0, 0.0, False)
    with pytest.raises(ValueError, match="arousal"):
        smoother.update(onehot(0), np.zeros(2), 0.0, False)
    with pytest.raises(ValueError, match="NaN"):
        smoother.update(np.array([np.nan, 0.5, 0.5]), AVD0, 0.0, False)
    assert smoother.state is None


def test_out_of_order_time_does_not_rewind_the_clock():
    smoother = MoodSmoother(LABELS, SmootherConfig(half_life_s=1.0))
    smoother.update(onehot(0), AVD0, 10.0, False)
    state = smoother.update(onehot(1), AVD0, 5.0, False)  # dt < 0 counts as 0
    assert state.probs["neutral"] == pytest.approx(1.0)
    state = smoother.update(onehot(1), AVD0, 11.0, False)
    assert state.probs["happy"] == pytest.approx(0.5)


@pytest.mark.parametrize("kwargs", [{"half_life_s": 0}, {"switch_margin": 1.5}, {"final_weight": 0}])
def test_bad_config_raises(kwargs):
    with pytest.raises(ValueError):
        SmootherConfig(**kwargs)


def test_bad_labels_raise():
    with pytest.raises(ValueError):
        MoodSmoother(("a", "a"))
