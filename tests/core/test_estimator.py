"""Tests for serstream.core.estimator.StreamEstimator: the order gate, state snapshots, events."""

from __future__ import annotations

import jsonschema
import numpy as np
import pytest

from serstream import events
from serstream.core.estimator import StreamEstimator
from serstream.core.scheduler import Window
from tests.modelfactory import model_info

STATE_INFO = model_info(with_state=True)
PLAIN_INFO = model_info()
SPEC = STATE_INFO.state_inputs[0]
N = len(STATE_INFO.labels)


def window(kind: str, utterance: int, start: int = 0, end: int = 16000) -> Window:
    return Window(kind=kind, utterance=utterance, start=start, end=end, audio=np.zeros(end - start, np.float32))


def result(est: StreamEstimator, w: Window, update: float | None = None, **kw):
    probs = np.full(N, 1.0 / N, np.float32)
    probs[w.utterance % N] += 0.2
    probs /= probs.sum()
    updates = None if update is None else {SPEC.name: np.full(SPEC.width, update, np.float32)}
    return est.result(w, probs, np.array([0.5, 0.5, 0.5], np.float32), gender=None,
                      state_updates=updates, latency_ms=12.0, ts=1.0, **kw)


def test_without_state_inputs_windows_are_ready_at_once():
    est: StreamEstimator[str] = StreamEstimator("s", PLAIN_INFO)
    assert not est.gated
    est.admit(window("final", 0), "a")
    est.admit(window("partial", 1), "b")
    released = est.ready()
    assert [r.tag for r in released] == ["a", "b"] and all(r.state == {} for r in released)
    assert est.outstanding == 2 and not est.idle


def test_windows_after_a_final_wait_for_its_result_and_then_see_its_state():
    est: StreamEstimator[str] = StreamEstimator("s", STATE_INFO)
    est.admit(window("partial", 0), "p0")
    est.admit(window("final", 0), "f0")  # p0 was not taken yet: the final replaces it
    first = est.ready()
    assert [r.tag for r in first] == ["f0"]
    assert est.superseded == 1
    assert first[0].state == {SPEC.name: None}  # empty state before any final
    est.admit(window("partial", 1), "p1")
    est.admit(window("partial", 1), "p1b")  # replaces the held p1
    assert est.ready() == [] and est.held == 1 and est.superseded == 2 and est.held_total == 2
    assert not est.has_ready
    result(est, first[0].window, update=2.0)
    assert est.has_ready
    (second,) = est.ready()
    assert second.tag == "p1b"
    np.testing.assert_array_equal(second.state[SPEC.name], np.full(SPEC.width, 2.0, np.float32))
    # A partial's result folds nothing into the state.
    result(est, second.window, update=5.0)
    est.admit(window("final", 1), "f1")
    (third,) = est.ready()
    np.testing.assert_array_equal(third.state[SPEC.name], np.full(SPEC.width, 2.0, np.float32))
    result(est, third.window, update=1.0)
    assert est.idle and est.states[SPEC.name].updates == 2


def test_a_lost_final_releases_the_windows_behind_it():
    est: StreamEstimator[int] = StreamEstimator("s", STATE_INFO)
    est.admit(window("final", 0), 0)
    (final,) = est.ready()
    est.admit(window("final", 1), 1)
    est.admit(window("partial", 2), 2)
    assert est.held == 2
    est.lost(final.window)  # dropped by the batch former, or its batch failed
    released = est.ready()
    # The final of utterance 1 goes; utterance 2 waits for it in turn.
    assert [r.tag for r in released] == [1] and released[0].state == {SPEC.name: None}
    est.lost(released[0].window)
    assert [r.tag for r in est.ready()] == [2]
    assert not est.idle
    est.lost(window("partial", 2))
    assert est.idle
    with pytest.raises(ValueError, match="not released"):
        est.lost(window("final", 9))


def test_events_carry_seq_offsets_and_validate():
    validator = jsonschema.Draft202012Validator(events.load_schema())
    est: StreamEstimator[None] = StreamEstimator("mic", PLAIN_INFO)
    est.admit(window("partial", 0, 0, 8000), None)
    est.admit(window("final", 0, 0, 16000), None)  # replaces the partial while queued
    est.admit(window("final", 1, 32000, 48000), None)
    out = [result(est, r.window, utterance_offset=3, clock_offset_s=10.0) for r in est.ready()]
    assert [e["seq"] for e in out] == [0, 1]
    assert [e["utterance"] for e in out] == [3, 4]
    assert [(e["t0"], e["t1"]) for e in out] == [(0.0, 1.0), (2.0, 3.0)]
    assert all(e["stream"] == "mic" and e["model"] == "test-1" and e["latency_ms"] == 12.0 for e in out)
    for event in out:
        validator.validate(event)
    assert est.idle


def test_an_unusable_result_still_resolves_its_window():
    est: StreamEstimator[None] = StreamEstimator("s", STATE_INFO)
    est.admit(window("final", 0), None)
    (final,) = est.ready()
    est.admit(window("final", 1), None)
    with pytest.raises(ValueError):
        est.result(final.window, np.full(N, np.nan, np.float32), np.zeros(3, np.float32), gender=None,
                   state_updates=None, latency_ms=0.0, ts=0.0)
    assert est.outstanding == 0 and est.has_ready


def test_one_in_flight_keeps_a_stream_in_order_whatever_order_results_come_back_in():
    # Two inference threads can finish a later batch first: with one window out at a time,
    # the stream's events still go out in stream order (partial, final, next utterance).
    est: StreamEstimator[str] = StreamEstimator("s", PLAIN_INFO, one_in_flight=True)
    assert not est.gated
    est.admit(window("partial", 0), "p0")
    (first,) = est.ready()
    est.admit(window("partial", 0), "p0b")
    est.admit(window("final", 0), "f0")  # replaces the held p0b; p0 is out, so f0 waits
    est.admit(window("final", 1, 32000, 48000), "f1")
    assert est.ready() == [] and not est.has_ready
    assert est.held == 2 and est.superseded == 1 and est.held_total == 3
    out = [result(est, first.window)]
    assert est.has_ready
    (second,) = est.ready()
    assert second.tag == "f0" and est.ready() == []
    est.lost(second.window)  # a lost window lets the next one go as well
    (third,) = est.ready()
    assert third.tag == "f1"
    out.append(result(est, third.window))
    assert [(e["kind"], e["utterance"], e["seq"]) for e in out] == [("partial", 0, 0), ("final", 1, 1)]
    assert est.idle


def test_without_one_in_flight_a_plain_model_releases_everything():
    est: StreamEstimator[str] = StreamEstimator("s", PLAIN_INFO)
    est.admit(window("partial", 0), "p0")
    est.ready()
    est.admit(window("final", 0), "f0")
    assert [r.tag for r in est.ready()] == ["f0"] and est.outstanding == 2
