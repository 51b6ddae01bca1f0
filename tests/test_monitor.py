"""The monitor end to end in-process: real webrtcvad, real ONNX Runtime (the factory model).

Audio is pushed in 20 ms chunks as fast as the test can; ``wait_idle`` then
waits until every window has gone through the model and every event is out.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest

from serstream import events
from serstream.analyze import analyze
from serstream.core.vad import VadConfig
from serstream.inference.session import EmotionModel
from serstream.monitor import Monitor, MonitorConfig, MonitorError
from tests.audio import SAMPLE_RATE, silence, speech_with_pauses, voiced
from tests.e2e.helpers import model_with_metadata
from tests.modelfactory import SlowModel

CHUNK = 320  # 20 ms at 16 kHz


class Collector:
    """A thread-safe sink that keeps every event."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def __call__(self, event: dict[str, Any]) -> None:
        with self._lock:
            self.events.append(event)

    def of(self, stream: str | None = None, type_: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return [
                e for e in self.events
                if (stream is None or e["stream"] == stream) and (type_ is None or e["type"] == type_)
            ]


@pytest.fixture(scope="module")
def model(factory_model: Path) -> EmotionModel:
    return EmotionModel.load(factory_model, device="cpu", threads=1)


@pytest.fixture(scope="module")
def state_emotion_model(state_model: Path) -> EmotionModel:
    return EmotionModel.load(state_model, device="cpu", threads=1)


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(events.load_schema())


def push_all(
    handles: dict[str, Any],
    audio: dict[str, np.ndarray],
    chunk: int = CHUNK,
    monitor: Monitor | None = None,
    settle_s: float = 0.25,
    speed: float | None = None,
) -> None:
    """Push every stream's audio, interleaved chunk by chunk as live sources would.

    With ``monitor``, wait for it to go idle after every ``settle_s`` of audio:
    faster than real time, a newer partial would otherwise replace a waiting
    one (as it should under load), and a test could not count on partials.
    With ``speed``, pace the pushes at that multiple of real time instead.
    """
    longest = max(a.size for a in audio.values())
    settle = int(settle_s * SAMPLE_RATE)
    for start in range(0, longest, chunk):
        for name, handle in handles.items():
            block = audio[name][start:start + chunk]
            if block.size:
                handle.push(block)
        if speed is not None:
            time.sleep(chunk / SAMPLE_RATE / speed)
        elif monitor is not None and (start // settle) != ((start + chunk) // settle):
            assert monitor.wait_idle(timeout=30)


def run(model: Any, audio: dict[str, np.ndarray], config: MonitorConfig | None = None,
        speed: float | None = None) -> tuple[Collector, dict]:
    sink = Collector()
    monitor = Monitor(model, config or MonitorConfig(), sink)
    monitor.start()
    try:
        handles = {
            name: monitor.open_stream(name, source="file", codec="pcm_f32", sample_rate=SAMPLE_RATE, channels=1)
            for name in audio
        }
        push_all(handles, audio, monitor=monitor, speed=speed)
        for handle in handles.values():
            handle.close(reason="end")
        assert monitor.wait_idle(timeout=60), "monitor did not become idle"
        stats = monitor.stats()
    finally:
        monitor.stop()
    return sink, stats


def test_one_stream_gives_ordered_events(model: EmotionModel, validator: jsonschema.Draft202012Validator) -> None:
    audio = speech_with_pauses(((0.5, 2.0), (1.0, 1.5)), tail_s=1.0)
    sink, stats = run(model, {"a": audio})
    for event in sink.events:
        validator.validate(event)
    stream = sink.of("a")
    kinds = [(e["type"], e.get("state") or e.get("kind")) for e in stream]
    assert kinds[0] == ("stream", "open")
    assert kinds[-1] == ("stream", "closed")
    starts = [e for e in stream if e["type"] == "speech" and e["state"] == "start"]
    ends = [e for e in stream if e["type"] == "speech" and e["state"] == "end"]
    assert len(starts) == len(ends) == 2
    emotions = [e for e in stream if e["type"] == "emotion"]
    assert [e["seq"] for e in emotions] == list(range(len(emotions)))
    finals = [e for e in emotions if e["kind"] == "final"]
    assert [f["utterance"] for f in finals] == [0, 1]
    assert any(e["kind"] == "partial" for e in emotions)
    duration = audio.size / SAMPLE_RATE
    for e in emotions:
        assert 0 <= e["t0"] < e["t1"] <= duration
        assert e["latency_ms"] >= 0
    # Each final covers its utterance and ends where the speech ended; it comes after that end.
    for final, start, end in zip(finals, starts, ends):
        assert final["t0"] == pytest.approx(start["t"], abs=1e-3)
        assert final["t1"] == pytest.approx(end["t"], abs=1e-3)
        assert stream.index(final) > stream.index(end)
    # Utterance 1 starts at 0.5 s (less pre-roll), utterance 2 at 3.5 s.
    assert 0.1 <= starts[0]["t"] <= 0.55
    assert 3.1 <= starts[1]["t"] <= 3.55
    assert stats["drops"]["audio_samples"] == 0
    assert stats["latency_ms"]["count"] == len(emotions)


def test_streams_share_batches(model: EmotionModel) -> None:
    audio = speech_with_pauses(((0.3, 2.0),), tail_s=0.8)
    # Long waits: a batch closes when full or after 0.3 s, so the six streams' windows meet.
    config = MonitorConfig(max_batch=6, partial_wait_s=0.3, final_wait_s=0.3)
    sink, stats = run(model, {f"s{i}": audio for i in range(6)}, config)
    assert stats["batches"]["max_size"] > 1
    for i in range(6):
        finals = [e for e in sink.of(f"s{i}", "emotion") if e["kind"] == "final"]
        assert len(finals) == 1
    # Identical audio, identical model: every stream gets the same estimate.
    labels = {e["label"] for e in sink.of(type_="emotion") if e["kind"] == "final"}
    assert len(labels) == 1


def test_nan_samples_are_counted_and_reported_without_killing_streams(model: EmotionModel) -> None:
    audio = speech_with_pauses(((0.3, 2.0),), tail_s=0.8)
    bad = audio.copy()
    bad[8000:8010] = np.nan
    bad[9000:9005] = np.inf
    sink, stats = run(model, {"bad": bad, "good": audio})
    errors = sink.of("bad", "error")
    assert [e["code"] for e in errors] == ["bad_samples"]
    assert errors[0]["count"] >= 10
    assert stats["drops"]["bad_samples"] == 15
    for name in ("bad", "good"):
        assert [e["kind"] for e in sink.of(name, "emotion")][-1] == "final"
        closed = sink.of(name, "stream")[-1]
        assert closed["state"] == "closed" and closed["reason"] == "end"
    assert sink.of("good", "error") == []


def test_unusable_block_fails_only_its_stream(model: EmotionModel) -> None:
    sink = Collector()
    monitor = Monitor(model, MonitorConfig(), sink)
    monitor.start()
    try:
        good = monitor.open_stream("good", source="file", codec="pcm_f32", sample_rate=SAMPLE_RATE, channels=1)
        broken = monitor.open_stream("broken", source="file", codec="pcm_f32", sample_rate=SAMPLE_RATE, channels=1)
        audio = speech_with_pauses(((0.3, 2.0),), tail_s=0.8)
        broken.push(np.zeros((10, 2, 2), np.float32))  # not [frames] or [frames, channels]
        push_all({"good": good}, {"good": audio})
        good.close()
        assert monitor.wait_idle(timeout=30)
        assert broken.closed
    finally:
        monitor.stop()
    assert [e["code"] for e in sink.of("broken", "error")] == ["bad_samples"]
    closed = sink.of("broken", "stream")[-1]
    assert closed["state"] == "closed" and closed["reason"].startswith("error")
    assert [e["kind"] for e in sink.of("good", "emotion")][-1] == "final"


def test_ring_overflow_is_counted(model: EmotionModel) -> None:
    sink = Collector()
    # A 0.5 s ring and 2 s pushed before the pipeline runs: 1.5 s must be dropped and counted.
    monitor = Monitor(model, MonitorConfig(ring_seconds=0.5), sink)
    handle = monitor.open_stream("a", source="file", codec="pcm_f32", sample_rate=SAMPLE_RATE, channels=1)
    for start in range(0, 2 * SAMPLE_RATE, CHUNK):
        handle.push(voiced(0.02, seed=start))
    monitor.start()
    try:
        handle.close()
        assert monitor.wait_idle(timeout=30)
        stats = monitor.stats()
    finally:
        monitor.stop()
    assert stats["drops"]["audio_samples"] == 2 * SAMPLE_RATE - SAMPLE_RATE // 2
    overflow = sink.of("a", "error")
    assert [e["code"] for e in overflow] == ["overflow"]
    assert overflow[0]["count"] == 2 * SAMPLE_RATE - SAMPLE_RATE // 2


def test_stop_flushes_open_speech(model: EmotionModel) -> None:
    sink = Collector()
    monitor = Monitor(model, MonitorConfig(), sink)
    monitor.start()
    handle = monitor.open_stream("a", source="microphone", codec="pcm_f32", sample_rate=SAMPLE_RATE, channels=1)
    # Speech that never pauses: only the stop can end it.
    push_all({"a": handle}, {"a": np.concatenate([silence(0.3), voiced(2.0)])})
    assert monitor.wait_idle(timeout=30)
    monitor.stop(drain=True)
    ends = [e for e in sink.of("a", "speech") if e["state"] == "end"]
    assert [e["reason"] for e in ends] == ["flush"]
    finals = [e for e in sink.of("a", "emotion") if e["kind"] == "final"]
    assert len(finals) == 1
    assert sink.of("a", "stream")[-1]["state"] == "closed"


def test_resampled_stereo_stream(model: EmotionModel) -> None:
    """A 44.1 kHz stereo int16 source: down-mixed, resampled, times on the 16 kHz clock."""
    sink = Collector()
    monitor = Monitor(model, MonitorConfig(), sink)
    monitor.start()
    try:
        mono = speech_with_pauses(((0.5, 2.0),), tail_s=1.0, rate=44100)
        stereo = (np.stack([mono, mono], axis=1) * 32767).astype(np.int16)
        handle = monitor.open_stream("cd", source="file", codec="pcm_s16le", sample_rate=44100, channels=2)
        for start in range(0, stereo.shape[0], 882):
            handle.push(stereo[start:start + 882])
        handle.close()
        assert monitor.wait_idle(timeout=30)
    finally:
        monitor.stop()
    start = [e for e in sink.of("cd", "speech") if e["state"] == "start"]
    assert len(start) == 1 and 0.1 <= start[0]["t"] <= 0.55
    finals = [e for e in sink.of("cd", "emotion") if e["kind"] == "final"]
    assert len(finals) == 1 and finals[0]["t1"] <= mono.size / 44100


def test_state_model_feeds_and_updates_speaker_state(state_emotion_model: EmotionModel) -> None:
    """The first final sees no state; the second sees the first one's frame_stats."""
    quiet = 0.15 * voiced(1.5, seed=1)
    loud = voiced(1.5, seed=2) * 3.0
    audio = np.concatenate([silence(0.3), quiet, silence(1.0), np.clip(loud, -1, 1), silence(1.0)])
    sink, _ = run(state_emotion_model, {"a": audio})
    finals = [e for e in sink.of("a", "emotion") if e["kind"] == "final"]
    assert len(finals) == 2
    model = state_emotion_model
    stateless_arousal = []
    for final, expect_state in zip(finals, (False, True)):
        start, end = round(final["t0"] * SAMPLE_RATE), round(final["t1"] * SAMPLE_RATE)
        window = audio[start:end][None, :]
        stateless = model.infer(window, np.array([window.shape[1]]))
        probs = np.array(list(final["probs"].values()))
        same = np.allclose(probs, stateless.probs[0], atol=2e-4)
        assert same is (not expect_state)
        stateless_arousal.append(float(stateless.avd[0, 0]))
    # Against the quiet speaker's statistics the loud utterance reads as more aroused.
    assert finals[1]["arousal"] > stateless_arousal[1] + 0.1


def test_bad_stream_parameters_are_one_line_errors(model: EmotionModel) -> None:
    monitor = Monitor(model, MonitorConfig(max_streams=1), Collector())
    with pytest.raises(MonitorError, match="sample rate"):
        monitor.open_stream("x", source="file", codec="pcm", sample_rate=1000, channels=1)
    monitor.open_stream("a", source="file", codec="pcm", sample_rate=SAMPLE_RATE, channels=1)
    with pytest.raises(MonitorError, match="already open"):
        monitor.open_stream("a", source="file", codec="pcm", sample_rate=SAMPLE_RATE, channels=1)
    with pytest.raises(MonitorError, match="too many streams"):
        monitor.open_stream("b", source="file", codec="pcm", sample_rate=SAMPLE_RATE, channels=1)


def test_failing_sink_is_counted_not_fatal(model: EmotionModel) -> None:
    seen: list[dict[str, Any]] = []

    def flaky(event: dict[str, Any]) -> None:
        if event["type"] == "speech":
            raise RuntimeError("consumer bug")
        seen.append(event)

    monitor = Monitor(model, MonitorConfig(), flaky)
    monitor.start()
    try:
        handle = monitor.open_stream("a", source="file", codec="pcm", sample_rate=SAMPLE_RATE, channels=1)
        push_all({"a": handle}, {"a": speech_with_pauses(((0.3, 1.5),), tail_s=0.8)})
        handle.close()
        assert monitor.wait_idle(timeout=30)
        stats = monitor.stats()
    finally:
        monitor.stop()
    assert stats["drops"]["sink_failures"] == 2
    assert any(e["type"] == "emotion" and e["kind"] == "final" for e in seen)


def test_stats_event_and_health_validate(model: EmotionModel, validator: jsonschema.Draft202012Validator) -> None:
    monitor = Monitor(model, MonitorConfig(), Collector())
    monitor.start()
    try:
        health = monitor.health()
        assert health["status"] == "ok" and health["device"] == "cpu"
        validator.validate(monitor.stats_event())
    finally:
        monitor.stop()
    assert monitor.health()["status"] == "down"


def test_source_counters_are_merged_into_drops(model: EmotionModel) -> None:
    monitor = Monitor(model, MonitorConfig(), Collector())
    monitor.add_stats_provider(lambda: {"rtp_lost_packets": 7, "bad_samples": 2})
    monitor.add_stats_provider(lambda: 1 / 0)  # a broken provider is skipped, not fatal
    drops = monitor.stats()["drops"]
    assert drops["rtp_lost_packets"] == 7
    assert drops["bad_samples"] == 2  # added to the monitor's own count (0 here)


#: Metadata the session accepts (the tensors conform) but the pipeline cannot run on.
UNUSABLE_METADATA = [
    ("sample_rate", "8000", "sample_rate 8000 Hz"),
    ("labels", json.dumps(["neutral"] * 8), "more than once"),
    ("window_s", "nan", "window_s must be a finite number"),
    ("min_window_s", "0", "min_window_s must be a finite number"),
]


@pytest.mark.parametrize("key,value,fragment", UNUSABLE_METADATA, ids=[k for k, _, _ in UNUSABLE_METADATA])
def test_model_metadata_the_pipeline_cannot_use_is_refused_in_one_line(
    factory_model: Path, tmp_path: Path, key: str, value: str, fragment: str
) -> None:
    path = model_with_metadata(factory_model, tmp_path / f"{key}.onnx", **{key: value})
    model = EmotionModel.load(path, device="cpu", threads=1)  # the session has nothing against it
    for build in (lambda: Monitor(model, MonitorConfig(), Collector()), lambda: analyze(model, [], lambda e: None)):
        with pytest.raises(MonitorError) as caught:
            build()
        message = str(caught.value)
        assert fragment in message and str(path) in message and "\n" not in message




def test_expired_partials_do_not_hold_back_closing_streams(model: EmotionModel) -> None:
    """Overload: partials expire (counted), and every stream still closes, with its final and no drops."""
    audio = speech_with_pauses(((0.3, 2.5),), tail_s=0.8)
    # Twice real time into a model that needs 0.2 s a batch: partials fall due faster than it serves them.
    # A stream has one window out at a time, so it takes more streams than the two inference threads'
    # batches and the one queued batch hold (3 x 2 windows) for partials to wait in the batch former.
    names = [f"s{i}" for i in range(12)]
    sink, stats = run(SlowModel(model, delay_s=0.2), {n: audio for n in names},
                      MonitorConfig(max_batch=2, partial_max_age_s=0.1), speed=2.0)
    assert stats["drops"]["partials_expired"] > 0
    for n in names:
        closed = [e for e in sink.of(n, "stream") if e.get("state") == "closed"]
        finals = [e for e in sink.of(n, "emotion") if e["kind"] == "final"]
        assert len(closed) == 1 and len(finals) == 1, (n, len(closed), len(finals))
    assert stats["drops"]["finals_dropped"] == 0


def test_a_closing_stream_never_waits_on_a_request_the_batcher_dropped(model: EmotionModel) -> None:
    """Overload with a tiny queue: finals are refused (counted), and every closing stream still closes
    at once (not after its 30 s close timeout), with its final unless that very final was refused."""
    sink = Collector()
    # Segments up to a minute: the talkers make no finals of their own during the test.
    config = MonitorConfig(max_batch=2, max_pending=8, partial_max_age_s=None, close_timeout_s=30.0,
                           vad=VadConfig(max_segment_ms=60000))
    monitor = Monitor(SlowModel(model, delay_s=0.25), config, sink)
    monitor.start()
    stop = threading.Event()
    try:
        # 12 real-time talkers keep the batch former from ever running empty (24 partials/s
        # against 8 windows/s, a queue of 8 against batches of 2), so a stream waiting on a
        # lost request would wait its whole close timeout.
        load = [monitor.open_stream(f"load{i}", source="file", codec="pcm_f32", sample_rate=SAMPLE_RATE,
                                    channels=1) for i in range(12)]
        talk = voiced(20.0)

        def talkers() -> None:
            began, pushed = time.monotonic(), 0
            while not stop.is_set() and pushed + CHUNK <= talk.size:
                for handle in load:
                    handle.push(talk[pushed:pushed + CHUNK])
                pushed += CHUNK
                time.sleep(max(0.0, began + pushed / SAMPLE_RATE - time.monotonic()))

        loader = threading.Thread(target=talkers, daemon=True)
        loader.start()
        time.sleep(1.5)
        # 16 finals at once into a queue of 8: half are refused.
        names = [f"t{i}" for i in range(16)]
        audio = np.concatenate([silence(0.3), voiced(1.2, seed=5), silence(1.0)])
        targets = [monitor.open_stream(n, source="file", codec="pcm_f32", sample_rate=SAMPLE_RATE, channels=1)
                   for n in names]
        for handle in targets:
            handle.push(audio)
        for handle in targets:
            handle.close(reason="end")
        closed_at = time.monotonic()
        deadline = closed_at + 20.0
        while len([e for n in names for e in sink.of(n, "stream") if e.get("state") == "closed"]) < len(names):
            assert time.monotonic() < deadline, "closing streams waited on dropped requests"
            time.sleep(0.02)
        took = time.monotonic() - closed_at
        stats = monitor.stats()
    finally:
        stop.set()
        monitor.stop(drain=False)
    assert took < 5.0, took
    dropped = stats["drops"]["finals_dropped"]
    assert dropped > 0  # the case under test happened
    finals = {n: [e for e in sink.of(n, "emotion") if e["kind"] == "final"] for n in names}
    assert all(len(f) <= 1 for f in finals.values())
    assert sum(len(f) for f in finals.values()) + dropped == len(names)
    for n in names:
        closed = [e for e in sink.of(n, "stream") if e.get("state") == "closed"]
        assert len(closed) == 1 and closed[0]["reason"] == "end"


def test_monitor_open_stream_applies_the_rule_and_raises_a_typed_error(model: EmotionModel) -> None:
    from serstream.monitor import MonitorError, StreamIdTaken

    events: list[dict[str, Any]] = []
    monitor = Monitor(model, MonitorConfig(), events.append)
    monitor.start()
    try:
        first = monitor.open_stream("file:a.wav", source="file", codec="pcm_16", sample_rate=16000, channels=1)
        with pytest.raises(StreamIdTaken, match="'file:a.wav' is already open"):
            monitor.open_stream("file:a.wav", source="file", codec="pcm_16", sample_rate=16000, channels=1)
        second = monitor.open_stream("file:a.wav", source="file", codec="pcm_16", sample_rate=16000, channels=1,
                                     unique=True)
        assert (first.stream_id, second.stream_id) == ("file:a.wav", "file:a.wav-2")
        opened = [e["stream"] for e in events if e["type"] == "stream" and e["state"] == "open"]
        assert opened == ["file:a.wav", "file:a.wav-2"]
        # StreamIdTaken is a MonitorError, so callers that only know MonitorError still see one line.
        assert issubclass(StreamIdTaken, MonitorError)
        first.close()
    finally:
        monitor.stop()


def test_parties_of_a_call_carry_call_and_role_on_their_events(
    model: EmotionModel, validator: jsonschema.Draft202012Validator
) -> None:
    sink = Collector()
    monitor = Monitor(model, MonitorConfig(), sink)
    monitor.start()
    audio = speech_with_pauses(((0.5, 1.5),), tail_s=1.0)
    try:
        handles = {
            role: monitor.open_stream(f"call7:{role}", source="twilio", codec="pcmu", sample_rate=SAMPLE_RATE,
                                      channels=1, call="call7", role=role,
                                      params={"customer": "42"} if role == "inbound" else None)
            for role in ("inbound", "outbound")
        }
        lone = monitor.open_stream("lone", source="file", codec="pcm_f32", sample_rate=SAMPLE_RATE, channels=1)
        push_all({**handles, "lone": lone}, {"inbound": audio, "outbound": audio, "lone": audio}, monitor=monitor)
        for handle in (*handles.values(), lone):
            handle.close(reason="end")
        assert monitor.wait_idle(timeout=60)
        with pytest.raises(MonitorError, match="role must be 1 to 200 printable"):
            monitor.open_stream("bad", source="file", codec="pcm", sample_rate=SAMPLE_RATE, channels=1,
                                call="c", role="a\nb")
    finally:
        monitor.stop()
    for event in sink.events:
        validator.validate(event)
    for role in ("inbound", "outbound"):
        mine = [e for e in sink.of(f"call7:{role}") if e["type"] in ("stream", "emotion")]
        assert {e["type"] for e in mine} == {"stream", "emotion"}
        assert all(e["call"] == "call7" and e["role"] == role for e in mine)
        opened = next(e for e in mine if e["type"] == "stream" and e["state"] == "open")
        assert opened.get("params") == ({"customer": "42"} if role == "inbound" else None)
    # A lone stream's events do not mention a call at all (fields omitted, not null).
    assert all("call" not in e and "role" not in e for e in sink.of("lone"))
    assert any(e["type"] == "emotion" for e in sink.of("lone"))


def test_inference_concurrency_is_checked_and_defaults_by_device():
    from serstream.monitor import MonitorConfig, default_inference_concurrency

    with pytest.raises(ValueError, match="inference_concurrency"):
        MonitorConfig(inference_concurrency=0)
    assert default_inference_concurrency("cpu") == 2
    assert default_inference_concurrency("cuda") == 1


class FirstBatchLate:
    """The real model, but its first batch takes ``delay_s`` longer: a second thread overtakes it."""

    def __init__(self, model: Any, delay_s: float) -> None:
        self._model, self._delay_s = model, delay_s
        self.info, self.device = model.info, model.device
        self._lock = threading.Lock()
        self.calls = 0

    def infer(self, audio: np.ndarray, lengths: np.ndarray, state: Any = None) -> Any:
        with self._lock:
            self.calls += 1
            first = self.calls == 1
        if first:
            time.sleep(self._delay_s)
        return self._model.infer(audio, lengths, state)


def test_a_stream_stays_in_order_when_a_later_batch_finishes_first(model: EmotionModel) -> None:
    # Two inference threads: the first batch (the stream's first window) is held up for 0.6 s
    # while the other thread could run everything after it. The stream's estimates must still go
    # out in stream order: t1 never goes back, no partial after its utterance's final, seq in order.
    audio = speech_with_pauses(((0.3, 1.5), (1.0, 1.2), (1.0, 1.6)), tail_s=0.8)
    backend = FirstBatchLate(model, delay_s=0.6)
    sink = Collector()
    monitor = Monitor(backend, MonitorConfig(inference_concurrency=2), sink)
    monitor.start()
    try:
        handle = monitor.open_stream("a", source="file", codec="pcm_f32", sample_rate=SAMPLE_RATE, channels=1)
        push_all({"a": handle}, {"a": audio}, speed=8.0)  # faster than real time: windows pile up
        handle.close(reason="end")
        assert monitor.wait_idle(timeout=60), "monitor did not become idle"
    finally:
        monitor.stop()
    assert backend.calls > 2
    emotions = sink.of("a", "emotion")
    finals = [e for e in emotions if e["kind"] == "final"]
    assert [f["utterance"] for f in finals] == [0, 1, 2]
    t1s = [e["t1"] for e in emotions]
    assert t1s == sorted(t1s)
    assert [e["seq"] for e in emotions] == list(range(len(emotions)))
    for final in finals:
        later = emotions[emotions.index(final) + 1:]
        assert not [e for e in later if e["utterance"] == final["utterance"]]
