"""The cluster's pure parts: a batch split into stateless window requests and back, the retry rule and breaker.

No Ray here (tests/test_ray_cluster.py runs the real cluster). The round
trip goes through a real ONNX model: the batch run whole must equal the
windows run one by one and stacked back, state rows included.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from serstream.cluster.connect import ClusterConfig, parse_address
from serstream.cluster.policy import Failure, RequestPolicy
from serstream.cluster.wire import join_results, result_rows, split_batch
from serstream.inference.session import EmotionModel, pad_batch
from tests.audio import speech_with_pauses


@pytest.fixture(scope="module")
def model(state_model: Path) -> EmotionModel:
    return EmotionModel.load(state_model, device="cpu", threads=1)


def test_windows_one_by_one_equal_the_whole_batch(model: EmotionModel) -> None:
    (spec,) = model.state_inputs
    rows = [speech_with_pauses(((0.1, 0.8),), tail_s=0.1, seed=i)[: 8000 + 1600 * i] for i in range(3)]
    audio, lengths = pad_batch(rows)
    state = {spec.name: [None, np.full(spec.width, 0.5, np.float32), None]}
    whole = model.infer(audio, lengths, state)

    requests = split_batch(audio, lengths, state, model.state_inputs)
    assert [r.audio.size for r in requests] == [int(n) for n in lengths]  # cut to each window's own length
    assert requests[0].state[spec.name] is None and requests[2].state[spec.name] is None
    assert np.array_equal(requests[1].state[spec.name], state[spec.name][1])

    results = []
    for request in requests:
        alone = model.infer(request.audio[None, :], np.array([request.audio.size]),
                            {name: [row] for name, row in request.state.items()})
        results.extend(result_rows(alone, replica="r", node="n"))
    joined = join_results(results, model.state_inputs)
    np.testing.assert_allclose(joined.probs, whole.probs, atol=1e-6)
    np.testing.assert_allclose(joined.avd, whole.avd, atol=1e-6)
    np.testing.assert_allclose(joined.gender_probs, whole.gender_probs, atol=1e-6)
    np.testing.assert_allclose(joined.state_updates[spec.name], whole.state_updates[spec.name], atol=1e-5)
    # The state really travelled: the row with state differs from the same audio without it.
    bare = model.infer(requests[1].audio[None, :], np.array([requests[1].audio.size]))
    assert not np.allclose(bare.probs[0], joined.probs[1], atol=1e-5)


def test_split_refuses_inconsistent_batches(model: EmotionModel) -> None:
    (spec,) = model.state_inputs
    audio = np.zeros((2, 100), np.float32)
    with pytest.raises(ValueError, match="lengths must lie"):
        split_batch(audio, np.array([100, 101]), None, model.state_inputs)
    with pytest.raises(ValueError, match="2 rows|1 rows"):
        split_batch(audio, np.array([100, 50]), {spec.name: [None]}, model.state_inputs)
    with pytest.raises(ValueError, match="non-empty"):
        split_batch(np.zeros((0, 5), np.float32), np.zeros(0, np.int64), None, ())
    with pytest.raises(ValueError, match="at least one"):
        join_results([], ())


def test_a_lost_replica_is_retried_once_a_bad_window_never() -> None:
    policy = RequestPolicy(max_retries=1)
    assert policy.should_retry(Failure.REPLICA, 0)
    assert not policy.should_retry(Failure.REPLICA, 1)
    for kind in (Failure.MODEL, Failure.TIMEOUT, Failure.UNAVAILABLE):
        assert not policy.should_retry(kind, 0), kind


def test_breaker_fails_fast_after_a_timeout_and_probes_after_the_cooldown() -> None:
    policy = RequestPolicy(threshold=2, cooldown_s=5.0)
    policy.failed(Failure.MODEL, 0.0, "bad window")
    policy.failed(Failure.REPLICA, 0.0, "replica lost")
    assert policy.allow(0.0) and not policy.open  # the cluster answered: nothing to open for
    policy.failed(Failure.TIMEOUT, 1.0, "no answer")
    assert policy.allow(1.0)  # one of two
    policy.failed(Failure.UNAVAILABLE, 2.0, "cluster unavailable: ConnectionError")
    assert not policy.allow(2.0) and not policy.allow(6.9)
    assert policy.reason == "cluster unavailable: ConnectionError"
    assert policy.retry_in(4.0) == pytest.approx(3.0)
    assert policy.allow(7.0)  # the probe
    policy.failed(Failure.TIMEOUT, 8.0, "no answer")
    assert not policy.allow(8.5)  # the probe failed: open again at once
    policy.succeeded()
    assert policy.allow(8.5) and not policy.open and policy.retry_in(8.5) == 0.0


def test_policy_and_config_refuse_bad_settings() -> None:
    with pytest.raises(ValueError, match="threshold"):
        RequestPolicy(threshold=0)
    with pytest.raises(ValueError, match="max_retries"):
        RequestPolicy(max_retries=-1)
    with pytest.raises(ValueError, match="--max-replicas"):
        ClusterConfig(replicas=3, max_replicas=2)
    with pytest.raises(ValueError, match="--num-gpus above 0"):
        ClusterConfig(device="cuda")
    with pytest.raises(ValueError, match="--num-cpus or --num-gpus"):
        ClusterConfig(num_cpus=0)
    with pytest.raises(ValueError, match="--num-cpus must be a number"):
        ClusterConfig(num_cpus=float("nan"))
    assert ClusterConfig(replicas=2, max_replicas=4).autoscaling
    assert not ClusterConfig(replicas=2, max_replicas=2).autoscaling


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("local", ("local", None, None)),
        ("auto", ("auto", None, None)),
        ("ray://head.example:10001", ("client", "head.example", 10001)),
        ("10.0.0.5:6379", ("gcs", "10.0.0.5", 6379)),
        ("ray://[::1]:10001", ("client", "::1", 10001)),
    ],
)
def test_addresses(text: str, want: tuple[str, str | None, int | None]) -> None:
    assert parse_address(text) == want


@pytest.mark.parametrize("text", ["", "head", "ray://head", "http://head:80", "head:0", "head:99999", "ray://:10001"])
def test_bad_addresses_are_one_line(text: str) -> None:
    with pytest.raises(ValueError, match="expected local, auto, HOST:PORT or ray://HOST:PORT"):
        parse_address(text)
