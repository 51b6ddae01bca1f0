"""Capacity, defined once: when a load step counts as *sustained*, for every benchmark.

The rule (issue 13): a step is sustained when, over the whole step,

* no audio was dropped (stream rings, and whatever the load path itself lost
  on the way in: RTP packets beyond the sender's own skips, events dropped for
  a slow client, a source that fell behind real time),
* no partial expired (nor was dropped for the pending cap; no final was dropped),
* the p95 audio-to-event latency of the partials is under 250 ms, and
* the p95 end-of-speech-to-final latency is under 500 ms.

That is the headline figure, "sustained (every partial)". Under load the
monitor *thins* partials on purpose (a partial older than
``partial_max_age_s`` expires, a newer one supersedes a waiting one) to keep
latency bounded; the second figure, "with partials thinned", allows that and
keeps every other condition. ``serstream bench`` and
``benchmarks/bench_network.py`` both judge their steps here, so the two
figures mean the same thing everywhere. Pure: counts and percentiles in,
verdicts out; nothing here measures.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

__all__ = [
    "PARTIAL_P95_LIMIT_MS",
    "FINAL_P95_LIMIT_MS",
    "SOURCE_LAG_LIMIT_MS",
    "StepOutcome",
    "Verdict",
    "Capacity",
    "judge",
    "capacity",
]

#: p95 audio-to-event latency of partial estimates must stay under this.
PARTIAL_P95_LIMIT_MS = 250.0
#: p95 end-of-speech-to-final latency must stay under this.
FINAL_P95_LIMIT_MS = 500.0
#: A source that fell further behind real time than this did not offer the load it claims.
SOURCE_LAG_LIMIT_MS = 250.0


@dataclass(frozen=True)
class StepOutcome:
    """What one step of a ramp measured (counts over the whole step)."""

    streams: int
    #: Samples the monitor's stream rings overwrote (``drops.audio_samples``).
    audio_dropped: int
    #: Partials unsent ``partial_max_age_s`` after queueing (``drops.partials_expired``).
    partials_expired: int
    #: Partials dropped because too many windows waited (``drops.partials_dropped``).
    partials_dropped: int
    #: Finals dropped (``drops.finals_dropped``): never allowed.
    finals_dropped: int
    #: Partials replaced by a newer one while waiting (``drops.partials_superseded``): thinning.
    partials_superseded: int
    #: Emotion events of each kind that came out, and their p95 latency (None: none came out).
    partials: int
    finals: int
    partial_p95_ms: float | None
    final_p95_ms: float | None
    #: Other losses the load path counted, by name (RTP lost beyond the sender's skips, events dropped ...).
    losses: Mapping[str, int] = field(default_factory=dict)
    #: How far the slowest source fell behind real time (the load offered was less than claimed).
    source_lag_ms: float = 0.0


@dataclass(frozen=True)
class Verdict:
    """The two readings of one step; ``why`` / ``why_thinned`` say what failed (empty when sustained)."""

    streams: int
    sustained: bool
    thinned: bool
    why: tuple[str, ...]
    why_thinned: tuple[str, ...]


@dataclass(frozen=True)
class Capacity:
    """The figures of a ramp: most streams sustained under each reading (0: not even the first step)."""

    every_partial: int
    partials_thinned: int
    #: True when the last step tried was still sustained (the limit lies beyond the ramp).
    every_partial_open: bool
    thinned_open: bool


def _common(outcome: StepOutcome) -> list[str]:
    """The conditions both readings share: nothing lost, finals on time."""
    why: list[str] = []
    if outcome.audio_dropped:
        why.append(f"{outcome.audio_dropped} audio samples dropped")
    for name, count in sorted(outcome.losses.items()):
        if count:
            why.append(f"{count} {name.replace('_', ' ')}")
    if outcome.finals_dropped:
        why.append(f"{outcome.finals_dropped} finals dropped")
    if outcome.source_lag_ms > SOURCE_LAG_LIMIT_MS:
        why.append(f"sources fell {outcome.source_lag_ms:.0f} ms behind real time")
    if outcome.finals == 0 or outcome.final_p95_ms is None:
        why.append("no final estimates")
    elif not outcome.final_p95_ms < FINAL_P95_LIMIT_MS:
        why.append(f"final p95 {outcome.final_p95_ms:.0f} ms >= {FINAL_P95_LIMIT_MS:.0f} ms")
    if outcome.partials == 0 or outcome.partial_p95_ms is None:
        why.append("no partial estimates")
    elif not outcome.partial_p95_ms < PARTIAL_P95_LIMIT_MS:
        why.append(f"partial p95 {outcome.partial_p95_ms:.0f} ms >= {PARTIAL_P95_LIMIT_MS:.0f} ms")
    return why


def judge(outcome: StepOutcome) -> Verdict:
    """Both readings of one step.

    "Every partial" fails on any partial lost to overload (expired, or dropped
    for the pending cap); superseded partials are reported but do not fail it,
    since the order gate of a stateful model supersedes a held partial at any
    load. "Thinned" allows all three.
    """
    common = _common(outcome)
    strict = list(common)
    if outcome.partials_expired:
        strict.append(f"{outcome.partials_expired} partials expired")
    if outcome.partials_dropped:
        strict.append(f"{outcome.partials_dropped} partials dropped")
    return Verdict(
        streams=outcome.streams,
        sustained=not strict,
        thinned=not common,
        why=tuple(strict),
        why_thinned=tuple(common),
    )


def capacity(verdicts: Sequence[Verdict]) -> Capacity:
    """The most streams of an ascending ramp sustained with no failed step below them, per reading."""
    every = thinned = 0
    every_open = thinned_open = bool(verdicts)
    for verdict in verdicts:
        if every_open:
            if verdict.sustained:
                every = max(every, verdict.streams)
            else:
                every_open = False
        if thinned_open:
            if verdict.thinned:
                thinned = max(thinned, verdict.streams)
            else:
                thinned_open = False
    return Capacity(every, thinned, every_open, thinned_open)
