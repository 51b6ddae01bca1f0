"""Tests for serstream.sources.pacer and real-time FileSource replay on it.

The pure part (due times, the schedule, read-ahead slicing) with numbers and
a made-up clock; then real files replayed in real time into a real
``Monitor`` through the pacer thread. The monitor's stream handles are
wrapped by :class:`Tap`, which records every pushed block (copy and
``time.monotonic()``) before handing it on, so the tests can compare the
audio sample for sample with the file and the push times with the clock.
"""

from __future__ import annotations

import re
import statistics
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from serstream.inference.session import EmotionModel
from serstream.monitor import Monitor, MonitorConfig, StreamHandle
from serstream.sources.file import FileSource
from serstream.sources.pacer import DueSchedule, Pacer, ReadAhead, block_due, read_ahead_frames, shared_pacer
from tests.audio import speech_with_pauses, voiced, write_wav
from tests.conftest import require_tools

# ---------------------------------------------------------------- pure: due times, schedule, read-ahead


def test_a_block_is_due_at_its_end_on_the_source_clock_without_drift() -> None:
    rate, chunk = 44100, 882
    # 1000 blocks later the due time is the exact audio length, not a sum of rounded sleeps.
    assert block_due(10.0, 999 * chunk, chunk, rate) == 10.0 + 1000 * chunk / rate == 30.0
    # The last, shorter block of a file is due at the file's end.
    assert block_due(0.0, 3 * chunk, 100, rate) == pytest.approx((3 * chunk + 100) / rate)
    assert read_ahead_frames(320, 16000) == 8000 and read_ahead_frames(882, 44100) == 22050
    assert read_ahead_frames(320, 16000, seconds=0.001) == 320  # at least one block
    assert read_ahead_frames(300, 16000) % 300 == 0


def test_the_schedule_gives_due_keys_earliest_first_and_forgets_those_that_left() -> None:
    s: DueSchedule[str] = DueSchedule()
    assert s.next_due() is None and s.pop_due(1e9) == [] and len(s) == 0
    s.add("b", 2.0)
    s.add("a", 1.0)
    s.add("c", 2.0)  # same time as b, queued after it
    s.add("d", 5.0)
    assert s.next_due() == 1.0 and len(s) == 4 and "a" in s
    assert s.pop_due(0.5) == []
    assert s.pop_due(2.0) == [("a", 1.0), ("b", 2.0), ("c", 2.0)]
    # Popped keys are still registered (being stepped) but not queued.
    assert len(s) == 4 and s.next_due() == 5.0
    s.discard("b")  # left while being stepped: never queued again
    assert s.requeue("b", 2.02) is False and "b" not in s
    assert s.requeue("a", 1.02) is True and s.requeue("c", 2.02) is True
    s.discard("d")  # left while queued: its heap entry is skipped
    assert s.next_due() == 1.02
    assert s.pop_due(10.0) == [("a", 1.02), ("c", 2.02)]
    assert s.next_due() is None and len(s) == 2
    # Re-adding a key moves it (only its newest entry counts).
    s.add("a", 7.0)
    s.add("a", 6.0)
    assert s.pop_due(10.0) == [("a", 6.0)] and s.pop_due(10.0) == []


def test_the_pacer_wakes_at_the_next_due_time_but_at_most_once_a_millisecond() -> None:
    s: DueSchedule[str] = DueSchedule()
    assert s.wake_time(last_wake=0.0) is None
    s.add("a", 1.0000)
    assert s.wake_time(last_wake=0.5) == 1.0
    assert s.wake_time(last_wake=0.9995) == pytest.approx(1.0005)  # coalesced: late, never early
    assert s.wake_time(last_wake=0.9995, min_interval=0.0) == 1.0


def block_by_block(audio: np.ndarray, chunk: int) -> list[np.ndarray]:
    """What reading ``chunk`` frames at a time gives: full blocks, then the short rest."""
    return [audio[i:i + chunk] for i in range(0, audio.shape[0], chunk)]


@pytest.mark.parametrize("pieces", [[8000, 8000, 8000, 1234], [1, 319, 321, 4000, 7, 20338], [26235]])
def test_read_ahead_cuts_the_blocks_a_block_by_block_read_gives(pieces: list[int]) -> None:
    rng = np.random.default_rng(1)
    audio = rng.standard_normal((sum(pieces), 2)).astype(np.float32)
    ahead = ReadAhead(320, 2)
    got: list[np.ndarray] = []
    at = 0
    feeds = iter(pieces)
    while True:
        block = ahead.take()
        if block is None:
            n = next(feeds, 0)
            if n == 0:
                ahead.end()
            else:
                ahead.feed(audio[at:at + n])
                at += n
            continue
        if block.shape[0] == 0:
            break
        got.append(block.copy())
    expected = block_by_block(audio, 320)
    assert len(got) == len(expected) and all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))
    assert ahead.take() is not None and ahead.available == 0  # empty, ended
    # A rewound file starts again with nothing held; blocks never mix the end of one pass with the next.
    ahead.restart()
    assert ahead.take() is None and not ahead.ended
    ahead.feed(audio[:100])
    ahead.end()
    tail = ahead.take()
    assert tail is not None and np.array_equal(tail, audio[:100])


def test_read_ahead_refuses_audio_of_the_wrong_shape_or_after_the_end() -> None:
    ahead = ReadAhead(320, 1)
    with pytest.raises(ValueError, match=r"expected \[frames, 1\]"):
        ahead.feed(np.zeros((10, 2), np.float32))
    ahead.end()
    with pytest.raises(ValueError, match="after the end"):
        ahead.feed(np.zeros((10, 1), np.float32))
    with pytest.raises(ValueError):
        ReadAhead(0, 1)


# ---------------------------------------------------------------- real files, real monitor, the pacer thread


class TapHandle:
    """A real ``StreamHandle`` that also records each pushed block (monotonic time, copy)."""

    def __init__(self, inner: StreamHandle, pushes: list[tuple[float, np.ndarray]]) -> None:
        self._inner = inner
        self.pushes = pushes

    def push(self, block: np.ndarray, at: float | None = None) -> None:
        self.pushes.append((time.monotonic(), np.array(block, copy=True)))
        self._inner.push(block, at)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class Tap:
    """A real ``Monitor`` whose handles record what the sources push (the test's only observation point)."""

    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor
        self.pushes: dict[str, list[tuple[float, np.ndarray]]] = {}

    def open_stream(self, stream_id: str, **kwargs: Any) -> TapHandle:
        handle = self.monitor.open_stream(stream_id, **kwargs)
        return TapHandle(handle, self.pushes.setdefault(handle.stream_id, []))

    def audio(self, stream_id: str) -> np.ndarray:
        blocks = [b.reshape(b.shape[0], -1) for _, b in self.pushes[stream_id]]
        return np.concatenate(blocks) if blocks else np.zeros((0, 1), np.float32)


class Events:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.items: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        with self.lock:
            self.items.append(event)

    def of(self, event_type: str, **fields: Any) -> list[dict[str, Any]]:
        with self.lock:
            return [e for e in self.items if e["type"] == event_type and all(e.get(k) == v for k, v in fields.items())]

    def closed(self) -> dict[str, str]:
        return {e["stream"]: e["reason"] for e in self.of("stream", state="closed")}


@pytest.fixture()
def running(factory_model: Path) -> Any:
    events = Events()
    monitor = Monitor(EmotionModel.load(factory_model, device="cpu", threads=1),
                      MonitorConfig(max_streams=128, stats_interval_s=3600), events)
    monitor.start()
    yield Tap(monitor), events
    monitor.stop()


def quiet_noise(seconds: float, rate: int, seed: int, channels: int = 1, extra: int = 0) -> np.ndarray:
    """Distinct low-level noise (below the VAD's speech, so the test costs no inference), PCM-16 exact."""
    n = int(round(seconds * rate)) + extra
    audio = 0.002 * np.random.default_rng(seed).standard_normal((n, channels))
    return audio if channels > 1 else audio[:, 0]


def file_audio(path: Path) -> np.ndarray:
    audio, _ = sf.read(str(path), dtype="float32", always_2d=True)
    return audio


def assert_paced(pushes: list[tuple[float, np.ndarray]], before: float, after: float, rate: int,
                 late_s: list[float]) -> None:
    """No block before it was captured (its end on the source clock); collects how late each came."""
    frames = 0
    for at, block in pushes:
        frames += block.shape[0]
        assert at >= before + frames / rate, "a block was pushed before its end time"
        late_s.append(at - (after + frames / rate))


def test_forty_real_time_files_share_one_thread_and_push_exactly_their_samples_on_time(
    running: Any, tmp_path: Path
) -> None:
    tap, events = running
    # Lengths that are not whole blocks; rates whose blocks are 160, 320 and 882 frames; mono and stereo.
    specs = [(16000, 1, 7), (16000, 1, 311), (8000, 1, 5), (44100, 2, 13), (16000, 2, 0), (48000, 1, 17)]
    files = [write_wav(tmp_path / f"f{i}.wav", quiet_noise(1.5, rate, seed=i, channels=ch, extra=extra), rate)
             for i, (rate, ch, extra) in enumerate(specs)]
    baseline = threading.active_count()
    sources = [FileSource(tap, files[i % len(files)], realtime=True) for i in range(40)]
    times: list[tuple[float, float]] = []
    for source in sources:
        before = time.monotonic()
        source.start()
        times.append((before, time.monotonic()))
    try:
        time.sleep(0.8)
        now = time.monotonic()
        extra_threads = threading.active_count() - baseline
        # The bench's contract: a real-time source has pushed what has elapsed, less the block it is capturing.
        lags = [(now - before) - s.frames_pushed / s.sample_rate for s, (before, _) in zip(sources, times, strict=True)]
        assert all(s.join(timeout=30) for s in sources)
    finally:
        for source in sources:
            source.stop()
    # One thread for them all: the pacer (none when the shared pacer was already running).
    assert extra_threads <= 1, f"{extra_threads} threads for 40 real-time files"
    assert min(lags) >= 0.0, lags  # never ahead of the clock
    late: list[float] = []
    for source, (before, after) in zip(sources, times, strict=True):
        expected = file_audio(source.path)
        got = tap.audio(source.stream_id)
        assert got.shape == expected.shape and np.array_equal(got, expected), source.stream_id
        sizes = [b.shape[0] for _, b in tap.pushes[source.stream_id]]
        assert sizes == [len(b) for b in block_by_block(expected, source.chunk)]
        assert source.frames_pushed == expected.shape[0] and source.error is None
        assert source.stats() == {"frames_pushed": expected.shape[0], "error": None, "done": True}
        assert_paced(tap.pushes[source.stream_id], before, after, source.sample_rate, late)
    # On time: most blocks within a block of their due time, none a long way behind (a shared, busy CPU).
    assert statistics.median(late) < 0.01 and max(late) < 0.3, (statistics.median(late), max(late))
    # The snapshot agrees with the recorded pushes: behind by the block being captured (at most 20 ms) plus
    # start-up slack, and beyond that only by as much as the pacer is recorded to have been late. A fixed
    # 0.12 s here failed once in a full suite run (0.287 s) while every recorded lateness bound held: the
    # pacer thread had simply not been scheduled for a moment on a loaded 2-core machine.
    assert max(lags) < 0.02 + 0.1 + max(0.0, max(late)), (max(lags), max(late))
    assert tap.monitor.wait_idle(timeout=30)
    assert set(events.closed().values()) == {"end"} and len(events.closed()) == 40
    # With no source left the pacer has no thread.
    deadline = time.monotonic() + 2
    while shared_pacer().running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not shared_pacer().running


def test_stop_is_prompt_and_flushes_the_open_utterance(running: Any, tmp_path: Path) -> None:
    tap, events = running
    speech = write_wav(tmp_path / "speech.wav", voiced(3.0))
    pacer = Pacer(name="test-pacer")
    sources = [FileSource(tap, speech, realtime=True, loop=True, pacer=pacer) for _ in range(12)]
    for source in sources:
        source.start()
    assert pacer.running and len(pacer) == 12
    time.sleep(1.2)  # inside the 3 s utterance: each stream has an open segment
    took: list[float] = []
    for source in sources:
        t = time.monotonic()
        source.stop()
        took.append(time.monotonic() - t)
        assert source.done.is_set() and source.stream_ids == []  # closed by stop() itself
    source.stop()  # twice: nothing more
    assert statistics.median(took) < 0.1 and max(took) < 0.5, took
    assert len(pacer) == 0
    pushed = {s.stream_id: s.frames_pushed for s in sources}
    time.sleep(0.1)
    assert {s.stream_id: s.frames_pushed for s in sources} == pushed  # nothing pushed after stop
    assert tap.monitor.wait_idle(timeout=60)
    assert events.closed() == {s.stream_id: "stopped" for s in sources}
    for source in sources:
        finals = events.of("emotion", stream=source.stream_id, kind="final")
        # The utterance open at stop() got its final (the stream was flushed), ending at the stop.
        assert len(finals) == 1, source.stream_id
        assert finals[0]["t1"] == pytest.approx(source.frames_pushed / source.sample_rate, abs=0.1)
    deadline = time.monotonic() + 2
    while pacer.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not pacer.running and pacer.stats()["step_errors"] == 0


def test_a_looping_file_rewinds_with_the_same_blocks_on_one_clock(running: Any, tmp_path: Path) -> None:
    tap, events = running
    audio = quiet_noise(0.31, 16000, seed=5)  # 4960 frames: 15 blocks and a half
    path = write_wav(tmp_path / "short.wav", audio)
    source = FileSource(tap, path, realtime=True, loop=True, pacer=Pacer())
    before = time.monotonic()
    source.start()
    after = time.monotonic()
    time.sleep(1.1)
    source.stop()
    pushes = tap.pushes[source.stream_id]
    one_pass = block_by_block(file_audio(path), source.chunk)
    assert len(one_pass) == 16 and one_pass[-1].shape[0] == 160
    passes = len(pushes) // len(one_pass)
    assert passes >= 3, len(pushes)
    for i, (_, block) in enumerate(pushes):
        assert np.array_equal(block, one_pass[i % len(one_pass)]), i
    late: list[float] = []
    assert_paced(pushes, before, after, 16000, late)
    assert max(late) < 0.3
    assert tap.monitor.wait_idle(timeout=30) and events.closed() == {source.stream_id: "stopped"}


def test_a_split_file_pushes_both_parties_the_same_block_at_once(running: Any, tmp_path: Path) -> None:
    tap, events = running
    left, right = quiet_noise(1.0, 16000, seed=7, extra=55), quiet_noise(1.0, 16000, seed=8, extra=55)
    path = write_wav(tmp_path / "call.wav", np.stack([left, right], axis=1))
    stereo = file_audio(path)
    source = FileSource(tap, path, realtime=True, split=True, roles="caller,callee", pacer=Pacer())
    before = time.monotonic()
    source.start()
    after = time.monotonic()
    assert source.join(timeout=10)
    a, b = (tap.pushes[f"file:call.wav:{role}"] for role in ("caller", "callee"))
    assert np.array_equal(tap.audio("file:call.wav:caller")[:, 0], stereo[:, 0])
    assert np.array_equal(tap.audio("file:call.wav:callee")[:, 0], stereo[:, 1])
    # One clock: block k of each party goes out in the same step.
    assert [x.shape[0] for _, x in a] == [y.shape[0] for _, y in b]
    assert max(abs(ta - tb) for (ta, _), (tb, _) in zip(a, b, strict=True)) < 0.01
    assert_paced(a, before, after, 16000, [])
    assert tap.monitor.wait_idle(timeout=30)
    assert events.closed() == {"file:call.wav:caller": "end", "file:call.wav:callee": "end"}
    # As fast as possible (a thread of its own, read ahead too): the same samples.
    fast = FileSource(tap, path, realtime=False, split=True, roles="caller,callee", stream_id="fast")
    fast.start()
    assert fast.join(timeout=10)
    assert np.array_equal(tap.audio("fast:caller")[:, 0], stereo[:, 0])
    assert np.array_equal(tap.audio("fast:callee")[:, 0], stereo[:, 1])


def test_a_corrupt_file_fails_its_own_stream_and_the_others_play_on(running: Any, tmp_path: Path) -> None:
    require_tools("ffmpeg")
    tap, events = running
    wav = write_wav(tmp_path / "speech.wav", speech_with_pauses(((0.2, 1.5), (0.2, 1.5)), tail_s=0.2))
    m4a = tmp_path / "fast.m4a"
    subprocess.run(["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y", "-i", str(wav), "-c:a", "aac",
                    "-b:a", "64k", "-movflags", "+faststart", str(m4a)], check=True, timeout=120)
    data = bytearray(m4a.read_bytes())
    middle = len(data) // 2  # inside the audio packets: the index is in front (+faststart)
    data[middle: middle + 4000] = np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes()
    bad = tmp_path / "bad.m4a"
    bad.write_bytes(bytes(data))
    # A WAV cut short: its header promises more than it holds; libsndfile reads what is there.
    good = write_wav(tmp_path / "good.wav", quiet_noise(2.0, 16000, seed=3))
    cut = tmp_path / "cut.wav"
    whole = good.read_bytes()
    cut.write_bytes(whole[: len(whole) // 2])
    pacer = Pacer()
    goods = [FileSource(tap, good, realtime=True, pacer=pacer) for _ in range(3)]
    broken = FileSource(tap, bad, realtime=True, pacer=pacer)
    short = FileSource(tap, cut, realtime=True, pacer=pacer)
    for source in (*goods, broken, short):
        source.start()
    assert broken.join(timeout=10)
    assert not any(s.done.is_set() for s in goods)  # they go on
    assert all(s.join(timeout=10) for s in (*goods, short))
    pattern = rf"^cannot read audio file {re.escape(str(bad))}: corrupt audio data after \d+\.\d\d s \(FFmpeg: .+\)$"
    assert broken.error is not None and re.match(pattern, broken.error)
    assert broken.frames_pushed > 0  # the audio before the corruption was played
    assert [(e["stream"], e["code"], e["message"]) for e in events.of("error")] == [
        ("file:bad.m4a", "decode_error", broken.error)]
    assert tap.monitor.wait_idle(timeout=30)
    closed = events.closed()
    assert closed.pop("file:bad.m4a") == f"error: {broken.error}" and set(closed.values()) == {"end"}
    for source in goods:
        assert np.array_equal(tap.audio(source.stream_id), file_audio(good))
    expected_cut = file_audio(cut)
    assert 0 < expected_cut.shape[0] < file_audio(good).shape[0]
    assert np.array_equal(tap.audio(short.stream_id), expected_cut) and short.error is None
    assert pacer.stats()["step_errors"] == 0
