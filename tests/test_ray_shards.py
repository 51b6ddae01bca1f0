"""``serstream cluster --shards N`` on a real two-node Ray cluster: pipeline shards as actors on both nodes.

One module-scoped cluster (``ray.cluster_utils.Cluster``: a head and one
worker node, 2 CPUs each, CPU only, no dashboard, 100 MiB object stores),
the inference deployed on two replicas of one CPU (one per node), and two
shard actors of one CPU each, so the SPREAD strategy (and the CPUs left)
puts one shard on each node. Espeak-ng streams go through the public
process's pool (``shard_pool``: the ``WorkerPool`` with Ray links) into one
sink: every stream's finals equal the in-process model's; a shard killed
with ``ray.kill`` mid-run reports its streams (``worker_lost``, closed,
reopened on the recreated shard) while the other shard's stream goes on.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest
import soundfile as sf

ray = pytest.importorskip("ray", reason='needs Ray (pip install "serstream[ray]"; the test extra brings it)')

from ray.cluster_utils import Cluster  # noqa: E402

from serstream.analyze import StreamSpec, analyze  # noqa: E402
from serstream.cluster.connect import ClusterConfig, ClusterSession, deploy  # noqa: E402
from serstream.cluster.shards import placement, shard_pool  # noqa: E402
from serstream.inference.session import EmotionModel  # noqa: E402
from serstream.monitor import MonitorConfig  # noqa: E402
from serstream.workers.pool import WORKER_LOST  # noqa: E402
from tests.audio import SAMPLE_RATE, espeak_sentences  # noqa: E402
from tests.conftest import ensure_ray_address_folder, require_tools, serstream_command  # noqa: E402

# Ray Serve's pydantic models warn on import (PydanticDeprecatedSince20); not ours to fix.
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

CHUNK = 320
APP = "serstream-shards-test"

STREAMS = {
    "alice": ("Good morning, I would like to check on my order.", "Thank you, that is all."),
    "bob": ("This is the third time I have called today!", "Nobody has helped me at all."),
    "carol": ("Could you tell me when the parcel arrives?", "That is fine, goodbye."),
}


@pytest.fixture(scope="module")
def wavs(audio_dir: Path) -> dict[str, Path]:
    require_tools("espeak-ng", "sox")
    return {sid: espeak_sentences(audio_dir / f"shard-{sid}.wav", text, pause_s=0.7) for sid, text in STREAMS.items()}


@pytest.fixture(scope="module")
def want(state_model: Path, wavs: dict[str, Path]) -> dict[str, list[dict[str, Any]]]:
    """Each stream's finals from the in-process model (``analyze``, the reference)."""
    model = EmotionModel.load(state_model, device="cpu", threads=1)
    out: dict[str, list[dict[str, Any]]] = {}
    for sid, path in wavs.items():
        events: list[dict[str, Any]] = []
        analyze(model, [StreamSpec(sid, (path,))], events.append)
        out[sid] = finals_of(events, sid)
        assert len(out[sid]) == len(STREAMS[sid]), sid
    return out


@pytest.fixture(scope="module")
def cluster(state_model: Path) -> Iterator[tuple[Cluster, ClusterSession]]:
    # A short private temp dir: Ray's socket paths must stay under 108 bytes.
    temp = tempfile.mkdtemp(prefix="ss", dir="/tmp")
    ensure_ray_address_folder()
    node = {"num_cpus": 2, "object_store_memory": 100 * 1024 * 1024, "temp_dir": temp}
    ray_cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    session: ClusterSession | None = None
    try:
        ray_cluster.add_node(**node)
        config = ClusterConfig(address=ray_cluster.address, replicas=2, num_cpus=1.0, max_batch=16,
                               batch_wait_s=0.005, request_timeout_s=30.0, deploy_timeout_s=300.0, app=APP)
        session = deploy(state_model, config)
        yield ray_cluster, session
    finally:
        if session is not None:
            session.close()
        ray_cluster.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def finals_of(events: list[dict[str, Any]], stream: str) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == "emotion" and e["stream"] == stream and e["kind"] == "final"]


class Sink:
    """The public process's sink: every event of every shard, in arrival order."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def __call__(self, event: dict[str, Any]) -> None:
        with self.lock:
            self.events.append(event)

    def snapshot(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.events)

    def wait_for(self, what: Callable[[list[dict[str, Any]]], bool], timeout: float, why: str) -> None:
        deadline = time.monotonic() + timeout
        while not what(self.snapshot()):
            assert time.monotonic() < deadline, why
            time.sleep(0.05)


def push_file(pool: Any, sid: str, path: Path, *, loops: int = 1, pace: float = 0.0) -> None:
    """A file stream as the file source makes it; ``pace`` > 0: about that many times real time."""
    audio, rate = sf.read(str(path), dtype="float32")
    assert rate == SAMPLE_RATE
    handle = pool.open_stream(sid, source="file", codec="pcm_f32", sample_rate=SAMPLE_RATE, channels=1)
    for _ in range(loops):
        for start in range(0, audio.size, CHUNK):
            assert handle.wait_for_space(CHUNK, timeout=60)
            handle.push(audio[start:start + CHUNK])
            if pace:
                time.sleep(CHUNK / SAMPLE_RATE / pace)
    handle.close(reason="end")


def test_streams_on_two_shards_on_two_nodes_reach_one_sink_with_the_in_process_finals(
    cluster: tuple[Cluster, ClusterSession], wavs: dict[str, Path], want: dict[str, list[dict[str, Any]]]
) -> None:
    backend = cluster[1].backend
    sink = Sink()
    pool = shard_pool(backend, MonitorConfig(max_batch=8, close_timeout_s=60.0), sink, shards=2, app=APP,
                      num_cpus=1.0, request_timeout_s=30.0, start_timeout_s=120.0)
    pool.start()
    try:
        nodes = placement(pool)
        assert all(nodes) and len(set(nodes)) == 2, nodes  # SPREAD: one shard per node
        pushers = [threading.Thread(target=push_file, args=(pool, sid, path), daemon=True)
                   for sid, path in wavs.items()]
        for thread in pushers:
            thread.start()
            time.sleep(0.3)  # opened in order: alice -> shard 0, bob -> shard 1, carol -> shard 0
        for thread in pushers:
            thread.join(120)
        sink.wait_for(lambda ev: {e["stream"] for e in ev if e["type"] == "stream" and e.get("state") == "closed"}
                      >= set(wavs), 120, "streams did not close")
        stats = pool.stats()
    finally:
        pool.stop(drain=False)
    events = sink.snapshot()
    for sid in wavs:
        got, ref = finals_of(events, sid), want[sid]
        assert len(got) == len(ref), (sid, len(got), len(ref))
        for g, w in zip(got, ref, strict=True):
            assert (g["utterance"], g["t0"], g["t1"], g["label"]) == (w["utterance"], w["t0"], w["t1"], w["label"])
            np.testing.assert_allclose(list(g["probs"].values()), list(w["probs"].values()), atol=1e-5)
        ours = [e for e in events if e.get("stream") == sid and e["type"] in ("stream", "emotion")]
        assert ours[0]["state"] == "open" and ours[-1]["state"] == "closed", sid  # order kept per stream
        assert [e["seq"] for e in ours if e["type"] == "emotion"] == sorted(e["seq"] for e in ours
                                                                            if e["type"] == "emotion")
    assert not [e for e in events if e["type"] == "error"], [e for e in events if e["type"] == "error"]
    assert stats["drops"]["inference_failures"] == 0 and stats["drops"]["worker_lost"] == 0
    # Latency counts from this process's push (arrival times moved onto each shard's clock): above 0, sane.
    assert 0 < stats["latency_ms"]["p50"] < 20_000, stats["latency_ms"]
    # The shards' own batches (on Serve) are what stats reports, summed over both shards.
    assert stats["batches"]["count"] > 0 and stats["windows"] >= sum(len(v) for v in want.values())
    assert stats["workers"]["count"] == 2 and stats["workers"]["alive"] == 2


def test_a_killed_shard_reports_its_streams_comes_back_and_the_other_shard_goes_on(
    cluster: tuple[Cluster, ClusterSession], wavs: dict[str, Path]
) -> None:
    backend = cluster[1].backend
    sink = Sink()
    pool = shard_pool(backend, MonitorConfig(max_batch=8, close_timeout_s=60.0), sink, shards=2, app=APP,
                      num_cpus=1.0, request_timeout_s=30.0, start_timeout_s=120.0)
    pool.start()
    try:
        first_actor = pool._slots[0].link.actor
        # "doomed" on shard 0, "steady" on shard 1; both speak for a while at about 2x real time.
        doomed = threading.Thread(target=push_file, args=(pool, "doomed", wavs["alice"]),
                                  kwargs={"loops": 6, "pace": 2.0}, daemon=True)
        doomed.start()
        time.sleep(0.3)
        steady = threading.Thread(target=push_file, args=(pool, "steady", wavs["bob"]),
                                  kwargs={"loops": 6, "pace": 2.0}, daemon=True)
        steady.start()
        sink.wait_for(lambda ev: finals_of(ev, "doomed") and finals_of(ev, "steady"), 60, "no finals before the kill")
        assert pool.worker_of("doomed") == 0 and pool.worker_of("steady") == 1
        steady_before = len(finals_of(sink.snapshot(), "steady"))
        killed_at = len(sink.snapshot())
        ray.kill(first_actor)
        sink.wait_for(lambda ev: any(e["type"] == "error" and e.get("code") == WORKER_LOST for e in ev), 30,
                      "the killed shard's stream was not told")
        # The shard comes back (a new actor) and the stream reopens on it with the same id.
        sink.wait_for(lambda ev: any(e["type"] == "stream" and e.get("state") == "open" and e["stream"] == "doomed"
                                     for e in ev[killed_at:]), 120, "the stream did not reopen")
        assert pool._slots[0].link.actor is not first_actor and placement(pool)[0]
        doomed.join(120)
        steady.join(120)
        sink.wait_for(lambda ev: {e["stream"] for e in ev[killed_at:] if e["type"] == "stream"
                                  and e.get("state") == "closed"} >= {"doomed", "steady"}, 120, "streams did not end")
        stats = pool.stats()
    finally:
        pool.stop(drain=False)
    events = sink.snapshot()
    after = events[killed_at:]
    lost = [e for e in after if e["type"] == "error" and e.get("code") == WORKER_LOST]
    assert [e["stream"] for e in lost] == ["doomed"], lost
    assert "shard 0 (actor" in lost[0]["message"] and "died (actor died" in lost[0]["message"], lost[0]["message"]
    assert "reopens on the restarted shard" in lost[0]["message"]
    closed = [e for e in after if e["type"] == "stream" and e.get("state") == "closed" and e["stream"] == "doomed"]
    assert closed[0]["reason"] == "error: worker lost"
    # The reopened stream speaks again on the new shard (finals after its new open event).
    reopened_at = next(i for i, e in enumerate(after) if e["type"] == "stream" and e.get("state") == "open"
                       and e["stream"] == "doomed")
    assert finals_of(after[reopened_at:], "doomed"), "no finals from the recreated shard"
    # The other shard's stream went on: more finals after the kill, no error of its own.
    assert len(finals_of(events, "steady")) > steady_before
    assert not [e for e in events if e["type"] == "error" and e.get("stream") == "steady"]
    assert stats["workers"]["restarts"] == 1 and stats["drops"]["worker_lost"] == 1
    assert stats["drops"]["shards_given_up"] == 0


def test_the_cluster_command_with_shards_end_to_end(
    cluster: tuple[Cluster, ClusterSession], wavs: dict[str, Path], state_model: Path,
    want: dict[str, list[dict[str, Any]]],
) -> None:
    # The fixture's replicas hold 2 of the 4 CPUs: one more replica and two shards of half a CPU fit.
    proc = subprocess.run(
        [*serstream_command(), "cluster", "--address", cluster[0].address, "--app", "serstream-shards-cli",
         "--replicas", "1", "--num-cpus", "0.5", "--shards", "2", "--shard-cpus", "0.5",
         "--model", str(state_model), "--port", "0", "--file", str(wavs["alice"]), "--file", str(wavs["bob"]),
         "--fast", "--exit-when-done", "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    for sid in ("alice", "bob"):
        got, ref = finals_of(events, f"file:shard-{sid}.wav"), want[sid]
        assert [(g["utterance"], g["t0"], g["t1"], g["label"]) for g in got] == \
            [(w["utterance"], w["t0"], w["t1"], w["label"]) for w in ref], sid
    assert "2 pipeline shards (Ray actors)" in proc.stderr, proc.stderr[-2000:]


def test_shard_options_that_cannot_work_are_one_line(speech_wav: Path) -> None:
    for extra, line in (
        (["--shards", "-1"], "serstream: error: --shards must be 0 to 256, got -1"),
        (["--shards", "2", "--workers", "2"],
         "serstream: error: --shards and --workers both split the pipelines: use one (--shards on a cluster)"),
    ):
        proc = subprocess.run([*serstream_command(), "cluster", "--address", "local", "--file", str(speech_wav),
                               *extra], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [line], proc.stderr
