"""Turns one stream's speech segments into analysis windows.

While someone speaks, a *partial* window over the most recent ``window_s``
seconds is emitted every ``hop_s`` of new speech (once ``min_window_s`` is
in), so estimates follow the speaker; when the segment ends, one *final*
window covers the whole utterance (its last ``max_window_s`` seconds when
longer).

Partial windows end on a fixed grid (segment start + ``min_window_s`` +
k * ``hop_s``), whatever the size of the audio pieces fed in, so results do
not depend on chunking. When one piece crosses several grid points only the
newest partial is emitted: older ones would be stale before they ran.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from serstream.contract import SAMPLE_RATE
from serstream.core.vad import SpeechAudio, SpeechEnd, SpeechStart, VadEvent

__all__ = ["SchedulerConfig", "Window", "WindowScheduler", "KIND_PARTIAL", "KIND_FINAL"]

KIND_PARTIAL = "partial"
KIND_FINAL = "final"


@dataclass(frozen=True)
class SchedulerConfig:
    """Window lengths in seconds; ``validate`` runs on construction."""

    sample_rate: int = SAMPLE_RATE
    window_s: float = 3.0
    hop_s: float = 0.5
    min_window_s: float = 0.5
    max_window_s: float = 8.0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError with a one-line reason when the settings cannot work."""
        if self.sample_rate <= 0:
            raise ValueError(f"scheduler sample_rate must be > 0, got {self.sample_rate}")
        for name in ("window_s", "hop_s", "min_window_s", "max_window_s"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"scheduler {name} must be > 0, got {value}")
        if self.min_window_s > self.window_s:
            raise ValueError(f"scheduler min_window_s ({self.min_window_s}) exceeds window_s ({self.window_s})")
        if self.max_window_s < self.window_s:
            raise ValueError(f"scheduler max_window_s ({self.max_window_s}) is below window_s ({self.window_s})")

    def samples(self, seconds: float) -> int:
        return max(1, int(round(seconds * self.sample_rate)))


@dataclass(frozen=True)
class Window:
    """Audio to analyse: ``audio`` covers sample indices ``[start, end)`` of the stream."""

    kind: str
    utterance: int
    start: int
    end: int
    audio: np.ndarray = field(repr=False, compare=False)

    @property
    def final(self) -> bool:
        return self.kind == KIND_FINAL


class WindowScheduler:
    """Per-stream scheduler; feed it the segmenter's events in order."""

    def __init__(self, config: SchedulerConfig = SchedulerConfig()) -> None:
        self.config = config
        self._window = config.samples(config.window_s)
        self._hop = config.samples(config.hop_s)
        self._min_window = config.samples(config.min_window_s)
        self._max_window = config.samples(config.max_window_s)
        # The newest `_keep` samples of the utterance live in `_buffer[_head:_tail]`; the buffer
        # is twice that size so appends are amortised O(1): compact only when the end is reached.
        # A partial ends up to one hop before the newest sample, hence window + hop.
        self._keep = max(self._window + self._hop, self._max_window)
        self._buffer = np.zeros(2 * self._keep, dtype=np.float32)
        self._head = 0
        self._tail = 0
        self._open = False
        self._utterance = -1
        self._segment_start = 0
        self._segment_end = 0  # absolute index one past the newest sample fed
        self._next_partial = 0  # absolute index at which the next partial is due
        self.partials = 0
        self.finals = 0
        self.skipped_short = 0

    @property
    def in_utterance(self) -> bool:
        return self._open

    @property
    def buffer_samples(self) -> int:
        """Size of the preallocated audio buffer (fixed for the scheduler's life)."""
        return int(self._buffer.size)

    @property
    def utterances(self) -> int:
        """Utterances started so far."""
        return self._utterance + 1

    def feed(self, event: VadEvent) -> list[Window]:
        """Consume one segmenter event; return the windows it makes due (zero or one)."""
        if isinstance(event, SpeechStart):
            return self._start(event)
        if isinstance(event, SpeechAudio):
            return self._audio(event)
        if isinstance(event, SpeechEnd):
            return self._end(event)
        raise TypeError(f"scheduler cannot take {type(event).__name__}")

    def feed_all(self, events: list[VadEvent]) -> list[Window]:
        """Feed events in order and collect the windows."""
        windows: list[Window] = []
        for event in events:
            windows.extend(self.feed(event))
        return windows

    def _start(self, event: SpeechStart) -> list[Window]:
        if self._open:
            raise ValueError(f"speech start at {event.index} while utterance {self._utterance} is open")
        self._open = True
        self._utterance += 1
        self._segment_start = self._segment_end = event.index
        self._next_partial = event.index + self._min_window
        self._head = self._tail = 0
        return []

    def _audio(self, event: SpeechAudio) -> list[Window]:
        if not self._open:
            raise ValueError(f"speech audio at {event.index} outside an utterance")
        if event.index != self._segment_end:
            raise ValueError(f"speech audio at {event.index} is not contiguous (expected {self._segment_end})")
        self._append(np.asarray(event.samples, dtype=np.float32))
        if self._segment_end < self._next_partial:
            return []
        # Newest grid point reached by this piece; older skipped points would be stale.
        behind = (self._segment_end - self._next_partial) // self._hop
        due = self._next_partial + behind * self._hop
        self._next_partial = due + self._hop
        self.partials += 1
        return [self._make(KIND_PARTIAL, due, self._window)]

    def _end(self, event: SpeechEnd) -> list[Window]:
        if not self._open:
            raise ValueError(f"speech end at {event.index} outside an utterance")
        if event.index != self._segment_end:
            raise ValueError(f"speech end at {event.index} does not match the audio fed (ends {self._segment_end})")
        self._open = False
        length = self._segment_end - self._segment_start
        if event.too_short or length < self._min_window:
            self.skipped_short += 1
            return []
        self.finals += 1
        return [self._make(KIND_FINAL, self._segment_end, self._max_window)]

    def _append(self, samples: np.ndarray) -> None:
        n = samples.size
        if n >= self._keep:
            self._buffer[: self._keep] = samples[n - self._keep:]
            self._head, self._tail = 0, self._keep
        else:
            if self._tail + n > self._buffer.size:
                keep = min(self._tail - self._head, self._keep - n)
                self._buffer[:keep] = self._buffer[self._tail - keep:self._tail]
                self._head, self._tail = 0, keep
            self._buffer[self._tail:self._tail + n] = samples
            self._tail += n
            # Samples older than `_keep` are never needed again.
            self._head = max(self._head, self._tail - self._keep)
        self._segment_end += n

    def _make(self, kind: str, end: int, span: int) -> Window:
        start = max(self._segment_start, end - span)
        stop = self._tail - (self._segment_end - end)
        audio = self._buffer[stop - (end - start):stop].copy()
        return Window(kind=kind, utterance=self._utterance, start=start, end=end, audio=audio)
