"""Tests for serstream.core.scheduler.WindowScheduler, fed with segmenter events built by hand."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serstream.core.scheduler import SchedulerConfig, WindowScheduler
from serstream.core.vad import SpeechAudio, SpeechEnd, SpeechStart

SR = 16000


def source(n: int, start: int = 0) -> np.ndarray:
    """Audio whose value encodes its absolute index (exact in float32 below 2**24)."""
    return (np.arange(start, start + n) % 1_000_003).astype(np.float32)


def utterance(start: int, n: int, chunk: int, too_short: bool = False, reason: str = "silence"):
    audio = source(n, start)
    events = [SpeechStart(start)]
    events += [SpeechAudio(start + i, audio[i:i + chunk]) for i in range(0, n, chunk)]
    events.append(SpeechEnd(start + n, reason, too_short))
    return events


def check_audio(window):
    assert window.audio.dtype == np.float32
    assert window.audio.size == window.end - window.start
    np.testing.assert_array_equal(window.audio, source(window.end - window.start, window.start))


def test_partials_every_hop_after_min_window_then_one_final():
    scheduler = WindowScheduler(SchedulerConfig())
    windows = scheduler.feed_all(utterance(0, 4 * SR, SR // 10))
    partials = [w for w in windows if w.kind == "partial"]
    finals = [w for w in windows if w.kind == "final"]
    assert [w.end for w in partials] == list(range(8000, 64001, 8000))
    assert [w.start for w in partials] == [max(0, end - 3 * SR) for end in range(8000, 64001, 8000)]
    assert len(finals) == 1 and (finals[0].start, finals[0].end) == (0, 4 * SR)
    assert windows[-1] is finals[0]
    for window in windows:
        check_audio(window)
    assert scheduler.partials == 8 and scheduler.finals == 1


def test_a_piece_crossing_several_grid_points_yields_only_the_newest_partial():
    scheduler = WindowScheduler(SchedulerConfig())
    scheduler.feed(SpeechStart(100))
    windows = scheduler.feed(SpeechAudio(100, source(int(1.7 * SR), 100)))
    assert len(windows) == 1
    assert windows[0].end == 100 + 8000 + 2 * 8000  # grid points 0.5, 1.0, 1.5 s: the newest
    check_audio(windows[0])
    windows = scheduler.feed(SpeechAudio(100 + int(1.7 * SR), source(int(0.3 * SR), 100 + int(1.7 * SR))))
    assert [w.end for w in windows] == [100 + 2 * SR]


def test_final_covers_at_most_max_window():
    scheduler = WindowScheduler(SchedulerConfig(max_window_s=8.0))
    windows = scheduler.feed_all(utterance(5000, 10 * SR, 4000))
    final = windows[-1]
    assert final.kind == "final"
    assert (final.start, final.end) == (5000 + 2 * SR, 5000 + 10 * SR)
    check_audio(final)
    assert all(w.end - w.start <= 3 * SR for w in windows[:-1])


def test_too_short_or_shorter_than_min_window_gets_no_final():
    scheduler = WindowScheduler(SchedulerConfig(min_window_s=0.5))
    assert [w.kind for w in scheduler.feed_all(utterance(0, SR, 1600, too_short=True))] == ["partial"] * 2
    assert scheduler.feed_all(utterance(SR, 4000, 1000)) == []
    assert scheduler.skipped_short == 2 and scheduler.finals == 0


def test_utterances_are_numbered_per_stream():
    scheduler = WindowScheduler(SchedulerConfig())
    numbers = []
    for k in range(3):
        numbers += [(w.kind, w.utterance) for w in scheduler.feed_all(utterance(k * 2 * SR, SR, SR))]
    assert numbers == [("partial", 0), ("final", 0), ("partial", 1), ("final", 1), ("partial", 2), ("final", 2)]
    assert scheduler.utterances == 3
    other = WindowScheduler(SchedulerConfig())
    assert other.feed_all(utterance(0, SR, SR))[0].utterance == 0


def test_max_length_split_continues_as_a_new_utterance():
    scheduler = WindowScheduler(SchedulerConfig())
    events = utterance(0, 2 * SR, 800, reason="max_length") + utterance(2 * SR, SR, 800)
    finals = [w for w in scheduler.feed_all(events) if w.kind == "final"]
    assert [(w.utterance, w.start, w.end) for w in finals] == [(0, 0, 2 * SR), (1, 2 * SR, 3 * SR)]


def test_memory_stays_bounded_on_long_utterances():
    scheduler = WindowScheduler(SchedulerConfig())
    capacity = scheduler.buffer_samples
    windows = scheduler.feed_all(utterance(0, 60 * SR, 1234))
    assert scheduler.buffer_samples == capacity <= 2 * 8 * SR
    check_audio(windows[-1])
    check_audio(windows[-2])


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 3 * SR), min_size=1, max_size=30),
    window_s=st.sampled_from([1.0, 2.0, 3.0]),
    max_window_s=st.sampled_from([3.0, 4.0]),
)
def test_every_window_holds_exactly_its_audio(sizes, window_s, max_window_s):
    config = SchedulerConfig(window_s=window_s, hop_s=0.25, max_window_s=max_window_s)
    scheduler = WindowScheduler(config)
    windows = scheduler.feed(SpeechStart(7))
    cursor = 7
    for n in sizes:
        windows += scheduler.feed(SpeechAudio(cursor, source(n, cursor)))
        cursor += n
    windows += scheduler.feed(SpeechEnd(cursor, "flush"))
    for window in windows:
        check_audio(window)
        limit = window_s if window.kind == "partial" else max_window_s
        assert window.end - window.start <= limit * SR
    ends = [w.end for w in windows if w.kind == "partial"]
    assert all((end - 7 - 8000) % 4000 == 0 for end in ends)
    assert ends == sorted(set(ends))


@pytest.mark.parametrize(
    "events, message",
    [
        ([SpeechAudio(0, np.zeros(10, np.float32))], "outside"),
        ([SpeechEnd(0, "silence")], "outside"),
        ([SpeechStart(0), SpeechStart(5)], "open"),
        ([SpeechStart(0), SpeechAudio(3, np.zeros(10, np.float32))], "contiguous"),
        ([SpeechStart(0), SpeechAudio(0, np.zeros(10, np.float32)), SpeechEnd(11, "silence")], "match"),
    ],
)
def test_protocol_violations_raise(events, message):
    scheduler = WindowScheduler(SchedulerConfig())
    with pytest.raises(ValueError, match=message):
        scheduler.feed_all(events)


@pytest.mark.parametrize(
    "kwargs",
    [{"window_s": 0}, {"hop_s": -1}, {"min_window_s": 4.0}, {"max_window_s": 2.0}, {"sample_rate": 0}],
)
def test_bad_config_raises(kwargs):
    with pytest.raises(ValueError):
        SchedulerConfig(**kwargs)
