"""InferenceWorker: a real thread running a real ONNX Runtime session on the factory model."""

from __future__ import annotations

import threading
from typing import Any, Mapping

import numpy as np
import pytest

from serstream.contract import LABELS
from serstream.core.batcher import Batch, Request
from serstream.core.scheduler import Window
from serstream.inference.session import EmotionModel, InferenceOutput, pad_batch
from serstream.inference.worker import InferenceBackend, InferenceWorker
from tests.modelfactory import STATE_NAME, build_test_model, tone

WAIT_S = 30.0  # generous: a deadline for a stuck thread, not a speed assertion

LOUD = tone(0.5, rms=0.3)
QUIET = tone(0.5, rms=0.003)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> EmotionModel:
    path = build_test_model(tmp_path_factory.mktemp("m") / "plain.onnx")
    return EmotionModel.load(path, device="cpu", threads=1)


@pytest.fixture(scope="module")
def state_model(tmp_path_factory: pytest.TempPathFactory) -> EmotionModel:
    path = build_test_model(tmp_path_factory.mktemp("s") / "state.onnx", with_state=True)
    return EmotionModel.load(path, device="cpu", threads=1)


def make_batch(rows: list[np.ndarray], stream: str = "s", context: Any = None) -> Batch:
    audio, lengths = pad_batch(rows)
    requests = [
        Request(stream, Window("final", i, 0, len(r), r), submitted=0.0, context=context)
        for i, r in enumerate(rows)
    ]
    return Batch(requests=requests, audio=audio, lengths=lengths, closed=0.0)


class Results:
    """Collects on_result calls from the worker thread."""

    def __init__(self) -> None:
        self.calls: list[tuple[Batch, InferenceOutput | None, str | None]] = []
        self._cond = threading.Condition()

    def __call__(self, batch: Batch, output: InferenceOutput | None, error: str | None) -> None:
        with self._cond:
            self.calls.append((batch, output, error))
            self._cond.notify_all()

    def wait_for(self, n: int) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.calls) >= n, WAIT_S), (
                f"only {len(self.calls)} of {n} results arrived"
            )


class GatedBackend:
    """Wraps a backend; the first infer call blocks until ``release`` is set."""

    def __init__(self, inner: EmotionModel) -> None:
        self.inner = inner
        self.info = inner.info
        self.device = inner.device
        self.entered = threading.Event()
        self.release = threading.Event()

    def infer(self, audio: np.ndarray, lengths: np.ndarray, state: Any = None) -> InferenceOutput:
        self.entered.set()
        assert self.release.wait(WAIT_S)
        return self.inner.infer(audio, lengths, state)


class ExplodingBackend:
    """Raises for any batch whose first sample is exactly 0.5, else runs the real model."""

    def __init__(self, inner: EmotionModel) -> None:
        self.inner = inner
        self.info = inner.info
        self.device = inner.device

    def infer(self, audio: np.ndarray, lengths: np.ndarray, state: Any = None) -> InferenceOutput:
        if audio[0, 0] == 0.5:
            raise ZeroDivisionError("boom\nsecond line")
        return self.inner.infer(audio, lengths, state)


def test_model_is_a_backend(model: EmotionModel) -> None:
    assert isinstance(model, InferenceBackend)


def test_results_are_delivered(model: EmotionModel) -> None:
    results = Results()
    worker = InferenceWorker(model, results, max_queue=8)
    worker.start()
    batches = [make_batch([LOUD]), make_batch([QUIET, LOUD, QUIET]), make_batch([QUIET, LOUD])]
    try:
        assert all(worker.submit(b) for b in batches)
        results.wait_for(3)
    finally:
        worker.stop()
    assert not worker.running
    assert [call[0] for call in results.calls] == batches  # in order, same objects
    for batch, output, error in results.calls:
        assert error is None and output is not None
        got = [LABELS[i] for i in output.probs.argmax(axis=1)]
        want = ["angry" if r.window.audio is LOUD else "sad" for r in batch.requests]
        assert got == want
    stats = worker.stats()
    assert stats.batches == 3 and stats.windows == 6 and stats.submitted == 3
    assert stats.batch_sizes == {1: 1, 2: 1, 3: 1}
    assert stats.mean_batch_size == 2.0 and stats.max_batch_size == 3
    assert stats.failures == 0 and stats.dropped_batches == 0
    assert stats.infer_ms_p50 is not None and stats.infer_ms_p50 >= 0
    assert stats.infer_ms_p99 >= stats.infer_ms_p50


def test_full_queue_drops_and_counts(model: EmotionModel) -> None:
    backend = GatedBackend(model)
    results = Results()
    worker = InferenceWorker(backend, results, max_queue=2)
    worker.start()
    try:
        assert worker.submit(make_batch([LOUD]))
        assert backend.entered.wait(WAIT_S)  # the worker holds batch 1; the queue is empty
        assert worker.submit(make_batch([LOUD]))
        assert worker.submit(make_batch([QUIET]))
        assert worker.queue_depth == 2
        refused = make_batch([QUIET, QUIET, LOUD])
        assert worker.submit(refused) is False
        stats = worker.stats()
        assert stats.dropped_batches == 1 and stats.dropped_windows == 3
        assert stats.queue_depth == 2 and stats.submitted == 4
    finally:
        backend.release.set()
        worker.stop(drain=True)
    results.wait_for(3)
    assert all(refused is not call[0] for call in results.calls)
    assert worker.stats().batches == 3


def test_stop_without_drain_counts_discarded(model: EmotionModel) -> None:
    backend = GatedBackend(model)
    results = Results()
    worker = InferenceWorker(backend, results, max_queue=4)
    worker.start()
    worker.submit(make_batch([LOUD]))
    assert backend.entered.wait(WAIT_S)
    worker.submit(make_batch([LOUD, QUIET]))
    worker.submit(make_batch([QUIET]))
    worker.stop(drain=False, timeout=0)  # the running batch is blocked; the queued two go
    stats = worker.stats()
    assert stats.dropped_batches == 2 and stats.dropped_windows == 3
    assert stats.queue_depth == 0
    backend.release.set()
    worker.stop()
    assert not worker.running
    assert worker.stats().batches == 1 and len(results.calls) == 1
    assert worker.submit(make_batch([LOUD])) is False  # stopped: refused and counted
    assert worker.stats().dropped_batches == 3


def test_submit_before_start_is_a_counted_drop(model: EmotionModel) -> None:
    worker = InferenceWorker(model, Results())
    assert worker.submit(make_batch([LOUD, LOUD])) is False
    assert worker.stats().dropped_windows == 2


def test_failures_are_reported_once_and_the_worker_goes_on(model: EmotionModel) -> None:
    results = Results()
    worker = InferenceWorker(ExplodingBackend(model), results)
    bad1 = make_batch([np.full(100, 0.5, np.float32)])
    bad2 = make_batch([np.full(200, 0.5, np.float32)])
    nan_rows = LOUD.copy()
    nan_rows[5] = np.nan
    nan_batch = make_batch([nan_rows])  # the real model refuses non-finite outputs
    good = make_batch([LOUD])
    worker.start()
    try:
        for batch in (bad1, bad2, nan_batch, good):
            assert worker.submit(batch)
        results.wait_for(4)
    finally:
        worker.stop()
    (b1, o1, e1), (b2, o2, e2), (b3, o3, e3), (b4, o4, e4) = results.calls
    assert (b1, o1, e1) == (bad1, None, "ZeroDivisionError: boom")
    assert (b2, o2, e2) == (bad2, None, None)  # same cause: already reported
    assert b3 is nan_batch and o3 is None
    assert e3 == "model produced non-finite emotion_logits in batch rows [0]"
    assert b4 is good and e4 is None and o4 is not None
    assert LABELS[int(o4.probs[0].argmax())] == "angry"
    stats = worker.stats()
    assert stats.failures == 3 and stats.batches == 4
    assert stats.failure_counts == {
        "ZeroDivisionError: boom": 2,
        "model produced non-finite emotion_logits in batch rows [0]": 1,
    }


def test_callback_failure_does_not_stop_the_worker(model: EmotionModel) -> None:
    seen: list[Batch] = []
    done = threading.Event()

    def on_result(batch: Batch, output: Any, error: Any) -> None:
        seen.append(batch)
        if len(seen) == 1:
            raise RuntimeError("consumer bug")
        done.set()

    worker = InferenceWorker(model, on_result)
    worker.start()
    try:
        worker.submit(make_batch([LOUD]))
        worker.submit(make_batch([QUIET]))
        assert done.wait(WAIT_S)
    finally:
        worker.stop()
    assert len(seen) == 2
    assert worker.stats().callback_failures == 1


def test_state_provider_feeds_state_inputs(state_model: EmotionModel) -> None:
    history = state_model.infer(*pad_batch([tone(2.0, rms=0.003)])).state_updates[STATE_NAME][0]

    def state_for(batch: Batch) -> Mapping[str, Any]:
        return {STATE_NAME: [r.context for r in batch.requests]}

    results = Results()
    worker = InferenceWorker(state_model, results, state_for=state_for)
    worker.start()
    try:
        worker.submit(make_batch([LOUD], context=history))
        worker.submit(make_batch([LOUD], context=None))
        results.wait_for(2)
    finally:
        worker.stop()
    with_history, without = (call[1] for call in results.calls)
    assert with_history is not None and without is not None
    assert LABELS[int(with_history.probs[0].argmax())] == "angry"
    assert LABELS[int(without.probs[0].argmax())] == "neutral"
    assert with_history.state_updates[STATE_NAME].shape == (1, 3)


def test_bad_max_queue() -> None:
    with pytest.raises(ValueError):
        InferenceWorker(object(), lambda *a: None, max_queue=0)  # type: ignore[arg-type]


def test_start_twice_is_an_error(model: EmotionModel) -> None:
    worker = InferenceWorker(model, Results())
    worker.start()
    try:
        with pytest.raises(RuntimeError, match="already started"):
            worker.start()
    finally:
        worker.stop()


def test_a_window_the_model_fails_on_does_not_take_its_batch_mates_down(tmp_path) -> None:
    """A real model that gives NaN on quiet audio: the loud windows batched with a quiet one still get results."""
    from tests.modelfactory import model_failing_on_quiet_audio

    path = model_failing_on_quiet_audio(build_test_model(tmp_path / "plain.onnx"), tmp_path / "poisoned.onnx")
    poisoned = EmotionModel.load(path, device="cpu", threads=1)
    results = Results()
    worker = InferenceWorker(poisoned, results)
    worker.start()
    try:
        loud = tone(0.5, rms=0.5)  # peaks above 0.5: finite outputs
        assert worker.submit(make_batch([loud, QUIET, loud]))
        results.wait_for(3)
    finally:
        worker.stop()
    rows = [(batch.requests[0].window.utterance, output is not None, error) for batch, output, error in results.calls]
    assert [(i, ok) for i, ok, _ in rows] == [(0, True), (1, False), (2, True)]
    assert rows[1][2] is not None  # the first failure of its kind is reported with its message
    stats = worker.stats()
    assert stats.batches_split == 1 and stats.failures == 1 and stats.windows == 3
    for batch, output, _ in results.calls:
        if output is not None:
            assert batch.size == 1 and np.all(np.isfinite(output.probs))


def test_observe_hears_each_batch_that_ran_and_its_failure_loses_nothing(model: EmotionModel) -> None:
    """The metrics hook (serstream/metrics.py's batch histograms): successful batches only, never fatal."""
    heard: list[tuple[int, float]] = []

    def observe(size: int, seconds: float) -> None:
        heard.append((size, seconds))
        if len(heard) == 2:
            raise RuntimeError("metrics bug")

    results = Results()
    worker = InferenceWorker(ExplodingBackend(model), results, observe=observe)
    worker.start()
    try:
        for batch in (make_batch([LOUD, QUIET]), make_batch([np.full(100, 0.5, np.float32)]), make_batch([QUIET]),
                      make_batch([LOUD, LOUD, QUIET])):
            assert worker.submit(batch)
        results.wait_for(4)
    finally:
        worker.stop()
    assert [size for size, _ in heard] == [2, 1, 3]  # the exploding batch is not a timing
    assert all(0 <= seconds < WAIT_S for _, seconds in heard)
    assert [output is not None for _, output, _ in results.calls] == [True, False, True, True]
    stats = worker.stats()
    assert stats.observe_failures == 1 and stats.callback_failures == 0


class CountingGate:
    """Each infer call waits until ``release``; counts how many calls are inside at once."""

    def __init__(self, inner: EmotionModel) -> None:
        self.inner = inner
        self.info = inner.info
        self.device = inner.device
        self.release = threading.Event()
        self._lock = threading.Lock()
        self.inside = 0
        self.most_inside = 0
        self.two_inside = threading.Event()

    def infer(self, audio: np.ndarray, lengths: np.ndarray, state: Any = None) -> InferenceOutput:
        with self._lock:
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
            if self.inside >= 2:
                self.two_inside.set()
        try:
            assert self.release.wait(WAIT_S)
            return self.inner.infer(audio, lengths, state)
        finally:
            with self._lock:
                self.inside -= 1


def test_concurrency_runs_that_many_batches_at_once_and_loses_none(model: EmotionModel) -> None:
    backend = CountingGate(model)
    results = Results()
    worker = InferenceWorker(backend, results, max_queue=4, concurrency=2)
    worker.start()
    try:
        batches = [make_batch([LOUD] * (i + 1)) for i in range(4)]
        for batch in batches:
            assert worker.submit(batch)
        assert backend.two_inside.wait(WAIT_S)  # two batches inside the model at once ...
        assert worker.idle is False
    finally:
        backend.release.set()
        worker.stop(drain=True)
    results.wait_for(4)
    assert backend.most_inside == 2  # ... and never more than two
    assert sorted(len(call[0].requests) for call in results.calls) == [1, 2, 3, 4]
    assert all(call[1] is not None and call[2] is None for call in results.calls)
    stats = worker.stats()
    assert stats.batches == 4 and stats.windows == 10 and stats.dropped_batches == 0
    assert worker.idle and not worker.running


def test_bad_concurrency() -> None:
    with pytest.raises(ValueError, match="concurrency"):
        InferenceWorker(object(), lambda *a: None, concurrency=0)  # type: ignore[arg-type]
