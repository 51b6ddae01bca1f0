"""One stream's audio to analysis windows: the part of the monitor that is the same live and offline.

``sanitize -> StreamResampler -> VadSegmenter -> WindowScheduler``, plus the
two clocks a stream has: the *native* sample index of the source (whatever
its rate) and the 16 kHz index the VAD, the scheduler and every event's
``t0``/``t1`` count in. The live monitor (``serstream/monitor.py``) and the
offline analysis (``serstream/analyze.py``) both run one of these per stream
(per file, offline), so what the model card measures through ``analyze`` is
what the monitor does.

Audio comes in as ``(native index of its first sample, samples)``. An index
past the expected one means audio was lost upstream (a ring overwritten, say):
the resampler is flushed, the 16 kHz clock jumps over the missing stretch and
the VAD ends an open segment with reason ``"gap"``, so timestamps stay true to
the stream and no window spans the hole.

Latency marks: the caller passes ``(native index one past a block, when it
arrived)`` pairs in its own clock; each window carries the arrival time of the
block holding its last sample (``WindowReady.arrived``), so latency is
measured from when the audio that completed the window arrived. No clock is
read here: time only comes in as arguments.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from serstream.contract import SAMPLE_RATE
from serstream.core.audio import sanitize
from serstream.core.resample import StreamResampler
from serstream.core.scheduler import SchedulerConfig, Window, WindowScheduler
from serstream.core.vad import SpeechEnd, SpeechStart, VadConfig, VadEvent, VadSegmenter

__all__ = ["SpeechBegan", "SpeechEnded", "WindowReady", "PipelineItem", "StreamPipeline", "clean_in_place"]


@dataclass(frozen=True)
class SpeechBegan:
    """A speech segment starts at 16 kHz index ``index``."""

    index: int

    @property
    def t(self) -> float:
        return self.index / SAMPLE_RATE


@dataclass(frozen=True)
class SpeechEnded:
    """The segment that began at ``start`` ends at ``index`` (16 kHz); ``reason`` as the VAD gives it."""

    index: int
    start: int
    reason: str

    @property
    def t(self) -> float:
        return self.index / SAMPLE_RATE

    @property
    def duration(self) -> float:
        return (self.index - self.start) / SAMPLE_RATE


@dataclass(frozen=True)
class WindowReady:
    """A window to analyse; ``arrived``: when its last sample arrived (the caller's clock)."""

    window: Window
    arrived: float


PipelineItem = SpeechBegan | SpeechEnded | WindowReady


class StreamPipeline:
    """Audio of one stream in (any supported rate, with gaps), speech events and windows out.

    Not thread-safe: one thread feeds it. ``samples_in``, ``bad_samples``
    (non-finite samples replaced by 0) and ``gaps`` count what it saw.
    """

    def __init__(
        self,
        rate: int,
        vad: VadConfig,
        scheduler: SchedulerConfig,
        *,
        track_level: bool = False,
    ) -> None:
        if vad.sample_rate != SAMPLE_RATE:
            raise ValueError(f"the VAD runs at the model rate {SAMPLE_RATE} Hz, got {vad.sample_rate}")
        self.rate = int(rate)
        self.resampler = StreamResampler(self.rate, SAMPLE_RATE)
        self.vad = VadSegmenter(vad)
        self.scheduler = WindowScheduler(scheduler)
        self.track_level = track_level
        self.native_next = 0  # native index the next block should start at
        self.out_next = 0  # 16 kHz index of the next sample fed to the VAD
        # A native index and the 16 kHz index it maps to (moved at every gap).
        self._map_native = 0
        self._map_out = 0
        self._speech_start: int | None = None
        self._marks: deque[tuple[int, float]] = deque()
        self._last_time = 0.0
        self.samples_in = 0
        self.bad_samples = 0
        self.gaps = 0
        self.level = 0.0
        self.finished = False

    @property
    def utterances(self) -> int:
        """Utterances started so far."""
        return self.scheduler.utterances

    def push(
        self,
        index: int,
        samples: np.ndarray,
        now: float,
        marks: Iterable[tuple[int, float]] = (),
    ) -> list[PipelineItem]:
        """Take native-rate mono ``samples`` starting at native ``index``; return what they complete.

        ``samples`` (float32, 1-D) is the caller's to give: it is cleaned in
        place. ``marks``: ``(native index one past a block, arrival time)``
        for the blocks in ``samples``; without any, windows get ``now``.
        """
        if self.finished:
            raise ValueError("stream pipeline already finished")
        self._marks.extend(marks)
        self._last_time = now
        items: list[PipelineItem] = []
        if samples.size == 0:
            return items
        block, bad = clean_in_place(samples)
        self.bad_samples += bad
        if index != self.native_next:
            self._gap(index, items)
        self.native_next = index + block.size
        self.samples_in += block.size
        if self.track_level:
            self.level = float(np.sqrt(np.mean(block * block)))
        self._feed(self.resampler.process(block), items)
        self._trim_marks()
        return items

    def finish(self, now: float) -> list[PipelineItem]:
        """End of the stream: flush the resampler and the VAD (an open segment gets its final)."""
        if self.finished:
            return []
        self._last_time = now
        items: list[PipelineItem] = []
        self._feed(self.resampler.flush(), items)
        self._speech(self.vad.flush(), items)
        self.finished = True
        return items

    # -- internals -------------------------------------------------------------------------

    def _gap(self, index: int, items: list[PipelineItem]) -> None:
        """Native samples ``native_next..index`` never came: jump the 16 kHz clock over them."""
        self.gaps += 1
        self._feed(self.resampler.flush(), items)
        missing = index - self.native_next
        self.out_next += int(round(missing * SAMPLE_RATE / self.rate))
        self._map_native, self._map_out = index, self.out_next

    def _feed(self, audio16: np.ndarray, items: list[PipelineItem]) -> None:
        if audio16.size == 0:
            return
        speech = self.vad.push(audio16, index=self.out_next)
        self.out_next += int(audio16.size)
        if speech:
            self._speech(speech, items)

    def _speech(self, speech: list[VadEvent], items: list[PipelineItem]) -> None:
        for ev in speech:
            if isinstance(ev, SpeechStart):
                self._speech_start = ev.index
                items.append(SpeechBegan(ev.index))
            elif isinstance(ev, SpeechEnd):
                start = self._speech_start if self._speech_start is not None else ev.index
                self._speech_start = None
                items.append(SpeechEnded(ev.index, start, ev.reason))
            for window in self.scheduler.feed(ev):
                items.append(WindowReady(window, self._arrived(window.end)))

    def _arrived(self, end16: int) -> float:
        """When the block holding 16 kHz sample ``end16 - 1`` arrived (its arrival completed the window)."""
        native = self._map_native + int(math.ceil((end16 - self._map_out) * self.rate / SAMPLE_RATE))
        for written, at in self._marks:
            if written >= native:
                return at
        return self._marks[-1][1] if self._marks else self._last_time

    def _trim_marks(self) -> None:
        # Future windows end at or after what the VAD has been fed, less the resampler's
        # delay; 50 ms of slack covers that delay at any rate.
        keep_from = self.native_next - self.rate // 20
        marks = self._marks
        while len(marks) > 1 and marks[0][0] < keep_from:
            marks.popleft()


def clean_in_place(raw: np.ndarray) -> tuple[np.ndarray, int]:
    """Clip ``raw`` (float32, the caller's own copy) to [-1, 1] in place; NaN/inf to 0, counted.

    The dot product is finite exactly when every sample is finite (for audio-range
    values), so the common case costs two vector operations and no allocation.
    """
    if raw.dtype == np.float32 and math.isfinite(float(np.dot(raw, raw))):
        np.clip(raw, -1.0, 1.0, out=raw)
        return raw, 0
    return sanitize(raw)
