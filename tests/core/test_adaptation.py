"""Tests for serstream.core.adaptation.SpeakerState."""

import numpy as np
import pytest

from serstream.contract import StateInput
from serstream.core.adaptation import SpeakerState

N_MELS = 4
SPEC = StateInput(name="speaker_stats", width=2 * N_MELS + 1, max_count=1000.0, count_index=2 * N_MELS)


def window_sums(frames: np.ndarray) -> np.ndarray:
    return np.concatenate([frames.sum(0), (frames ** 2).sum(0), [frames.shape[0]]])


def test_empty_state_is_filled_with_the_spec_value():
    state = SpeakerState(StateInput(name="x", width=3, empty=-1.0))
    value = state.value()
    assert value.dtype == np.float32 and value.tolist() == [-1.0, -1.0, -1.0]
    assert state.empty


def test_updates_add_up():
    state = SpeakerState(SPEC)
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(100, N_MELS)), rng.normal(size=(200, N_MELS))
    state.update(window_sums(a))
    state.update(window_sums(b)[None, :])
    np.testing.assert_allclose(state.value(), window_sums(np.vstack([a, b])), rtol=1e-5)
    assert state.count == 300 and state.rescales == 0


def test_cap_scaling_keeps_mean_and_second_moment():
    state = SpeakerState(SPEC)
    rng = np.random.default_rng(1)
    frames = rng.normal(3.0, 2.0, size=(1500, N_MELS))
    state.update(window_sums(frames))
    value = state.value().astype(np.float64)
    count = value[-1]
    assert count == pytest.approx(1000.0) and state.rescales == 1
    np.testing.assert_allclose(value[:N_MELS] / count, frames.mean(0), rtol=1e-5)
    np.testing.assert_allclose(value[N_MELS:-1] / count, (frames ** 2).mean(0), rtol=1e-5)


def test_after_the_cap_new_speech_weighs_more():
    state = SpeakerState(SPEC)
    state.update(window_sums(np.zeros((1000, N_MELS))))
    state.update(window_sums(np.ones((1000, N_MELS))))
    mean = state.value()[:N_MELS] / state.count
    np.testing.assert_allclose(mean, 0.5, rtol=1e-6)  # equal weight when both fit the cap exactly
    state.update(window_sums(np.ones((1000, N_MELS))))
    mean = state.value()[:N_MELS] / state.count
    assert np.all(mean > 2 / 3)  # old silence forgotten faster than plain averaging would


def test_without_cap_there_is_no_scaling():
    state = SpeakerState(StateInput(name="x", width=2))
    state.update(np.array([1e9, 5.0]))
    assert state.value().tolist() == [1e9, 5.0]


def test_bad_updates_raise_and_leave_the_state_alone():
    state = SpeakerState(SPEC)
    state.update(np.ones(SPEC.width))
    with pytest.raises(ValueError, match="shape"):
        state.update(np.ones(SPEC.width + 1))
    with pytest.raises(ValueError, match="NaN"):
        bad = np.ones(SPEC.width)
        bad[3] = np.inf
        state.update(bad)
    assert state.value().tolist() == [1.0] * SPEC.width and state.updates == 1


def test_bad_specs_raise():
    with pytest.raises(ValueError):
        SpeakerState(StateInput(name="x", width=0))
    with pytest.raises(ValueError):
        SpeakerState(StateInput(name="x", width=3, count_index=3))


def test_reset_forgets():
    state = SpeakerState(SPEC)
    state.update(np.ones(SPEC.width))
    state.reset()
    assert state.empty and not state.value().any()
