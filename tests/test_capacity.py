"""The capacity rule (serstream/core/capacity.py) and the load it is measured on (bench.speech_like).

One definition for every benchmark: these tests pin each condition of the rule on its own,
the two readings (every partial / partials thinned), how a ramp becomes the two figures, and
that the benchmarks' synthetic speech has conversational density as the real VAD sees it.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from serstream.bench import speech_like
from serstream.core.capacity import (
    FINAL_P95_LIMIT_MS,
    PARTIAL_P95_LIMIT_MS,
    Capacity,
    StepOutcome,
    Verdict,
    capacity,
    judge,
)
from serstream.core.vad import SpeechEnd, SpeechStart, VadConfig, VadSegmenter

CLEAN = StepOutcome(
    streams=50, audio_dropped=0, partials_expired=0, partials_dropped=0, finals_dropped=0,
    partials_superseded=3, partials=900, finals=120, partial_p95_ms=180.0, final_p95_ms=90.0,
)


def test_a_clean_step_is_sustained_both_ways() -> None:
    verdict = judge(CLEAN)
    assert verdict == Verdict(50, True, True, (), ())


def test_expired_or_dropped_partials_fail_only_the_every_partial_reading() -> None:
    for change, word in ((dict(partials_expired=7), "7 partials expired"), (dict(partials_dropped=2), "2 partials")):
        verdict = judge(replace(CLEAN, **change))
        assert not verdict.sustained and verdict.thinned
        assert any(word in why for why in verdict.why), verdict.why
        assert verdict.why_thinned == ()


def test_superseded_partials_alone_do_not_fail() -> None:
    assert judge(replace(CLEAN, partials_superseded=10_000)).sustained


@pytest.mark.parametrize(
    "change, word",
    [
        (dict(audio_dropped=160), "audio samples dropped"),
        (dict(finals_dropped=1), "finals dropped"),
        (dict(partial_p95_ms=PARTIAL_P95_LIMIT_MS), "partial p95 250 ms"),
        (dict(final_p95_ms=FINAL_P95_LIMIT_MS + 1), "final p95 501 ms"),
        (dict(finals=0, final_p95_ms=None), "no final estimates"),
        (dict(partials=0, partial_p95_ms=None), "no partial estimates"),
        (dict(losses={"received_lost": 4}), "4 received lost"),
        (dict(source_lag_ms=400.0), "400 ms behind"),
    ],
)
def test_each_condition_fails_both_readings(change: dict[str, object], word: str) -> None:
    verdict = judge(replace(CLEAN, **change))  # type: ignore[arg-type]
    assert not verdict.sustained and not verdict.thinned
    assert any(word in why for why in verdict.why), verdict.why
    assert verdict.why_thinned == tuple(why for why in verdict.why if "partials expired" not in why)


def test_limits_are_strict_and_zero_losses_do_not_count() -> None:
    just_under = replace(CLEAN, partial_p95_ms=PARTIAL_P95_LIMIT_MS - 0.01, final_p95_ms=FINAL_P95_LIMIT_MS - 0.01,
                         losses={"kernel_drops": 0, "events_dropped": 0}, source_lag_ms=249.0)
    assert judge(just_under).sustained


def test_a_ramp_gives_both_figures() -> None:
    ramp = [
        judge(replace(CLEAN, streams=10)),
        judge(replace(CLEAN, streams=25, partials_expired=40)),  # thinned only
        judge(replace(CLEAN, streams=50, partials_expired=400, partial_p95_ms=900.0)),
        judge(replace(CLEAN, streams=100)),  # a later lucky step does not count
    ]
    assert capacity(ramp) == Capacity(every_partial=10, partials_thinned=25, every_partial_open=False,
                                      thinned_open=False)
    assert capacity(ramp[:1]) == Capacity(10, 10, True, True)
    assert capacity([]) == Capacity(0, 0, False, False)
    assert capacity(ramp[2:3]) == Capacity(0, 0, False, False)


def _loud_runs(audio: np.ndarray, rate: int = 16_000, frame_ms: int = 30) -> tuple[float, list[float]]:
    """Share of loud 30 ms frames, and the lengths (s) of the loud runs."""
    frame = rate * frame_ms // 1000
    frames = audio[: audio.size // frame * frame].reshape(-1, frame)
    loud = np.sqrt((frames.astype(np.float64) ** 2).mean(axis=1)) > 0.01
    runs, length = [], 0
    for flag in loud:
        if flag:
            length += 1
        elif length:
            runs.append(length * frame_ms / 1000)
            length = 0
    return float(loud.mean()), runs


@pytest.mark.parametrize("seed", [1, 3, 100])
def test_speech_like_has_conversational_density(seed: int) -> None:
    audio = speech_like(120.0, seed=seed)
    share, runs = _loud_runs(audio)
    assert 0.68 <= share <= 0.82, share
    complete = runs[:-1]  # the last one may be cut by the end of the audio
    assert complete and min(complete) >= 0.95 and max(complete) <= 8.05, (min(complete), max(complete))
    assert np.abs(audio).max() <= 0.35


def test_the_real_vad_finds_one_segment_per_utterance() -> None:
    audio = speech_like(60.0, seed=1)
    _, runs = _loud_runs(audio)
    segmenter = VadSegmenter(VadConfig())
    events = []
    for start in range(0, audio.size, 320):  # 20 ms blocks, as the sources deliver
        events += segmenter.push(audio[start:start + 320])
    events += segmenter.flush()
    starts = [e for e in events if isinstance(e, SpeechStart)]
    ends = [e for e in events if isinstance(e, SpeechEnd) and not e.too_short]
    assert len(starts) == len(runs), (len(starts), len(runs))
    lengths = [(end.index - start.index) / 16_000 for start, end in zip(starts, ends)]
    # pre-roll (0.3 s) and hangover (0.4 s) around each 1-8 s utterance; none split at max length
    assert all(0.9 <= x <= 8.9 for x in lengths), lengths
    assert all(e.reason in ("silence", "flush") for e in ends)
