"""Tests for serstream.core.pipeline.StreamPipeline: chunking, rates, gaps, arrival marks, bad samples."""

from __future__ import annotations

import numpy as np
import pytest

from serstream.core.pipeline import SpeechBegan, SpeechEnded, StreamPipeline, WindowReady, clean_in_place
from serstream.core.scheduler import SchedulerConfig
from serstream.core.vad import VadConfig
from tests.audio import SAMPLE_RATE, silence, speech_with_pauses, voiced

SCHED = SchedulerConfig(window_s=2.0, hop_s=0.5, min_window_s=0.5, max_window_s=8.0)


def run(audio: np.ndarray, chunk: int, rate: int = SAMPLE_RATE) -> tuple[list, StreamPipeline]:
    pipeline = StreamPipeline(rate, VadConfig(), SCHED)
    items: list = []
    for start in range(0, audio.size, chunk):
        items += pipeline.push(start, audio[start:start + chunk].copy(), now=float(start))
    items += pipeline.finish(now=-1.0)
    return items, pipeline


def summary(items: list) -> list[tuple]:
    """Speech events and finals (partials depend on chunking by design: only the newest is due)."""
    out: list[tuple] = []
    for item in items:
        if isinstance(item, WindowReady):
            w = item.window
            if not w.final:
                continue
            out.append(("window", w.kind, w.utterance, w.start, w.end, w.audio.tobytes()))
        elif isinstance(item, SpeechEnded):
            out.append(("end", item.index, item.start, item.reason))
        else:
            out.append(("begin", item.index))
    return out


def test_results_do_not_depend_on_how_the_audio_is_chunked():
    audio = speech_with_pauses(((0.4, 2.2), (0.8, 1.6)), tail_s=1.0)
    whole, _ = run(audio, audio.size)
    for chunk in (160, 320, 4000, 32000):
        assert summary(run(audio, chunk)[0]) == summary(whole)
    assert [s[1] for s in summary(whole) if s[0] == "window"] == ["final", "final"]
    # Partials end on the stream's grid, however the audio came.
    small, _ = run(audio, 320)
    begins = [i.index for i in small if isinstance(i, SpeechBegan)]
    partials = [i.window for i in small if isinstance(i, WindowReady) and not i.window.final]
    assert partials
    for w in partials:  # segment start + min_window_s + k * hop_s (both 0.5 s = 8000 samples)
        assert (w.end - begins[w.utterance] - 8000) % 8000 == 0
    ends = [item for item in whole if isinstance(item, SpeechEnded)]
    assert [e.reason for e in ends] == ["silence", "silence"]
    # Each final's window covers its segment: the speech-end event and the final agree.
    finals = [i.window for i in whole if isinstance(i, WindowReady) and i.window.final]
    assert [(f.start, f.end) for f in finals] == [(e.start, e.index) for e in ends]


def test_other_rates_are_timed_on_the_16k_clock():
    audio8 = speech_with_pauses(((0.5, 2.0),), tail_s=1.0, rate=8000)
    items, pipeline = run(audio8, 160, rate=8000)
    assert pipeline.samples_in == audio8.size
    begin = next(i for i in items if isinstance(i, SpeechBegan))
    end = next(i for i in items if isinstance(i, SpeechEnded))
    # The speech is at 0.5..2.5 s of the stream; the pre-roll and the hangover widen it.
    assert 0.1 <= begin.t <= 0.5 and 2.5 <= end.t <= 3.1
    assert abs(pipeline.out_next - 2 * audio8.size) <= 40  # resampled to 16 kHz, all of it


def test_a_gap_ends_the_segment_and_jumps_the_clock():
    pipeline = StreamPipeline(8000, VadConfig(), SCHED)
    first = voiced(1.5, rate=8000)
    items = pipeline.push(0, first.copy(), now=0.0)
    # 0.5 s of native audio (4000 samples) never arrived.
    items += pipeline.push(first.size + 4000, voiced(1.5, rate=8000, seed=3), now=1.0)
    items += pipeline.finish(now=2.0)
    ends = [i for i in items if isinstance(i, SpeechEnded)]
    assert ends[0].reason == "gap" and pipeline.gaps == 1
    begins = [i for i in items if isinstance(i, SpeechBegan)]
    assert len(begins) == 2 and begins[1].index >= (first.size + 4000) * 2
    # No window spans the hole.
    hole = (first.size * 2, (first.size + 4000) * 2)
    for item in items:
        if isinstance(item, WindowReady):
            w = item.window
            assert w.end <= hole[0] + 400 or w.start >= hole[1]


def test_each_window_carries_the_arrival_of_the_block_that_completed_it():
    audio = speech_with_pauses(((0.3, 2.5),), tail_s=1.0)
    block = 800  # 50 ms
    pipeline = StreamPipeline(SAMPLE_RATE, VadConfig(), SCHED)
    items: list = []
    # Drained two blocks at a time, as the monitor reads whatever the ring holds: the marks say
    # when each block arrived, so the window's time is its own block's, not the drain's.
    for start in range(0, audio.size, 2 * block):
        piece = audio[start:start + 2 * block].copy()
        marks = [(min(start + (k + 1) * block, audio.size), 1000.0 + start + k * block) for k in range(2)]
        items += pipeline.push(start, piece, now=-5.0, marks=marks)
    windows = [i for i in items if isinstance(i, WindowReady)]
    assert windows
    for item in windows:
        last = item.window.end - 1
        assert item.arrived == 1000.0 + (last // block) * block
    # Without marks, the caller's `now` at the push.
    pipeline = StreamPipeline(SAMPLE_RATE, VadConfig(), SCHED)
    plain = pipeline.push(0, audio.copy(), now=42.0)
    assert {i.arrived for i in plain if isinstance(i, WindowReady)} == {42.0}


def test_non_finite_samples_are_replaced_and_counted():
    audio = np.concatenate([silence(0.2), voiced(1.0), silence(0.8)])
    audio[100:110] = np.nan
    audio[200] = np.inf
    pipeline = StreamPipeline(SAMPLE_RATE, VadConfig(), SCHED)
    items = pipeline.push(0, audio.copy(), now=0.0) + pipeline.finish(now=0.0)
    assert pipeline.bad_samples == 11
    windows = [i.window for i in items if isinstance(i, WindowReady)]
    assert windows and all(np.all(np.isfinite(w.audio)) for w in windows)
    loud = np.full(4, 3.0, np.float32)
    cleaned, bad = clean_in_place(loud)
    assert bad == 0 and cleaned is loud and float(loud.max()) == 1.0


def test_finish_flushes_open_speech_once_and_ends_the_pipeline():
    pipeline = StreamPipeline(SAMPLE_RATE, VadConfig(), SCHED, track_level=True)
    items = pipeline.push(0, np.concatenate([silence(0.3), voiced(2.0)]), now=0.0)
    assert pipeline.level > 0.05
    tail = pipeline.finish(now=1.0)
    assert [type(i) for i in tail][-2:] == [SpeechEnded, WindowReady]
    assert tail[-2].reason == "flush" and tail[-1].window.final
    assert pipeline.finish(now=2.0) == []
    with pytest.raises(ValueError, match="finished"):
        pipeline.push(0, voiced(0.1), now=3.0)
    assert any(isinstance(i, SpeechBegan) for i in items)


def test_the_vad_must_run_at_the_model_rate():
    with pytest.raises(ValueError, match="16000"):
        StreamPipeline(SAMPLE_RATE, VadConfig(sample_rate=8000), SCHED)
