"""File replay: any file :mod:`serstream.audiofile` reads, at its native rate and channels, into one stream.

libsndfile reads WAV, FLAC, AIFF, Ogg Vorbis ...; FFmpeg (PyAV) what
recorders write besides (M4A/AAC, MP4, Opus in WebM or Ogg, MP3). Its
stream id is ``file:NAME`` (``file:NAME-2`` ... when another stream has
it: the rule of :mod:`serstream.core.stream_ids`). In real time the blocks
are paced by a monotonic clock, as a microphone would deliver them (a block
is pushed once its duration has elapsed). As fast as possible
(``realtime=False``) the reader waits for ring space instead of overwriting,
so a replay never drops audio. Opening an unreadable file raises
:class:`~serstream.monitor.SourceError`; a read failure later is reported on
the stream and closes it.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from serstream.audiofile import AudioReader, open_audio
from serstream.errors import one_line
from serstream.monitor import SourceError

if TYPE_CHECKING:
    from serstream.monitor import Monitor, StreamHandle

__all__ = ["FileSource", "open_audio_file"]


def open_audio_file(path: str | Path) -> AudioReader:
    """Open ``path`` for reading (libsndfile, else FFmpeg), or raise SourceError with a one-line reason."""
    return open_audio(path)


class FileSource:
    """Replay one file into the monitor on a thread of its own."""

    def __init__(
        self,
        monitor: Monitor,
        path: str | Path,
        realtime: bool = True,
        chunk_s: float = 0.02,
        loop: bool = False,
        stream_id: str | None = None,
    ) -> None:
        if chunk_s <= 0:
            raise SourceError(f"chunk length must be > 0 s, got {chunk_s}")
        self.monitor = monitor
        self.path = Path(path)
        self.realtime = realtime
        self.loop = loop
        self._file = open_audio_file(self.path)
        self.sample_rate = self._file.sample_rate
        self.channels = self._file.channels
        self.chunk = max(1, int(round(chunk_s * self.sample_rate)))
        # The base id; start() may give it a suffix (``file:a.wav-2``) if another stream has it.
        self.stream_id = stream_id or f"file:{self.path.name}"
        self.frames_pushed = 0
        self.error: str | None = None
        self.done = threading.Event()
        self._stop = threading.Event()
        self._handle: StreamHandle | None = None
        self._thread: threading.Thread | None = None

    @property
    def duration_s(self) -> float:
        return self._file.frames / self.sample_rate if self._file.frames > 0 else 0.0

    def start(self) -> None:
        """Open the monitor stream and start the replay thread."""
        self._handle = self.monitor.open_stream(
            self.stream_id,
            source="file",
            codec=self._file.codec,
            sample_rate=self.sample_rate,
            channels=self.channels,
            detail=str(self.path),
            unique=True,
        )
        self.stream_id = self._handle.stream_id
        self._thread = threading.Thread(target=self._run, name=f"file-{self.path.name}", daemon=True)
        self._thread.start()

    @property
    def description(self) -> str:
        mode = "in real time" if self.realtime else "as fast as possible"
        return f"replaying {self.path} {mode}{' in a loop' if self.loop else ''}"

    @property
    def stream_ids(self) -> list[str]:
        handle = self._handle
        return [handle.stream_id] if handle is not None and not handle.closed else []

    def stats(self) -> dict[str, Any]:
        return {"frames_pushed": self.frames_pushed, "error": self.error, "done": self.done.is_set()}

    def stop(self) -> None:
        """Stop early; the stream is closed (flushed) by the replay thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the replay to end; True when it has."""
        return self.done.wait(timeout)

    def _run(self) -> None:
        handle = self._handle
        assert handle is not None
        reason = "end"
        try:
            self._replay(handle)
            if self._stop.is_set():
                reason = "stopped"
        except Exception as exc:  # noqa: BLE001 - any read failure is this stream's, reported on it
            # The reader's SourceError already names the file and the cause.
            known = isinstance(exc, SourceError)
            self.error = str(exc) if known else f"cannot read audio file {self.path}: {one_line(exc)}"
            handle.fail(self.error, code="decode_error")
            reason = "error"
        finally:
            self._file.close()
            handle.close(reason=reason)
            self.done.set()

    def _replay(self, handle: StreamHandle) -> None:
        started = time.monotonic()
        while not self._stop.is_set():
            block = self._file.read(self.chunk)
            if block.shape[0] == 0:
                if self.loop and self.frames_pushed > 0:
                    self._file.rewind()
                    continue
                return
            if self.realtime:
                # A microphone delivers a block once it has been captured: at its end time.
                due = started + (self.frames_pushed + block.shape[0]) / self.sample_rate
                delay = due - time.monotonic()
                if delay > 0 and self._stop.wait(delay):
                    return
            else:
                while not handle.wait_for_space(block.shape[0], timeout=0.5):
                    if self._stop.is_set() or handle.closed:
                        return
            if handle.closed:
                return
            handle.push(block)
            self.frames_pushed += block.shape[0]
