"""``--workers N``: streams on N worker processes, one inference tier, one sink / one ``/events``.

Real spawned processes, the factory ONNX models and made audio (espeak-ng
speech, tests/audio.py). The pool must give each stream the same finals as
the single-process monitor (the order gate fixes readings by the stream), keep
each stream's events in order, survive a worker killed with SIGKILL (its
streams say so and reopen on the restarted worker, the other worker's streams
finish untouched) and leave no process behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import soundfile as sf

from serstream import cli
from serstream.inference.session import EmotionModel, InferenceOutput
from serstream.metrics import scrape
from serstream.monitor import Monitor, MonitorConfig
from serstream.workers.merge import Part, merge_requests, split_output, sum_stats
from serstream.workers.plan import assign_worker, may_reopen, parse_workers, restart_delay
from serstream.workers.pool import WORKER_LOST, WorkerPool
from tests.audio import speech_with_pauses
from tests.e2e.helpers import Background

CHUNK = 320  # 20 ms at 16 kHz


# --------------------------------------------------------------------------- pure rules


def test_parse_workers_counts_auto_and_refuses_nonsense() -> None:
    assert parse_workers("3", cpu_count=8) == 3
    assert parse_workers("auto", cpu_count=6) == 6
    assert parse_workers("AUTO", cpu_count=None) == 1
    for bad in ("0", "-2", "many", "1.5", "100000"):
        with pytest.raises(ValueError, match="--workers"):
            parse_workers(bad, cpu_count=4)


def test_assignment_is_least_loaded_running_worker_ties_by_index() -> None:
    assert assign_worker([0, 0, 0], [True, True, True]) == 0
    assert assign_worker([1, 0, 0], [True, True, True]) == 1
    assert assign_worker([2, 1, 1], [True, True, True]) == 1
    assert assign_worker([0, 5, 3], [False, True, True]) == 2  # a restarting worker takes no stream
    assert assign_worker([0, 0], [False, False]) is None
    with pytest.raises(ValueError):
        assign_worker([0], [True, True])
    # Streams opened one after another spread evenly.
    loads = [0, 0, 0]
    for _ in range(7):
        loads[assign_worker(loads, [True] * 3) or 0] += 1
    assert loads == [3, 2, 2]


def test_reopen_and_restart_rules() -> None:
    assert may_reopen(0, 3, "rtp") and may_reopen(2, 3, "file") and not may_reopen(3, 3, "rtp")
    assert not may_reopen(0, 3, "websocket")  # an /ingest client reconnects instead
    assert restart_delay(0.5) == 1.0  # a crash loop costs one spawn a second
    assert restart_delay(60.0) == 0.0


def test_merge_and_split_keep_each_workers_rows() -> None:
    a = Part(np.ones((2, 5), np.float32), np.array([5, 3]), {"s": [np.full(3, 1.0, np.float32), None]})
    b = Part(np.full((1, 8), 2.0, np.float32), np.array([8]), None)
    audio, lengths, state = merge_requests([a, b])
    assert audio.shape == (3, 8) and lengths.tolist() == [5, 3, 8]
    assert audio[0, :5].tolist() == [1.0] * 5 and audio[0, 5:].tolist() == [0.0] * 3
    assert audio[2].tolist() == [2.0] * 8
    assert state is not None and state["s"][1] is None and state["s"][2] is None
    assert state["s"][0] is not None and float(state["s"][0][0]) == 1.0
    output = InferenceOutput(probs=np.arange(12, dtype=np.float32).reshape(3, 4), avd=np.zeros((3, 3), np.float32),
                             gender_probs=np.zeros((3, 2), np.float32),
                             state_updates={"s": np.arange(9, dtype=np.float32).reshape(3, 3)})
    first, second = split_output(output, [2, 1])
    assert first.probs.tolist() == output.probs[:2].tolist() and second.probs.tolist() == [output.probs[2].tolist()]
    assert second.state_updates["s"].tolist() == [[6.0, 7.0, 8.0]]
    with pytest.raises(ValueError):
        split_output(output, [2, 2])


def test_padding_share_of_a_merged_call() -> None:
    from serstream.workers.merge import padding_share

    partials = Part(np.ones((2, 300), np.float32), np.array([300, 300]), None)
    long_final = Part(np.ones((1, 800), np.float32), np.array([800]), None)
    assert padding_share([partials]) == 0.0
    # Two 3 s rows padded to 8 s: 1000 of 2400 samples padding (the tier keeps them apart).
    assert padding_share([partials, long_final]) == pytest.approx(1.0 - 1400 / 2400)
    assert padding_share([]) == 0.0


def test_sum_stats_adds_counters_of_every_worker() -> None:
    one = {"drops": {"audio_samples": 3, "bad_samples": 1}, "windows": 10, "device": "cpu", "latency": None}
    two = {"drops": {"audio_samples": 4, "finals_dropped": 2}, "windows": 5, "device": "cpu"}
    total = sum_stats([one, two])
    assert total["drops"] == {"audio_samples": 7, "bad_samples": 1, "finals_dropped": 2}
    assert total["windows"] == 15 and total["device"] == "cpu"


def test_workers_flag_defaults_to_one_and_auto_is_one_per_core() -> None:
    parser = cli.build_parser()
    assert parser.parse_args(["serve"]).workers == 1  # the single-process Monitor, no pool
    assert parser.parse_args(["listen", "--workers", "auto"]).workers == max(1, os.cpu_count() or 1)
    assert parser.parse_args(["serve", "--workers", "3"]).workers == 3


def test_workers_flag_bad_value_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    for bad in ("0", "lots"):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["serve", "--workers", bad])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--workers" in err[0] and "Traceback" not in err[0]


# --------------------------------------------------------------------------- the pool in this process


class Collector:
    """A thread-safe sink that can wait for an event."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def __call__(self, event: dict[str, Any]) -> None:
        with self.lock:
            self.events.append(event)

    def of(self, stream: str) -> list[dict[str, Any]]:
        with self.lock:
            return [e for e in self.events if e.get("stream") == stream]

    def wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.02)


def closed_count(collector: Collector, stream: str) -> int:
    return sum(1 for e in collector.of(stream) if e["type"] == "stream" and e["state"] == "closed")


def feed(handles: dict[str, Any], audio: dict[str, np.ndarray], start: int = 0, stop: int | None = None) -> None:
    """Push every stream's audio in 20 ms blocks, round robin, as fast as each ring takes it."""
    end = max(a.shape[0] for a in audio.values()) if stop is None else stop
    for i in range(start, end, CHUNK):
        for sid, handle in handles.items():
            block = audio[sid][i:min(i + CHUNK, end)]
            if block.shape[0]:
                assert handle.wait_for_space(block.shape[0], timeout=30.0), f"{sid}: no space"
                handle.push(block)


def finals(events: list[dict[str, Any]]) -> list[tuple[int, float, float, str, list[float]]]:
    return [(e["utterance"], e["t0"], e["t1"], e["smoothed"]["label"], list(e["probs"].values()))
            for e in events if e["type"] == "emotion" and e["kind"] == "final"]


def assert_in_order(stream_events: list[dict[str, Any]]) -> None:
    """One stream's events as the single-process monitor sends them: open first, closed last, seq rising."""
    assert stream_events[0]["type"] == "stream" and stream_events[0]["state"] == "open"
    assert stream_events[-1]["type"] == "stream" and stream_events[-1]["state"] == "closed"
    seqs = [e["seq"] for e in stream_events if e["type"] == "emotion"]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    states = [e["state"] for e in stream_events if e["type"] == "speech"]
    assert states == ["start", "end"] * (len(states) // 2)


def run_streams(monitor: Any, collector: Collector, audio: dict[str, np.ndarray]) -> dict[str, Any]:
    handles = {sid: monitor.open_stream(sid, source="file", codec="pcm_16", sample_rate=16000, channels=1)
               for sid in audio}
    feed(handles, audio)
    for handle in handles.values():
        handle.close("end of file")
    collector.wait(lambda: all(closed_count(collector, sid) for sid in audio), 90.0, "every stream closed")
    return handles


@pytest.fixture(scope="module")
def state_backend(state_model: Path) -> EmotionModel:
    # The state model makes each final depend on the finals before it: order matters.
    return EmotionModel.load(state_model, device="cpu", threads=1)


def test_streams_on_two_workers_reach_one_sink_with_the_single_process_finals(
    state_backend: EmotionModel, speech_wav: Path
) -> None:
    speech, rate = sf.read(str(speech_wav), dtype="float32")
    assert rate == 16000
    audio = {
        "call-a": speech,
        "call-b": speech_with_pauses(((0.4, 2.0), (0.6, 1.5), (0.3, 2.5)), seed=3),
        "call-c": speech[: speech.shape[0] * 2 // 3],
    }
    config = MonitorConfig(max_batch=4, close_timeout_s=30.0, track_levels=True)

    single = Collector()
    monitor = Monitor(state_backend, config, single)
    monitor.start()
    try:
        run_streams(monitor, single, audio)
    finally:
        monitor.stop()

    pooled = Collector()
    pool = WorkerPool(state_backend, config, pooled, workers=2)
    pool.start()
    pids = pool.worker_pids()
    try:
        assert len(set(pids)) == 2 and all(pid != os.getpid() for pid in pids)
        handles = {sid: pool.open_stream(sid, source="file", codec="pcm_16", sample_rate=16000, channels=1)
                   for sid in audio}
        # Least loaded, ties by index: a, b, c -> workers 0, 1, 0.
        assert [pool.worker_of(sid) for sid in audio] == [0, 1, 0]
        feed(handles, audio)
        # The console's level meter: every stream's level, reported by its worker.
        pooled.wait(lambda: set(pool.levels()) == set(audio), 10.0, "levels of every stream")
        assert all(0.0 <= level <= 1.0 for level in pool.levels().values())
        for handle in handles.values():
            handle.close("end of file")
        pooled.wait(lambda: all(closed_count(pooled, sid) for sid in audio), 90.0, "every stream closed")
    finally:
        pool.stop()
    stats = pool.stats()  # each worker's last figures came up before it said goodbye

    for sid in audio:
        assert_in_order(pooled.of(sid))
        expected, got = finals(single.of(sid)), finals(pooled.of(sid))
        assert len(expected) >= 2, f"{sid}: the audio should give several utterances"
        assert [g[:4] for g in got] == [e[:4] for e in expected], sid
        for g, e in zip(got, expected):
            np.testing.assert_allclose(g[4], e[4], atol=1e-6, err_msg=sid)
        assert not [e for e in pooled.of(sid) if e["type"] == "error"]
    # The stats see every stream of every worker.
    assert stats["audio_samples"] == sum(a.shape[0] for a in audio.values())
    assert stats["drops"]["worker_audio_samples"] == 0 and stats["drops"]["worker_lost"] == 0
    assert stats["events"] == sum(1 for e in pooled.events if e["type"] == "emotion")
    assert stats["batches"]["count"] > 0 and stats["workers"]["count"] == 2
    assert [e for e in pooled.events if e["type"] == "stats"], "the pool sends its own stats event"
    # /metrics of the pool: the latency histograms count every worker's estimates.
    text = scrape(pool)
    finals_seen = sum(1 for e in pooled.events if e["type"] == "emotion" and e["kind"] == "final")
    partials_seen = stats["events"] - finals_seen
    assert f"serstream_final_latency_seconds_count {float(finals_seen)}" in text
    assert f"serstream_partial_latency_seconds_count {float(partials_seen)}" in text
    assert "serstream_worker_restarts_total 0.0" in text
    assert not multiprocessing.active_children()
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists()


def test_a_killed_worker_is_restarted_and_its_streams_say_so(
    factory_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    backend = EmotionModel.load(factory_model, device="cpu", threads=1)
    speech = speech_with_pauses(((0.3, 1.5), (1.0, 1.5)), tail_s=0.8)
    collector = Collector()
    pool = WorkerPool(backend, MonitorConfig(max_batch=4, close_timeout_s=30.0), collector, workers=2)
    caplog.set_level(logging.ERROR, logger="serstream.workers")
    pool.start()
    first_pids = pool.worker_pids()
    try:
        handles = {sid: pool.open_stream(sid, source="rtp", codec="l16", sample_rate=16000, channels=1)
                   for sid in ("victim", "bystander")}
        assert pool.worker_of("victim") == 0 and pool.worker_of("bystander") == 1
        half = speech.shape[0] // 2
        feed(handles, {"victim": speech, "bystander": speech}, 0, half)
        assert pool.wait_idle(30.0)
        os.kill(first_pids[0], signal.SIGKILL)
        collector.wait(lambda: any(e["type"] == "error" for e in collector.of("victim")), 30.0, "worker_lost")
        # The victim's pushes while its worker restarts are dropped and counted, never blocking;
        # the bystander goes on.
        t0 = time.monotonic()
        for i in range(half, speech.shape[0], CHUNK):
            handles["victim"].push(speech[i:i + CHUNK])
        assert time.monotonic() - t0 < 5.0
        feed({"bystander": handles["bystander"]}, {"bystander": speech}, half)
        handles["bystander"].close("end of file")
        collector.wait(lambda: closed_count(collector, "bystander") == 1, 60.0, "bystander closed")
        # The restarted worker reopens the victim: a second open event, then it takes audio again.
        collector.wait(lambda: sum(1 for e in collector.of("victim") if e["type"] == "stream"
                                   and e["state"] == "open") == 2, 90.0, "victim reopened")
        assert not handles["victim"].closed and pool.worker_of("victim") == 0
        feed({"victim": handles["victim"]}, {"victim": speech})
        handles["victim"].close("end of file")
        collector.wait(lambda: closed_count(collector, "victim") == 2, 60.0, "victim closed again")
        second_pids = pool.worker_pids()
    finally:
        pool.stop()
    stats = pool.stats()

    victim = collector.of("victim")
    kinds = [(e["type"], e.get("state") or e.get("code") or e.get("kind")) for e in victim
             if e["type"] in ("stream", "error")]
    assert kinds == [("stream", "open"), ("error", WORKER_LOST), ("stream", "closed"), ("error", "overflow"),
                     ("stream", "open"), ("stream", "closed")]
    lost = next(e for e in victim if e["type"] == "error" and e["code"] == WORKER_LOST)
    assert f"pid {first_pids[0]}" in lost["message"] and "signal 9" in lost["message"] and lost["count"] == 1
    assert [e for e in victim if e["type"] == "stream"][1]["reason"] == "error: worker lost"
    # After the reopen the stream starts afresh: its finals cover the whole audio again, utterances from 0.
    reopened_at = [i for i, e in enumerate(victim) if e["type"] == "stream" and e["state"] == "open"][1]
    assert [f[0] for f in finals(victim[reopened_at:])] == [0, 1]
    # The other worker's stream never noticed.
    bystander = collector.of("bystander")
    assert_in_order(bystander)
    assert [f[0] for f in finals(bystander)] == [0, 1], [(e["type"], e.get("state"), e.get("t"), e.get("reason"))
                                                         for e in bystander]
    assert not [e for e in bystander if e["type"] == "error"]
    assert bystander[-1]["reason"] == "end of file"
    # One line for the death, counted in stats.
    lines = [r.getMessage() for r in caplog.records if r.name == "serstream.workers"]
    assert len(lines) == 1 and "worker 0" in lines[0] and "died" in lines[0], lines
    assert stats["workers"]["restarts"] == 1 and stats["drops"]["worker_lost"] == 1
    assert stats["drops"]["worker_audio_samples"] > 0
    assert second_pids[0] != first_pids[0] and second_pids[1] == first_pids[1]
    assert not multiprocessing.active_children()
    for pid in {*first_pids, *second_pids}:
        assert pid is not None and not Path(f"/proc/{pid}").exists()


def test_a_stream_whose_worker_dies_three_times_is_closed_for_good(
    factory_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Reopening stops after max_reopens (the stream's audio may be what kills its worker).

    The third time the worker does not die but hangs (SIGSTOP): the pool, hearing
    nothing from it, kills it, and the same death path follows.
    """
    backend = EmotionModel.load(factory_model, device="cpu", threads=1)
    collector = Collector()
    pool = WorkerPool(backend, MonitorConfig(), collector, workers=1, max_reopens=2, hang_timeout_s=5.0)
    caplog.set_level(logging.ERROR, logger="serstream.workers")
    pool.start()
    try:
        handle = pool.open_stream("poison", source="rtp", codec="pcmu", sample_rate=8000, channels=1)
        for death in (1, 2, 3):
            collector.wait(lambda n=death: sum(1 for e in collector.of("poison")
                                               if e["type"] == "stream" and e["state"] == "open") == n,
                           90.0, f"open number {death}")
            handle.push(np.zeros(160, np.float32))
            pid = pool.worker_pids()[0]
            assert pid is not None and pid != os.getpid()
            os.kill(pid, signal.SIGKILL if death < 3 else signal.SIGSTOP)
            collector.wait(lambda n=death: closed_count(collector, "poison") == n,
                           30.0, f"death {death}")
        assert handle.closed and "poison" not in pool.stream_ids
        # The worker itself is back for other streams.
        collector.wait(lambda: pool.health()["workers"] == 1, 90.0, "the worker restarted a third time")
        other = pool.open_stream("other", source="rtp", codec="pcmu", sample_rate=8000, channels=1)
        other.close("bye")
        collector.wait(lambda: closed_count(collector, "other") == 1, 30.0, "other closed")
    finally:
        pool.stop()
    lost = [e for e in collector.of("poison") if e["type"] == "error" and e["code"] == WORKER_LOST]
    assert [e["count"] for e in lost] == [1, 2, 3]
    assert "reopens" in lost[1]["message"] and "died 3 times" in lost[2]["message"]
    assert pool.stats()["workers"]["restarts"] == 3
    lines = [r.getMessage() for r in caplog.records if r.name == "serstream.workers"]
    assert len(lines) == 4 and "sent nothing for" in lines[2] and "killing it" in lines[2], lines
    assert "killed by signal 9" in lines[3] and "its 0 stream(s) reopen" in lines[3]


# --------------------------------------------------------------------------- the command


def test_serve_with_two_workers_ingest_clients_reach_one_events(
    factory_model: Path, speech_wav: Path, synthetic_wav: Path, free_port: int
) -> None:
    from serstream_client import client

    server = Background(["serve", "--workers", "2", "--model", str(factory_model), "--port", str(free_port),
                         "--threads", "1"])
    try:
        server.wait_for(lambda: server.stderr_has("serving"), 120.0, "the server to serve")
        line = next(ln for ln in server.stderr if "worker processes" in ln)
        pids = [int(p) for p in line.split("(pids ")[1].split(")")[0].split(", ")]
        assert len(pids) == 2 and all(Path(f"/proc/{pid}").exists() for pid in pids)
        base = f"127.0.0.1:{free_port}"
        seen: list[Any] = []

        async def main() -> None:
            async def subscribe() -> None:
                async for event in client.events(f"ws://{base}/events", reconnect=False):
                    seen.append(event)
                    closed = {e.stream for e in seen if e.type == "stream" and e.state == "closed"}
                    if {"alpha", "beta"} <= closed:
                        return

            reader = asyncio.create_task(subscribe())
            await asyncio.sleep(0.5)
            pushes = [asyncio.to_thread(client.push_file, f"ws://{base}/ingest", path, name, False, timeout_s=60.0)
                      for path, name in ((speech_wav, "alpha"), (synthetic_wav, "beta"))]
            results = await asyncio.gather(*pushes)
            assert all(any(e.type == "stream" and e.state == "closed" for e in r) for r in results)
            await asyncio.wait_for(reader, 60.0)

        async def lose_worker() -> tuple[list[Any], int | None]:
            """An /ingest stream on worker 0 when worker 0 is killed: told, then disconnected."""
            audio, _ = sf.read(str(synthetic_wav), dtype="float32")
            ingest = client.IngestClient(f"ws://{base}/ingest", stream="gamma", sample_rate=16000,
                                         sample_format="f32le")
            await ingest.open()
            await ingest.send(audio[:8000])
            await asyncio.sleep(0.5)
            os.kill(pids[0], signal.SIGKILL)  # gamma is there: both workers were idle, ties go to 0

            async def keep_sending() -> None:
                with contextlib.suppress(client.IngestRefused):
                    for i in range(0, 16000 * 30, CHUNK):
                        await ingest.send(np.resize(audio, 16000 * 30)[i:i + CHUNK])
                        await asyncio.sleep(0.02)

            sending = asyncio.create_task(keep_sending())
            got = [event async for event in ingest.events()]
            await asyncio.wait_for(sending, 30.0)
            await ingest.abort()
            return got, ingest.close_code

        asyncio.run(main())
        gamma, close_code = asyncio.run(lose_worker())
        kinds = [(e.type, getattr(e, "code", None) or getattr(e, "state", None)) for e in gamma
                 if e.type in ("stream", "error")]
        assert kinds == [("stream", "open"), ("error", "worker_lost"), ("stream", "closed")], kinds
        assert gamma[-1].reason == "error: worker lost" and close_code == 1011
        server.wait_for(lambda: server.stderr_has(f"worker 0 (pid {pids[0]}) died (killed by signal 9)"),
                        10.0, "the line about the dead worker")
        # The pool goes on: a new stream gets its estimates (on worker 1, or on the restarted 0).
        delta = client.push_file(f"ws://{base}/ingest", synthetic_wav, "delta", False, timeout_s=60.0)
        assert any(e.type == "emotion" and e.kind == "final" for e in delta)
        children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(server.proc.pid)], capture_output=True,
                                  text=True, check=False).stdout.split()
        pids = sorted({*pids, *(int(c) for c in children)})
        for name in ("alpha", "beta"):
            mine = [e for e in seen if e.stream == name]
            assert mine[0].type == "stream" and mine[0].state == "open"
            assert any(e.type == "emotion" and e.kind == "final" for e in mine), name
            assert mine[-1].type == "stream" and mine[-1].state == "closed"
        ids = [e.id for e in seen if e.id is not None]
        assert ids == sorted(ids) and len(set(ids)) == len(ids), "one bus numbers every worker's events"
        with urllib.request.urlopen(f"http://{base}/metrics", timeout=10) as response:
            metrics = response.read().decode()
        assert 'serstream_drops_total{cause="worker_lost"} 1' in metrics  # gamma
        assert 'serstream_drops_total{cause="worker_audio_samples"}' in metrics
        server.proc.send_signal(signal.SIGINT)
        assert server.finish(timeout=60) == 0
    finally:
        server.kill()
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()], "worker processes left behind"
    assert not [ln for ln in server.stderr if "Traceback" in ln]


def test_listen_files_with_two_workers_exits_when_done(factory_model: Path, synthetic_wav: Path,
                                                        free_port: int) -> None:
    """Files are spread by source; --exit-when-done waits for every worker's last estimates."""
    listen = Background(["listen", "--workers", "2", "--model", str(factory_model), "--port", str(free_port),
                         "--threads", "1", "--file", str(synthetic_wav), "--file", str(synthetic_wav),
                         "--fast", "--exit-when-done", "--json"])
    try:
        assert listen.finish(timeout=120) == 0, "\n".join(listen.stderr[-20:])
    finally:
        listen.kill()
    line = next(ln for ln in listen.stderr if "worker processes" in ln)
    pids = [int(p) for p in line.split("(pids ")[1].split(")")[0].split(", ")]
    events = listen.json_events()
    names = sorted({e["stream"] for e in events if e["type"] == "stream"})
    assert names == ["file:synthetic.wav", "file:synthetic.wav-2"]
    by_stream = {name: [e for e in events if e.get("stream") == name] for name in names}
    assert finals(by_stream[names[0]]) == finals(by_stream[names[1]]) != []  # the same file, the same finals
    for name in names:
        assert_in_order(by_stream[name])
        assert by_stream[name][-1]["reason"] == "end"  # the file source's reason: replayed to its end
    time.sleep(0.5)
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()], "worker processes left behind"
