"""Speech segmentation of one stream with webrtcvad: samples in, segment events out.

The segmenter cuts the stream into fixed frames (10, 20 or 30 ms), asks
webrtcvad whether each frame is voiced, and runs a small state machine:

* **idle -> speech** when at least ``start_ms`` of voiced frames fall within
  the last ``start_window_ms``. The segment then begins ``pre_roll_ms``
  before the first voiced frame of that window (as far as history reaches),
  so word onsets are not clipped.
* **speech -> idle** after ``hangover_ms`` of consecutive unvoiced frames.
  The hangover audio stays in the segment (it was already handed out as
  :class:`SpeechAudio` while it was unknown whether speech would resume;
  trimming it would delay every partial by the hangover).
* A segment that would grow past ``max_segment_ms`` is split: ``SpeechEnd``
  with reason ``"max_length"`` and, when the latest frame was voiced, a new
  ``SpeechStart`` at the same index, so long speech is split, never lost.
* A jump of the sample clock (``push(..., index=...)`` past the expected
  index, i.e. audio dropped upstream) ends an open segment at the last
  contiguous sample with reason ``"gap"``; ``flush()`` ends it with ``"flush"``.

``SpeechEnd.too_short`` is set when the voiced part of the segment (first
voiced frame to the end of the last voiced frame) is shorter than
``min_segment_ms``; pre-roll and hangover do not count, since with the
defaults they alone would make every segment long enough.

Frames are aligned to the stream clock (``start_index`` and the index after
each gap), never to push boundaries, so the events do not depend on how the
audio is chunked; only how :class:`SpeechAudio` pieces are merged does (one
piece per push per segment, to keep object counts low with many streams).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import webrtcvad

from serstream.core.audio import float_to_pcm16

__all__ = [
    "VAD_SAMPLE_RATES",
    "VAD_FRAME_MS",
    "VadConfig",
    "SpeechStart",
    "SpeechAudio",
    "SpeechEnd",
    "VadEvent",
    "VadSegmenter",
]

VAD_SAMPLE_RATES = (8000, 16000, 32000, 48000)
VAD_FRAME_MS = (10, 20, 30)

REASON_SILENCE = "silence"
REASON_MAX_LENGTH = "max_length"
REASON_FLUSH = "flush"
REASON_GAP = "gap"


@dataclass(frozen=True)
class VadConfig:
    """Segmenter settings; times in milliseconds. ``validate`` runs on construction.

    Times are rounded up to whole frames (``hangover_ms=400`` with 30 ms frames
    waits 14 frames); a hangover of 0 still ends on the first unvoiced frame.
    """

    sample_rate: int = 16000
    frame_ms: int = 30
    aggressiveness: int = 2
    pre_roll_ms: int = 300
    start_ms: int = 150
    hangover_ms: int = 400
    min_segment_ms: int = 300
    max_segment_ms: int = 10000
    #: Sliding window in which ``start_ms`` of voiced frames must fall to start a segment.
    start_window_ms: int = 300

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError with a one-line reason when the settings cannot work."""
        if self.sample_rate not in VAD_SAMPLE_RATES:
            raise ValueError(f"VAD sample rate must be one of {VAD_SAMPLE_RATES} Hz, got {self.sample_rate}")
        if self.frame_ms not in VAD_FRAME_MS:
            raise ValueError(f"VAD frame length must be one of {VAD_FRAME_MS} ms, got {self.frame_ms}")
        if self.aggressiveness not in (0, 1, 2, 3):
            raise ValueError(f"VAD aggressiveness must be 0..3, got {self.aggressiveness}")
        for name in ("pre_roll_ms", "hangover_ms", "min_segment_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"VAD {name} must be >= 0, got {getattr(self, name)}")
        if self.start_ms <= 0:
            raise ValueError(f"VAD start_ms must be > 0, got {self.start_ms}")
        if self.start_window_ms < self.start_ms:
            raise ValueError(
                f"VAD start_window_ms ({self.start_window_ms}) must be >= start_ms ({self.start_ms})"
            )
        # A fresh segment already holds pre-roll plus the start window; it must fit with room to grow.
        least = self.pre_roll_ms + self.start_window_ms + 2 * self.frame_ms
        if self.max_segment_ms < least:
            raise ValueError(
                f"VAD max_segment_ms ({self.max_segment_ms}) must be >= pre_roll_ms + start_window_ms "
                f"+ 2 frames = {least}"
            )

    @property
    def frame_samples(self) -> int:
        return self.sample_rate * self.frame_ms // 1000

    def ms_to_samples(self, ms: int) -> int:
        return self.sample_rate * ms // 1000

    def ms_to_frames(self, ms: int) -> int:
        """Whole frames covering at least ``ms``."""
        return math.ceil(ms / self.frame_ms)


@dataclass(frozen=True)
class SpeechStart:
    """A segment begins; ``index`` is its first sample (pre-roll included)."""

    index: int


@dataclass(frozen=True)
class SpeechAudio:
    """Segment audio starting at ``index``; pieces of one segment are contiguous and in order."""

    index: int
    samples: np.ndarray = field(repr=False, compare=False)

    @property
    def end(self) -> int:
        return self.index + int(self.samples.size)


@dataclass(frozen=True)
class SpeechEnd:
    """A segment ends; ``index`` is one past its last sample.

    ``reason`` is ``"silence"``, ``"max_length"``, ``"flush"`` or ``"gap"``;
    ``too_short`` marks segments whose voiced part is under ``min_segment_ms``.
    """

    index: int
    reason: str
    too_short: bool = False


VadEvent = SpeechStart | SpeechAudio | SpeechEnd


class VadSegmenter:
    """Per-stream segmenter; ``push`` float32 samples at ``config.sample_rate``, get events."""

    def __init__(self, config: VadConfig = VadConfig(), start_index: int = 0) -> None:
        if start_index < 0:
            raise ValueError(f"start_index must be >= 0, got {start_index}")
        self.config = config
        self._vad = webrtcvad.Vad(config.aggressiveness)
        self._frame = config.frame_samples
        self._start_frames = config.ms_to_frames(config.start_ms)
        self._window_frames = config.ms_to_frames(config.start_window_ms)
        self._hangover_frames = max(1, config.ms_to_frames(config.hangover_ms))
        self._pre_roll = config.ms_to_samples(config.pre_roll_ms)
        self._min_voiced = config.ms_to_samples(config.min_segment_ms)
        self._max_segment = config.ms_to_samples(config.max_segment_ms)
        history_frames = self._window_frames + config.ms_to_frames(config.pre_roll_ms)

        # Samples not yet forming a whole frame, and the index of their first sample.
        self._partial = np.zeros(0, dtype=np.float32)
        self._partial_index = int(start_index)
        # Idle state: recent frames (start index, audio, voiced) for the start rule and pre-roll.
        self._history: deque[tuple[int, np.ndarray, bool]] = deque(maxlen=history_frames)
        self._window: deque[bool] = deque(maxlen=self._window_frames)
        self._window_voiced = 0
        # Speech state.
        self._in_speech = False
        self._segment_start = 0
        self._voiced_start: int | None = None
        self._voiced_end = 0
        self._silence_run = 0
        # Audio of the open segment produced by the current push, merged into one SpeechAudio.
        self._pending: list[np.ndarray] = []
        self._pending_index = 0

        self.frames = 0
        self.voiced_frames = 0
        self.segments = 0
        self.gaps = 0
        self.gap_samples = 0

    @property
    def in_speech(self) -> bool:
        """True while a segment is open."""
        return self._in_speech

    @property
    def next_index(self) -> int:
        """Absolute index the next pushed sample gets when ``push`` is called without ``index``."""
        return self._partial_index + self._partial.size

    def push(self, samples: np.ndarray, index: int | None = None) -> list[VadEvent]:
        """Feed a 1-D block; ``index`` (optional) is the absolute index of its first sample.

        An ``index`` beyond :attr:`next_index` means samples were lost upstream:
        the open segment ends at the last contiguous sample and framing restarts.
        """
        data = np.asarray(samples)
        if data.ndim != 1:
            raise ValueError(f"VAD takes 1-D blocks, got shape {data.shape}")
        events: list[VadEvent] = []
        if index is not None and index != self.next_index:
            if index < self.next_index:
                raise ValueError(
                    f"VAD input index {index} goes back before the expected index {self.next_index}"
                )
            self._gap(int(index), events)
        buffer = np.concatenate((self._partial, data.astype(np.float32, copy=False)))
        n_frames = buffer.size // self._frame
        used = n_frames * self._frame
        if n_frames:
            pcm = float_to_pcm16(buffer[:used]).tobytes()
            step = 2 * self._frame
            rate = self.config.sample_rate
            for k in range(n_frames):
                voiced = self._vad.is_speech(pcm[k * step:(k + 1) * step], rate)
                frame_index = self._partial_index + k * self._frame
                self._on_frame(frame_index, buffer[k * self._frame:(k + 1) * self._frame], voiced, events)
        # Keep the remainder in a fresh array so it does not pin the whole push buffer.
        self._partial = buffer[used:].copy()
        self._partial_index += used
        self._emit_pending(events)
        return events

    def flush(self) -> list[VadEvent]:
        """End an open segment (stream closed); its unframed tail samples are included."""
        events: list[VadEvent] = []
        self._close_open(REASON_FLUSH, events)
        self._restart_framing(self.next_index)
        return events

    # -- internals -------------------------------------------------------------------------

    def _gap(self, index: int, events: list[VadEvent]) -> None:
        self.gaps += 1
        self.gap_samples += index - self.next_index
        self._close_open(REASON_GAP, events)
        self._restart_framing(index)

    def _close_open(self, reason: str, events: list[VadEvent]) -> None:
        """End an open segment at the last contiguous sample, unframed tail included."""
        if self._in_speech:
            if self._partial.size:
                self._append(self._partial_index, self._partial)
            self._end_segment(self.next_index, reason, events)

    def _restart_framing(self, index: int) -> None:
        # Unframed samples outside a segment are never classified; they were not speech so far.
        self._partial = np.zeros(0, dtype=np.float32)
        self._partial_index = index
        self._reset_idle()

    def _reset_idle(self) -> None:
        self._history.clear()
        self._window.clear()
        self._window_voiced = 0

    def _on_frame(self, index: int, frame: np.ndarray, voiced: bool, events: list[VadEvent]) -> None:
        self.frames += 1
        self.voiced_frames += voiced
        end = index + self._frame
        if not self._in_speech:
            self._idle_frame(index, frame, voiced, events)
            return
        if end - self._segment_start > self._max_segment:
            continuing = self._silence_run == 0
            self._end_segment(index, REASON_MAX_LENGTH, events)
            if not continuing:
                # Speech had already paused: go idle; a resumption starts a new segment normally.
                self._idle_frame(index, frame, voiced, events)
                return
            self._begin_segment(index, events)
        self._append(index, frame)
        if voiced:
            if self._voiced_start is None:
                self._voiced_start = index
            self._voiced_end = end
            self._silence_run = 0
        else:
            self._silence_run += 1
            if self._silence_run >= self._hangover_frames:
                self._end_segment(end, REASON_SILENCE, events)

    def _idle_frame(self, index: int, frame: np.ndarray, voiced: bool, events: list[VadEvent]) -> None:
        if len(self._window) == self._window.maxlen:
            self._window_voiced -= self._window[0]
        self._window.append(voiced)
        self._window_voiced += voiced
        self._history.append((index, frame, voiced))
        if not voiced or self._window_voiced < self._start_frames:
            return
        # Trigger: the segment begins pre_roll before the first voiced frame in the window.
        window_entries = list(self._history)[-len(self._window):]
        first_voiced = next(i for i, _, v in window_entries if v)
        oldest = self._history[0][0]
        start = max(first_voiced - self._pre_roll, oldest)
        self._begin_segment(start, events)
        for frame_index, audio, _ in self._history:
            frame_end = frame_index + audio.size
            if frame_end <= start:
                continue
            self._append(max(frame_index, start), audio[max(0, start - frame_index):])
        self._voiced_start = first_voiced
        self._voiced_end = index + self._frame
        self._reset_idle()

    def _begin_segment(self, index: int, events: list[VadEvent]) -> None:
        self._in_speech = True
        self._segment_start = index
        self._voiced_start = None
        self._voiced_end = index
        self._silence_run = 0
        self.segments += 1
        events.append(SpeechStart(index))

    def _append(self, index: int, audio: np.ndarray) -> None:
        if not self._pending:
            self._pending_index = index
        self._pending.append(audio)

    def _emit_pending(self, events: list[VadEvent]) -> None:
        if self._pending:
            audio = np.concatenate(self._pending)
            events.append(SpeechAudio(self._pending_index, audio))
            self._pending = []

    def _end_segment(self, index: int, reason: str, events: list[VadEvent]) -> None:
        self._emit_pending(events)
        voiced = 0 if self._voiced_start is None else self._voiced_end - self._voiced_start
        events.append(SpeechEnd(index, reason, too_short=voiced < self._min_voiced))
        self._in_speech = False
        self._silence_run = 0
        self._voiced_start = None
        self._reset_idle()
