"""Readings defined by the stream, not by timing: one stream's finals are the same however it is replayed.

A model with a state input (the ``state_model`` factory model: speaker
statistics that grow with each final) makes every final depend on the finals
before it. The same espeak-ng stream goes through ``analyze`` and through the
live monitor in real time, as fast as possible, and as fast as possible in a
monitor overloaded by other real-time streams (a model slowed down so it
cannot keep up, so partials are superseded and expire); the finals (labels and probabilities) must agree to 1e-6.
Before the order gate, the fast replays put an utterance's windows into the
same batch as the previous utterance's final, so they ran without its state.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from serstream.analyze import StreamSpec, analyze
from serstream.inference.session import EmotionModel
from serstream.monitor import Monitor, MonitorConfig
from tests.audio import SAMPLE_RATE, espeak_sentences, speech_with_pauses
from tests.conftest import require_tools
from tests.modelfactory import SlowModel

CHUNK = 320  # 20 ms

SENTENCES = (
    "Good morning, I would like to check on my order.",
    "This is the third time I have called today!",
    "Nobody has helped me at all.",
    "Thank you, that is all.",
)


@pytest.fixture(scope="module")
def stream_wav(audio_dir: Path) -> Path:
    require_tools("espeak-ng", "sox")
    # Short pauses: the next utterance starts soon after the previous one ends.
    return espeak_sentences(audio_dir / "order-stream.wav", SENTENCES, pause_s=0.7)


@pytest.fixture(scope="module")
def model(state_model: Path) -> EmotionModel:
    return EmotionModel.load(state_model, device="cpu", threads=1)


def finals_of(events: list[dict[str, Any]], stream: str) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == "emotion" and e["stream"] == stream and e["kind"] == "final"]




def replay(model: EmotionModel, audio: np.ndarray, *, speed: float | None, others: int = 0) -> list[dict[str, Any]]:
    """Push ``audio`` as stream ``target`` (``speed`` x real time; None: as fast as the ring takes it).

    ``others``: that many more streams of speech pushed in real time into a
    model slowed to 0.15 s a batch, which cannot serve them all.
    """
    events: list[dict[str, Any]] = []
    lock = threading.Lock()

    def sink(event: dict[str, Any]) -> None:
        with lock:
            events.append(event)

    backend: Any = SlowModel(model, 0.15) if others else model
    # A long close timeout: the target closes when its last final is out, not when time is up.
    monitor = Monitor(backend, MonitorConfig(max_batch=4, close_timeout_s=30.0), sink)
    monitor.start()
    stop = threading.Event()
    loaders: list[threading.Thread] = []
    try:
        if others:
            noise = speech_with_pauses(((0.3, 2.5), (0.5, 1.5), (0.4, 3.0)), tail_s=0.8)
            handles = [monitor.open_stream(f"load{i}", source="file", codec="pcm_f32",
                                           sample_rate=SAMPLE_RATE, channels=1) for i in range(others)]

            def load() -> None:
                began = time.monotonic()
                pushed = 0
                while not stop.is_set():
                    start = pushed % noise.size
                    block = noise[start:start + CHUNK]
                    for handle in handles:
                        handle.push(block)
                    pushed += block.size
                    delay = began + pushed / SAMPLE_RATE - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)

            loaders = [threading.Thread(target=load, daemon=True)]
            loaders[0].start()
            time.sleep(0.3)  # the load is running before the target starts
        target = monitor.open_stream("target", source="file", codec="pcm_f32", sample_rate=SAMPLE_RATE, channels=1)
        began = time.monotonic()
        for start in range(0, audio.size, CHUNK):
            block = audio[start:start + CHUNK]
            if speed is None:
                assert target.wait_for_space(block.size, timeout=30)
            else:
                delay = began + start / SAMPLE_RATE / speed - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            target.push(block)
        target.close(reason="end")
        deadline = time.monotonic() + 60
        while not any(e["type"] == "stream" and e["stream"] == "target" and e.get("state") == "closed"
                      for e in list(events)):
            assert time.monotonic() < deadline, "target stream did not close"
            time.sleep(0.02)
        stats = monitor.stats()
    finally:
        stop.set()
        for thread in loaders:
            thread.join(5)
        monitor.stop(drain=False)
    # Held windows wait for results; none of the target's may be lost for the comparison to hold.
    assert stats["drops"]["finals_dropped"] == 0
    if others:
        # The load was real: the monitor had to supersede or expire partials.
        assert stats["drops"]["partials_superseded"] + stats["drops"]["partials_expired"] > 0
    return finals_of(events, "target")


def assert_same_finals(got: list[dict[str, Any]], want: list[dict[str, Any]], how: str) -> None:
    assert len(got) == len(want), (how, len(got), len(want))
    for g, w in zip(got, want, strict=True):
        assert (g["utterance"], g["t0"], g["t1"]) == (w["utterance"], w["t0"], w["t1"]), how
        assert g["label"] == w["label"], (how, g["utterance"], g["label"], w["label"])
        assert list(g["probs"]) == list(w["probs"])
        np.testing.assert_allclose(list(g["probs"].values()), list(w["probs"].values()), atol=1e-6, err_msg=how)
        for key in ("arousal", "valence", "dominance"):
            assert abs(g[key] - w[key]) <= 1e-6, (how, key)


def test_finals_are_the_same_live_fast_loaded_and_offline(model: EmotionModel, stream_wav: Path) -> None:
    offline: list[dict[str, Any]] = []
    analyze(model, [StreamSpec("target", (stream_wav,))], offline.append)
    want = finals_of(offline, "target")
    assert len(want) == len(SENTENCES)
    # The state matters: with it, later finals differ from the same windows run stateless.
    audio, rate = sf.read(str(stream_wav), dtype="float32")
    assert rate == SAMPLE_RATE
    last = want[-1]
    window = audio[round(last["t0"] * SAMPLE_RATE):round(last["t1"] * SAMPLE_RATE)][None, :]
    stateless = model.infer(window, np.array([window.shape[1]]))
    assert not np.allclose(stateless.probs[0], list(last["probs"].values()), atol=1e-4)

    assert_same_finals(replay(model, audio, speed=None), want, "as fast as possible")
    assert_same_finals(replay(model, audio, speed=None, others=16), want, "fast, in an overloaded monitor")
    assert_same_finals(replay(model, audio, speed=1.0), want, "real time")
