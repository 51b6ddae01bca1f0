"""One stream's results to emotion events: the smoother, the speaker state, the sequence, the order gate.

The windows of a stream go in (``admit``) in stream order and come out
(``ready``) with a snapshot of the speaker state (the model's state inputs)
they are to run with; their results come back (``result``) as event dicts, or
the caller says they were lost (``lost``: dropped, refused, failed).

**Readings defined by the stream, not by timing.** With a model that has
state inputs, the state grows with each final. A window of utterance *k*
must see the state after the finals of utterances < *k* and nothing else,
whatever the load: so after a final is released, the stream's later windows
are *held* until that final's result is folded in (or it is lost). While
held, a newer window of the stream replaces a held partial (counted in
``superseded``), as the batch former does for waiting partials. The live
monitor and the offline ``analyze`` both go through this gate, so both give
the same finals for the same audio. A model without state inputs has
nothing to wait for: windows are ready at once.

**One window in flight** (``one_in_flight``). When results can come back out
of order (several inference threads, remote replicas), a later window of the
stream could overtake an earlier one: a partial after its utterance's final,
utterance 1's final before utterance 0's, and the smoother fed time
backwards. The live monitor therefore holds each window until the stream's
previous one is resolved (held partials are superseded meanwhile, as above).
``analyze`` gets its results back in order and releases whole groups.

Not thread-safe: the monitor calls it under the stream's lock. No clock is
read here: ``ts`` and the latency come in as arguments.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Generic, Mapping, TypeVar

import numpy as np

from serstream import events
from serstream.contract import SAMPLE_RATE, ModelInfo
from serstream.core.adaptation import SpeakerState
from serstream.core.scheduler import Window
from serstream.core.smoother import MoodSmoother, SmootherConfig

__all__ = ["Released", "StreamEstimator"]

T = TypeVar("T")


@dataclass(frozen=True)
class Released(Generic[T]):
    """A window cleared to run: ``state`` maps each state input to its row (None: empty state)."""

    window: Window
    tag: T
    state: Mapping[str, np.ndarray | None] = field(default_factory=dict)


class StreamEstimator(Generic[T]):
    """Per-stream estimation state; ``tag`` is the caller's own data carried with each window."""

    def __init__(
        self,
        stream: str,
        info: ModelInfo,
        smoother: SmootherConfig | None = None,
        *,
        call: str | None = None,
        role: str | None = None,
        one_in_flight: bool = False,
    ) -> None:
        self.stream = stream
        #: The call and party the stream's events name (None: a lone stream).
        self.call = call
        self.role = role
        self.labels = tuple(info.labels)
        self.model_version = info.version
        self.smoother = MoodSmoother(self.labels, smoother or SmootherConfig())
        self.states = {spec.name: SpeakerState(spec) for spec in info.state_inputs}
        #: Hold later windows while a final is out: only a model with state inputs needs it.
        self.gated = bool(self.states)
        #: Hold every window while an earlier one of the stream is out (results may arrive out of order).
        self.one_in_flight = one_in_flight
        self.seq = 0
        self._held: deque[tuple[Window, T]] = deque()
        self._finals_out = 0  # finals released and not yet resolved
        self.outstanding = 0  # windows released and not yet resolved (result or lost)
        self.superseded = 0  # held partials replaced by a newer window of the stream
        self.held_total = 0  # windows that had to wait (behind a final; behind any window with one_in_flight)

    # -- the order gate ----------------------------------------------------------------------

    @property
    def held(self) -> int:
        """Windows waiting for an earlier window's result (a final's; any, with ``one_in_flight``)."""
        return len(self._held)

    @property
    def _blocked(self) -> bool:
        """Windows must wait: a final is out (stateful model), or any window is out (``one_in_flight``)."""
        return bool((self.gated and self._finals_out) or (self.one_in_flight and self.outstanding))

    @property
    def has_ready(self) -> bool:
        return bool(self._held) and not self._blocked

    @property
    def idle(self) -> bool:
        """Nothing held and nothing out: every admitted window has had its result (or was lost)."""
        return not self._held and self.outstanding == 0

    def admit(self, window: Window, tag: T) -> None:
        """Queue the stream's next window (stream order); take it back with :meth:`ready`."""
        held = self._held
        if held and not held[-1][0].final:
            # Only the newest held item can be a partial: anything newer supersedes it.
            held.pop()
            self.superseded += 1
        if self._blocked:
            self.held_total += 1
        held.append((window, tag))

    def ready(self) -> list[Released[T]]:
        """The windows cleared to run now, in order, each with the state it must run with."""
        out: list[Released[T]] = []
        held = self._held
        while held and not self._blocked:
            window, tag = held.popleft()
            out.append(Released(window, tag, self._state_rows()))
            self.outstanding += 1
            if window.final:
                self._finals_out += 1
        return out

    def lost(self, window: Window) -> None:
        """A released window will have no result (dropped, refused, failed): stop waiting for it."""
        self._resolve(window)

    # -- results -----------------------------------------------------------------------------

    def result(
        self,
        window: Window,
        probs: np.ndarray,
        avd: np.ndarray,
        *,
        gender: np.ndarray | None,
        state_updates: Mapping[str, np.ndarray] | None,
        latency_ms: float,
        ts: float,
        clock_offset_s: float = 0.0,
        utterance_offset: int = 0,
    ) -> dict[str, Any]:
        """Fold one window's result in and return its ``emotion`` event.

        ``state_updates`` are this row's state outputs (a final's are added to
        the speaker state). ``clock_offset_s``/``utterance_offset``: where the
        window's file starts in the stream (offline streams of several files);
        the smoother runs on stream time, the event's ``t0``/``t1`` stay in
        file time. The window is resolved even when its result is unusable
        (ValueError), so the gate never waits on it.
        """
        try:
            final = window.final
            t1 = window.end / SAMPLE_RATE
            mood = self.smoother.update(probs, avd, clock_offset_s + t1, final)
            if final and state_updates:
                for name, speaker in self.states.items():
                    update = state_updates.get(name)
                    if update is not None:
                        speaker.update(update)
            seq = self.seq
            self.seq += 1
            return events.emotion_event(
                self.stream, seq=seq, kind=window.kind, utterance=utterance_offset + window.utterance,
                t0=window.start / SAMPLE_RATE, t1=t1, labels=self.labels, probs=probs, avd=avd,
                smoothed=mood, latency_ms=latency_ms, ts=ts, gender=gender, model=self.model_version,
                call=self.call, role=self.role,
            )
        finally:
            self._resolve(window)

    # -- internals ---------------------------------------------------------------------------

    def _resolve(self, window: Window) -> None:
        if self.outstanding <= 0:
            raise ValueError(f"stream {self.stream!r}: a result for a window that was not released")
        self.outstanding -= 1
        if window.final:
            self._finals_out -= 1

    def _state_rows(self) -> dict[str, np.ndarray | None]:
        if not self.states:
            return {}
        return {name: None if s.empty else s.value() for name, s in self.states.items()}
