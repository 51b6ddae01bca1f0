"""/metrics through prometheus_client (serstream/metrics.py): instruments, a live scrape, multiprocess sums.

The live test runs the real monitor (factory ONNX model), the real server and a real HTTP GET,
then checks every histogram and counter against what the monitor itself sent and counted. The
multiprocess test runs real worker processes that share one PROMETHEUS_MULTIPROC_DIR and checks
that the histograms and counters of both add up in one exposition.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serstream.inference.session import EmotionModel
from serstream.metrics import LATENCY_BUCKETS_S, MULTIPROC_ENV, MonitorMetrics, prometheus_text, scrape
from serstream.monitor import Monitor, MonitorConfig
from serstream.server import PROMETHEUS_CONTENT_TYPE, EventBus, MonitorServer
from tests.audio import speech_with_pauses

REPO = Path(__file__).resolve().parent.parent


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, keyed by (name, sorted labels); parsing it also checks the format."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(table: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return table[(name, tuple(sorted(labels.items())))]


# ------------------------------------------------------------------ the instruments alone


def test_counters_grow_by_what_is_new_and_gauges_are_set() -> None:
    metrics = MonitorMetrics()
    metrics.update({"drops": {"audio_samples": 3, "partials_expired": 0}, "streams": 4, "batches": {"count": 2},
                    "queues": {"batcher_pending": 7}, "uptime_s": 1.5})
    metrics.update({"drops": {"audio_samples": 5, "partials_expired": 1}, "streams": 1, "batches": {"count": 9}})
    table = samples(metrics.render())
    assert value(table, "serstream_drops_total", cause="audio_samples") == 5
    assert value(table, "serstream_drops_total", cause="partials_expired") == 1
    assert value(table, "serstream_batches_total") == 9
    assert value(table, "serstream_streams") == 1
    assert value(table, "serstream_queue_depth", queue="batcher_pending") == 7
    assert value(table, "serstream_uptime_seconds") == 1.5
    # A snapshot that goes down (a source's counter reset) adds nothing and is counted.
    metrics.update({"drops": {"audio_samples": 2}})
    metrics.update({"drops": {"audio_samples": 6}})
    assert value(samples(metrics.render()), "serstream_drops_total", cause="audio_samples") == 9
    assert metrics.counter_resets == 1


def test_named_counters_become_families_and_bad_names_are_counted() -> None:
    metrics = MonitorMetrics()
    metrics.update({}, {"streams_opened": 2, "pipeline_errors": 0, "Bad Name": 1, "drops": 3, "uptime_seconds": 1})
    metrics.update({}, {"streams_opened": 5})
    table = samples(metrics.render())
    assert value(table, "serstream_streams_opened_total") == 5
    assert value(table, "serstream_pipeline_errors_total") == 0
    # Not a plain name, a family of its own ("drops"), a gauge's name: refused and counted, never raised.
    assert metrics.bad_counter_names == 3
    assert value(table, "serstream_uptime_seconds") == 0


def test_values_that_are_not_numbers_are_counted_not_raised() -> None:
    metrics = MonitorMetrics()
    metrics.update({"streams": "many", "uptime_s": float("inf"), "drops": {"x": None, "y": 2}, "queues": {"q": "?"}})
    table = samples(metrics.render())
    assert metrics.bad_values == 4
    assert value(table, "serstream_drops_total", cause="y") == 2
    assert value(table, "serstream_streams") == 0


def test_latency_histograms_have_the_targets_as_bucket_edges() -> None:
    assert 0.25 in LATENCY_BUCKETS_S and 0.5 in LATENCY_BUCKETS_S
    metrics = MonitorMetrics()
    for latency in (0.05, 0.2, 0.3, 2.0):
        metrics.observe_event(False, latency)
    metrics.observe_event(True, 0.45)
    metrics.observe_event(True, float("nan"))  # left out, not a crash
    metrics.observe_batch(8, 0.04)
    table = samples(metrics.render())
    assert value(table, "serstream_partial_latency_seconds_bucket", le="0.25") == 2
    assert value(table, "serstream_partial_latency_seconds_bucket", le="0.5") == 3
    assert value(table, "serstream_partial_latency_seconds_count") == 4
    assert value(table, "serstream_partial_latency_seconds_sum") == pytest.approx(2.55)
    assert value(table, "serstream_final_latency_seconds_bucket", le="0.5") == 1
    assert value(table, "serstream_final_latency_seconds_count") == 1
    assert value(table, "serstream_batch_size_bucket", le="8.0") == 1
    assert value(table, "serstream_inference_batch_seconds_count") == 1


def test_each_monitor_has_its_own_registry() -> None:
    one, two = MonitorMetrics(), MonitorMetrics()
    one.observe_event(False, 0.1)
    one.update({"drops": {"audio_samples": 4}})
    assert value(samples(one.render()), "serstream_partial_latency_seconds_count") == 1
    assert value(samples(two.render()), "serstream_partial_latency_seconds_count") == 0
    assert ("serstream_drops_total", (("cause", "audio_samples"),)) not in samples(two.render())
    # Nothing lands in prometheus_client's process-global registry.
    assert "serstream_" not in prometheus_client.generate_latest().decode()


def test_prometheus_text_renders_a_snapshot() -> None:
    text = prometheus_text({"streams": 2, "drops": {"events": 4}, "device": "cpu", "queues": {'we"ird\\q\nx': 2}})
    table = samples(text)
    assert value(table, "serstream_streams") == 2
    assert value(table, "serstream_drops_total", cause="events") == 4
    assert value(table, "serstream_device_info", device="cpu", provider="") == 1
    assert value(table, "serstream_queue_depth", queue='we"ird\\q\nx') == 2
    assert "# TYPE serstream_partial_latency_seconds histogram" in text.splitlines()


# ------------------------------------------------------------------ a live monitor, scraped over HTTP


def _get(port: int, path: str, token: str | None = None) -> tuple[int, str, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read().decode()


def test_a_live_monitor_scrape_matches_what_it_sent(factory_model: Path) -> None:
    model = EmotionModel.load(factory_model, device="cpu", threads=1)
    sent: list[dict[str, Any]] = []
    monitor_counters: list[dict[str, int]] = []
    lock = threading.Lock()

    async def main() -> tuple[tuple[int, str, str], tuple[int, str, str], dict[str, Any]]:
        loop = asyncio.get_running_loop()
        bus = EventBus()

        def sink(event: dict[str, Any]) -> None:
            with lock:
                sent.append(event)
            bus.publish_threadsafe(loop, event)

        monitor = Monitor(model, MonitorConfig(stats_interval_s=0.3), sink)
        server = MonitorServer(bus, "127.0.0.1", 0, health=monitor.health, metrics=lambda: scrape(monitor),
                               token="s3cret-token")
        await server.start()
        monitor.start()
        try:
            handle = monitor.open_stream("m", source="file", codec="pcm_f32", sample_rate=16000, channels=1)
            audio = speech_with_pauses(((0.3, 2.5), (0.8, 1.5), (0.8, 3.0)), seed=4)
            # At five times real time: fast, yet each partial is run before the next one is due.
            for start in range(0, audio.size, 1600):
                handle.push(audio[start:start + 1600])
                await asyncio.sleep(0.02)
            handle.close()
            assert await asyncio.to_thread(monitor.wait_idle, 60)
            refused = await asyncio.to_thread(_get, server.port, "/metrics")
            answer = await asyncio.to_thread(_get, server.port, "/metrics", "s3cret-token")
            stats = monitor.stats()
            monitor_counters.append(monitor.counters())
        finally:
            await asyncio.to_thread(monitor.stop)
            await server.close()
        return refused, answer, stats

    refused, (status, content_type, text), stats = asyncio.run(asyncio.wait_for(main(), 120))
    assert refused[0] == 401  # the auth rules of /metrics are unchanged
    assert status == 200 and content_type == PROMETHEUS_CONTENT_TYPE
    table = samples(text)
    emotions = [e for e in sent if e["type"] == "emotion"]
    partials = [e for e in emotions if e["kind"] == "partial"]
    finals = [e for e in emotions if e["kind"] == "final"]
    assert partials and len(finals) == 3
    assert value(table, "serstream_partial_latency_seconds_count") == len(partials)
    assert value(table, "serstream_final_latency_seconds_count") == len(finals)
    # The histogram's sum is the events' own latency_ms (taken a moment earlier), within a few ms each.
    total_ms = sum(e["latency_ms"] for e in emotions)
    observed_ms = 1000 * (value(table, "serstream_partial_latency_seconds_sum")
                          + value(table, "serstream_final_latency_seconds_sum"))
    assert total_ms <= observed_ms + 1e-6 and observed_ms - total_ms < 5.0 * len(emotions)
    buckets = [value(table, "serstream_partial_latency_seconds_bucket", le=str(b)) for b in LATENCY_BUCKETS_S]
    assert buckets == sorted(buckets)
    assert value(table, "serstream_partial_latency_seconds_bucket", le="+Inf") == len(partials)
    assert value(table, "serstream_batch_size_count") == stats["batches"]["count"]
    assert value(table, "serstream_batch_size_sum") == stats["windows"]
    assert value(table, "serstream_inference_batch_seconds_count") == stats["batches"]["count"]
    assert value(table, "serstream_events_total") == len(emotions)
    for cause, count in stats["drops"].items():
        assert value(table, "serstream_drops_total", cause=cause) == count, cause
    assert value(table, "serstream_device_info", device="cpu", provider="CPUExecutionProvider") == 1
    assert value(table, "serstream_streams") == 0
    counters = monitor_counters[0]
    assert value(table, "serstream_streams_opened_total") == counters["streams_opened"] == 1
    assert value(table, "serstream_streams_closed_total") == 1
    assert value(table, "serstream_batches_sent_total") == counters["batches_sent"] == stats["batches"]["count"]
    assert value(table, "serstream_worker_batches_split_total") == 0


# ------------------------------------------------------------------ multiprocess mode


WORKER = textwrap.dedent(
    """
    import sys
    from serstream.metrics import MonitorMetrics

    n = int(sys.argv[1])
    metrics = MonitorMetrics()
    for i in range(n):
        metrics.observe_event(False, 0.1 + 0.04 * i)
    metrics.observe_event(True, 0.4)
    metrics.observe_batch(n, 0.02)
    metrics.update({"drops": {"audio_samples": 10 * n}, "streams": n, "batches": {"count": 1}})
    print("ok")
    """
)


def test_multiprocess_mode_adds_the_workers_up(tmp_path: Path) -> None:
    folder = tmp_path / "prom"
    folder.mkdir()
    env = dict(os.environ, **{MULTIPROC_ENV: str(folder)})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), str(REPO / "clients/python/src"),
                                                      env.get("PYTHONPATH", "")]))
    for n in (3, 5):
        proc = subprocess.run([sys.executable, "-c", WORKER, str(n)], env=env, capture_output=True, text=True,
                              timeout=60, cwd=REPO)
        assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
    assert sorted(p.name.split("_")[0] for p in folder.iterdir())  # the workers left their value files
    # Any process of the deployment serves the sum (here: a third one, rendering only).
    render = "from serstream.metrics import MonitorMetrics; print(MonitorMetrics().render(), end='')"
    proc = subprocess.run([sys.executable, "-c", render], env=env, capture_output=True, text=True, timeout=60,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    table = samples(proc.stdout)
    assert value(table, "serstream_partial_latency_seconds_count") == 8
    assert value(table, "serstream_final_latency_seconds_count") == 2
    assert value(table, "serstream_final_latency_seconds_bucket", le="0.5") == 2
    # 3 + 5 partials: 0.1, 0.14, 0.18 | 0.1, ..., 0.26: under 0.25 s are 3 + 4
    assert value(table, "serstream_partial_latency_seconds_bucket", le="0.25") == 7
    assert value(table, "serstream_batch_size_sum") == 8
    assert value(table, "serstream_drops_total", cause="audio_samples") == 80
    assert value(table, "serstream_batches_total") == 2
    assert value(table, "serstream_streams") == 8  # livesum: the workers were not marked dead
