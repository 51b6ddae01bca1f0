"""Inference on a real two-node Ray cluster: same finals as in process, a replica killed mid-run, bad input.

One module-scoped cluster (``ray.cluster_utils.Cluster``: a head and one
worker node, 2 CPUs each, CPU only, no dashboard, 100 MiB object stores)
with the inference deployed on two replicas of one CPU each, so Serve
spreads them over the two nodes. The replicas batch for up to 0.4 s: slow
enough that a window is still waiting on a replica when the test kills it.

Espeak-ng streams go through the real :class:`~serstream.monitor.Monitor` on
the :class:`~serstream.cluster.backend.ServeBackend`; the model is the test
factory model with a state input, so a window run without its stream's
state would give a different reading. Ray starts slowly on a shared machine:
the whole module took about 70 s on a 2-core machine shared with other jobs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import soundfile as sf

ray = pytest.importorskip("ray", reason='needs Ray (pip install "serstream[ray]"; the test extra brings it)')

from ray.cluster_utils import Cluster  # noqa: E402

from serstream.analyze import StreamSpec, analyze  # noqa: E402
from serstream.cluster.backend import ServeBackend  # noqa: E402
from serstream.cluster.connect import ClusterConfig, ClusterSession, deploy, deployment_options  # noqa: E402
from serstream.cluster.deployment import InferenceDeployment  # noqa: E402
from serstream.cluster.policy import RequestPolicy  # noqa: E402
from serstream.errors import InferenceError  # noqa: E402
from serstream.inference.session import EmotionModel, pad_batch  # noqa: E402
from serstream.monitor import Monitor, MonitorConfig  # noqa: E402
from tests.audio import SAMPLE_RATE, espeak_sentences  # noqa: E402
from tests.conftest import ensure_ray_address_folder, require_tools, serstream_command  # noqa: E402

# Ray Serve's pydantic models warn on import (PydanticDeprecatedSince20); not ours to fix.
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

CHUNK = 320
APP = "serstream-test"
DEPLOYMENT = "SerstreamInference"

STREAMS = {
    "alice": ("Good morning, I would like to check on my order.", "Thank you, that is all."),
    "bob": ("This is the third time I have called today!", "Nobody has helped me at all."),
    "carol": ("Could you tell me when the parcel arrives?", "That is fine, goodbye."),
}


@pytest.fixture(scope="module")
def wavs(audio_dir: Path) -> dict[str, Path]:
    require_tools("espeak-ng", "sox")
    return {sid: espeak_sentences(audio_dir / f"ray-{sid}.wav", text, pause_s=0.7) for sid, text in STREAMS.items()}


@pytest.fixture(scope="module")
def local_model(state_model: Path) -> EmotionModel:
    return EmotionModel.load(state_model, device="cpu", threads=1)


@pytest.fixture(scope="module")
def want(local_model: EmotionModel, wavs: dict[str, Path]) -> dict[str, list[dict[str, Any]]]:
    """Each stream's finals from the in-process model (``analyze``, the reference)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for sid, path in wavs.items():
        events: list[dict[str, Any]] = []
        analyze(local_model, [StreamSpec(sid, (path,))], events.append)
        out[sid] = finals_of(events, sid)
        assert len(out[sid]) == len(STREAMS[sid]), sid
    return out


@pytest.fixture(scope="module")
def cluster(state_model: Path) -> Iterator[tuple[Cluster, ClusterSession]]:
    # A short private temp dir: Ray's socket paths must stay under 108 bytes.
    temp = tempfile.mkdtemp(prefix="sr", dir="/tmp")
    ensure_ray_address_folder()
    node = {"num_cpus": 2, "object_store_memory": 100 * 1024 * 1024, "temp_dir": temp}
    ray_cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    session: ClusterSession | None = None
    try:
        ray_cluster.add_node(**node)
        config = ClusterConfig(address=ray_cluster.address, replicas=2, num_cpus=1.0, max_batch=16,
                               batch_wait_s=0.4, request_timeout_s=30.0, deploy_timeout_s=300.0, app=APP)
        session = deploy(state_model, config)
        yield ray_cluster, session
    finally:
        if session is not None:
            session.close()
        ray_cluster.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def finals_of(events: list[dict[str, Any]], stream: str) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == "emotion" and e["stream"] == stream and e["kind"] == "final"]


def assert_same_finals(got: list[dict[str, Any]], want: list[dict[str, Any]], how: str) -> None:
    assert len(got) == len(want), (how, len(got), len(want))
    for g, w in zip(got, want, strict=True):
        assert (g["utterance"], g["t0"], g["t1"], g["label"]) == (w["utterance"], w["t0"], w["t1"], w["label"]), how
        np.testing.assert_allclose(list(g["probs"].values()), list(w["probs"].values()), atol=1e-5, err_msg=how)
        for key in ("arousal", "valence", "dominance"):
            assert abs(g[key] - w[key]) <= 1e-5, (how, key)


def run_streams(backend: Any, wavs: dict[str, Path]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every wav as its own stream, pushed as fast as the rings take it; (events, monitor stats) at the end."""
    events: list[dict[str, Any]] = []
    lock = threading.Lock()

    def sink(event: dict[str, Any]) -> None:
        with lock:
            events.append(event)

    monitor = Monitor(backend, MonitorConfig(max_batch=8, close_timeout_s=60.0), sink)
    monitor.add_stats_provider(backend.counters)  # as `serstream cluster` does
    monitor.start()
    try:
        def push(sid: str, path: Path) -> None:
            audio, rate = sf.read(str(path), dtype="float32")
            assert rate == SAMPLE_RATE
            handle = monitor.open_stream(sid, source="file", codec="pcm_f32", sample_rate=SAMPLE_RATE, channels=1)
            for start in range(0, audio.size, CHUNK):
                assert handle.wait_for_space(CHUNK, timeout=60)
                handle.push(audio[start:start + CHUNK])
            handle.close(reason="end")

        pushers = [threading.Thread(target=push, args=item, daemon=True) for item in wavs.items()]
        for thread in pushers:
            thread.start()
        for thread in pushers:
            thread.join(120)
        deadline = time.monotonic() + 120
        while True:
            with lock:
                closed = {e["stream"] for e in events if e["type"] == "stream" and e.get("state") == "closed"}
            if closed >= set(wavs):
                break
            assert time.monotonic() < deadline, f"streams did not close: {set(wavs) - closed}"
            time.sleep(0.05)
        stats = monitor.stats()
    finally:
        monitor.stop(drain=False)
    return events, stats


def test_an_unreachable_head_is_one_line_and_exit_2(free_port: int, speech_wav: Path) -> None:
    began = time.monotonic()
    proc = subprocess.run(
        [*serstream_command(), "cluster", "--address", f"ray://127.0.0.1:{free_port}", "--file", str(speech_wav)],
        capture_output=True, text=True, timeout=60,
    )
    took = time.monotonic() - began
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"serstream: error: cannot reach the Ray head at ray://127.0.0.1:{free_port}: "
                     "Connection refused (is `ray start --head` running there, and the port open?)"], proc.stderr
    assert took < 15, took


def test_serve_takes_the_deployment_options_as_meant() -> None:
    # Serve validates the options but ignores unknown keys: read back what it made of each.
    fixed = InferenceDeployment.options(**deployment_options(ClusterConfig(replicas=3, num_cpus=0.5, max_batch=8)))
    assert fixed.num_replicas == 3
    assert fixed.ray_actor_options == {"num_cpus": 0.5, "num_gpus": 0.0}
    assert fixed.max_ongoing_requests == 16  # room for two full batches
    scaled = InferenceDeployment.options(**deployment_options(
        ClusterConfig(replicas=2, max_replicas=5, target_ongoing_requests=4, num_gpus=0.25)))
    auto = scaled._deployment_config.autoscaling_config  # no public reader in Serve 2.60
    assert (auto.min_replicas, auto.initial_replicas, auto.max_replicas, auto.target_ongoing_requests) == (2, 2, 5, 4)
    assert scaled.ray_actor_options["num_gpus"] == 0.25


def test_a_missing_file_is_refused_before_any_cluster_is_touched(tmp_path: Path) -> None:
    began = time.monotonic()
    # "local" would start Ray: the file check must come first.
    proc = subprocess.run([*serstream_command(), "cluster", "--address", "local", "--file", str(tmp_path / "no.wav")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"serstream: error: audio file not found: {tmp_path / 'no.wav'}"]
    assert time.monotonic() - began < 15


def test_finals_over_two_nodes_equal_the_in_process_model(
    cluster: tuple[Cluster, ClusterSession], wavs: dict[str, Path], want: dict[str, list[dict[str, Any]]]
) -> None:
    backend = cluster[1].backend
    assert backend.info.state_inputs, "the test needs a model with a state input"
    events, stats = run_streams(backend, wavs)
    for sid in wavs:
        assert_same_finals(finals_of(events, sid), want[sid], sid)
    assert stats["drops"]["inference_failures"] == 0
    assert stats["drops"]["finals_dropped"] == 0
    nodes, replicas = backend.served_by()
    # Both replicas served windows, on the two different nodes (Serve spreads a deployment's replicas).
    assert len(replicas) == 2, replicas
    assert len(nodes) == 2, nodes


def test_a_replica_that_raises_is_one_line_and_the_others_go_on(
    cluster: tuple[Cluster, ClusterSession], local_model: EmotionModel
) -> None:
    backend = cluster[1].backend
    (spec,) = backend.info.state_inputs
    audio, lengths = pad_batch([np.full(8000, 0.1, np.float32), np.full(6000, -0.1, np.float32)])
    bad_state = {spec.name: [None, np.zeros(spec.width + 3, np.float32)]}  # the replica's model refuses the row
    before = backend.counters().get("cluster_model_errors", 0)
    with pytest.raises(InferenceError) as caught:
        backend.infer(audio, lengths, bad_state)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("replica failed on a window: ValueError: state"), message
    assert backend.counters()["cluster_model_errors"] == before + 1
    # The same replicas still serve, with the right numbers.
    good = backend.infer(audio, lengths, {spec.name: [None, None]})
    np.testing.assert_allclose(good.probs, local_model.infer(audio, lengths).probs, atol=1e-5)


def test_no_answer_in_time_fails_fast_and_the_streams_go_on(
    cluster: tuple[Cluster, ClusterSession], wavs: dict[str, Path]
) -> None:
    base = cluster[1].backend
    # The replicas wait 0.4 s for fuller batches: a 50 ms timeout is a cluster that does not answer in time.
    slow = ServeBackend(base.handle, base.info, base.device, base.path, timeout_s=0.05,
                        policy=RequestPolicy(cooldown_s=30.0))
    audio, lengths = pad_batch([np.full(8000, 0.1, np.float32), np.full(4000, 0.2, np.float32)])
    with pytest.raises(InferenceError, match="^no answer from the inference cluster in time$"):
        slow.infer(audio, lengths)
    began = time.monotonic()
    with pytest.raises(InferenceError) as caught:
        slow.infer(audio, lengths)
    assert time.monotonic() - began < 0.05  # the breaker: no second wait
    assert str(caught.value) == ("no answer from the inference cluster in time "
                                 "(not asking the cluster for 30 s after each failure)")
    assert slow.counters()["cluster_timeouts"] >= 1 and slow.counters()["cluster_refused_batches"] == 1
    assert not slow.answering

    # Through the monitor: the stream still opens, speaks and closes; the lost windows are counted and
    # reported once per distinct message, on the stats stream.
    events, stats = run_streams(slow, {"alice": wavs["alice"]})
    kinds = [e["type"] for e in events if e.get("stream") == "alice"]
    assert kinds[0] == "stream" and kinds[-1] == "stream" and "speech" in kinds and "emotion" not in kinds
    errors = [e for e in events if e["type"] == "error"]
    assert errors and all(e["code"] == "inference_error" and e["stream"] == "*" for e in errors)
    assert len(errors) == len({e["message"] for e in errors}) == 1, errors
    assert stats["drops"]["inference_failures"] >= 1
    assert stats["drops"]["cluster_refused_batches"] > 1
    # The deployment itself is unharmed: the normal backend still answers.
    assert base.infer(audio, lengths).probs.shape[0] == 2


class KillDuringBatch:
    """Delegates to a ServeBackend; during its ``at_call``-th batch, kills a replica that holds windows of it.

    The replicas wait up to 0.4 s for fuller batches, so the batch's windows
    sit on a replica for a while; the killer asks each replica actor for its
    ongoing requests (Serve's own queue-length call) and kills the first one
    that has some, so the kill lands mid-request on purpose, not by luck.
    """

    def __init__(self, backend: ServeBackend, at_call: int) -> None:
        self.backend, self.at_call = backend, at_call
        self.info, self.device, self.path = backend.info, backend.device, backend.path
        self.counters = backend.counters
        self.calls = 0
        self.killed: str | None = None
        self.kill_error: BaseException | None = None

    def infer(self, audio: np.ndarray, lengths: np.ndarray, state: Any = None) -> Any:
        self.calls += 1
        if self.calls == self.at_call:
            threading.Thread(target=self._kill, daemon=True).start()
        return self.backend.infer(audio, lengths, state)

    def _kill(self) -> None:
        try:
            actors = {rid: ray.get_actor(f"SERVE_REPLICA::{APP}#{DEPLOYMENT}#{rid}", namespace="serve")
                      for rid in self.backend.served_by()[1]}
            deadline = time.monotonic() + 0.35
            while time.monotonic() < deadline and self.killed is None:
                for rid, actor in actors.items():
                    if ray.get(actor.get_num_ongoing_requests.remote(), timeout=2) > 0:
                        ray.kill(actor)
                        self.killed = rid
                        break
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.kill_error = exc


def test_a_replica_killed_mid_run_costs_a_retry_not_a_stream(
    cluster: tuple[Cluster, ClusterSession], wavs: dict[str, Path], want: dict[str, list[dict[str, Any]]]
) -> None:
    backend = cluster[1].backend
    # Both replicas have served (so the killer knows their ids), whichever test ran before.
    for _ in range(5):
        audio, lengths = pad_batch([np.full(4000 + 800 * i, 0.1, np.float32) for i in range(4)])
        backend.infer(audio, lengths)
        if len(backend.served_by()[1]) == 2:
            break
    assert len(backend.served_by()[1]) == 2, backend.served_by()
    before = backend.counters()
    killer = KillDuringBatch(backend, at_call=2)
    events, stats = run_streams(killer, wavs)
    assert killer.killed is not None, (killer.kill_error, killer.calls)
    after = backend.counters()
    assert after.get("cluster_replica_lost", 0) > before.get("cluster_replica_lost", 0), (after, backend.served_by())
    assert after.get("cluster_retries", 0) > before.get("cluster_retries", 0), after
    assert stats["drops"]["inference_failures"] == 0, stats["drops"]
    assert stats["drops"]["cluster_replica_lost"] >= 1  # the kill is in the monitor's counters too
    for sid in wavs:
        assert_same_finals(finals_of(events, sid), want[sid], f"{sid}, replica killed")


def test_the_cluster_command_end_to_end(
    cluster: tuple[Cluster, ClusterSession], wavs: dict[str, Path], state_model: Path,
    want: dict[str, list[dict[str, Any]]],
) -> None:
    ray_cluster = cluster[0]
    env = dict(os.environ)
    proc = subprocess.run(
        [*serstream_command(), "cluster", "--address", ray_cluster.address, "--app", "serstream-cli",
         "--replicas", "1", "--num-cpus", "1", "--model", str(state_model), "--port", "0",
         "--file", str(wavs["alice"]), "--file", str(wavs["bob"]), "--fast", "--exit-when-done", "--json"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    for sid in ("alice", "bob"):
        assert_same_finals(finals_of(events, f"file:ray-{sid}.wav"), want[sid], f"cli {sid}")
    assert "on Ray " in proc.stderr and "1 replica(s)" in proc.stderr, proc.stderr[-2000:]
