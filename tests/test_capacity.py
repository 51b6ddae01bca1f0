"""The capacity rule (serstream/core/capacity.py) and the load it is measured on (bench.speech_like).

One definition for every benchmark: these tests pin each condition of the rule on its own,
the two readings (every partial / partials thinned), how a ramp becomes the two figures, and
that the benchmarks' synthetic speech has conversational density as the real VAD sees it.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

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

REPO = Path(__file__).resolve().parent.parent

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


# ------------------------------------------------------------------ benchmarks/bench_network.py uses the rule


def _bench_network() -> Any:
    spec = importlib.util.spec_from_file_location("bench_network", REPO / "benchmarks" / "bench_network.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_network"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_bench_network_judges_its_steps_by_the_same_rule() -> None:
    bn = _bench_network()
    collected = bn._Collector()
    for kind, latency in [("partial", 80.0)] * 19 + [("partial", 240.0), ("final", 120.0), ("final", 300.0)]:
        collected({"type": "emotion", "kind": kind, "latency_ms": latency})
    collected.until = 0.0  # after the live phase: counted, not timed (idle-timeout flushes)
    collected({"type": "emotion", "kind": "final", "latency_ms": 1054.0})
    drops = {"audio_samples": 0, "events_dropped": 0, "partials_expired": 0, "partials_dropped": 0,
             "partials_superseded": 2, "finals_dropped": 0}
    step = bn._fill(bn.Step("rtp", 5, 5.0, sent=1250), collected, dict(drops))
    assert (step.partials, step.finals, step.emotion_events) == (20, 2, 23)
    assert step.final_p95_ms is not None and step.final_p95_ms < 500
    assert step.sustained and step.thinned and step.why == ""
    expired = bn._fill(bn.Step("rtp", 5, 5.0, sent=1250), collected, dict(drops, partials_expired=3))
    assert not expired.sustained and expired.thinned and "3 partials expired" in expired.why
    skipped = bn._fill(bn.Step("websocket", 5, 5.0, sent=1200, sender_dropped=50), collected, dict(drops))
    assert not skipped.sustained and not skipped.thinned and "50 sender drops" in skipped.why
    nothing = bn._fill(bn.Step("rtp", 5, 5.0, sent=0), bn._Collector(), dict(drops))
    assert not nothing.thinned and "1 nothing sent" in nothing.why and "no final estimates" in nothing.why
