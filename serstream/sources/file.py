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

With ``split=True`` a file of two or more channels is a call: one stream per
channel, ``file:NAME:left`` and ``file:NAME:right`` (roles from ``roles``,
:mod:`serstream.core.parties`), each with ``call`` ``file:NAME``. Every block
is pushed to all the parties at once (after waiting for room in all their
rings), so the same instant has the same ``t0`` in each. A mono file is not
split (``split_skipped`` says so).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from serstream.audiofile import AudioReader, open_audio
from serstream.core.parties import PartySplit, plan_parties
from serstream.core.stream_ids import MAX_SUFFIX, candidates
from serstream.errors import one_line
from serstream.monitor import SourceError, StreamIdTaken

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
        split: bool = False,
        roles: str | Sequence[str] | None = None,
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
        #: The parties when the file is split (``start`` fixes their ids); None: one mixed stream.
        self.split: PartySplit | None = None
        #: True when ``split`` was asked for but the file has one channel (it is one stream).
        self.split_skipped = split and self.channels < 2
        self._roles = roles
        if split and self.channels >= 2:
            try:
                self.split = plan_parties(self.stream_id, self.channels, roles)
            except ValueError as exc:
                self._file.close()
                raise SourceError(f"{self.path}: {exc}") from None
        self._handles: list[StreamHandle] = []
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
        """Open the monitor stream (split: the parties' streams) and start the replay thread."""
        codec = self._file.codec
        if self.split is None:
            self._handle = self.monitor.open_stream(
                self.stream_id, source="file", codec=codec, sample_rate=self.sample_rate, channels=self.channels,
                detail=str(self.path), unique=True,
            )
            self.stream_id = self._handle.stream_id
            self._handles = [self._handle]
        else:
            self._open_parties(codec)
        self._thread = threading.Thread(target=self._run, name=f"file-{self.path.name}", daemon=True)
        self._thread.start()

    def _open_parties(self, codec: str) -> None:
        """One stream per party, all under the first free base name (``file:a.wav``, ``file:a.wav-2``, ...)."""
        base_name = self.stream_id
        for base in candidates(base_name):
            split = plan_parties(base, self.channels, self._roles)
            handles: list[StreamHandle] = []
            try:
                for party in split.parties:
                    handles.append(self.monitor.open_stream(
                        party.stream, source="file", codec=codec, sample_rate=self.sample_rate, channels=1,
                        detail=f"{self.path} channel {party.channel + 1}", call=split.call, role=party.role,
                    ))
            except StreamIdTaken:
                for handle in handles:
                    handle.close(reason="stream name taken")
                continue
            except BaseException:
                for handle in handles:
                    handle.close(reason="error")
                raise
            self.split, self.stream_id, self._handles = split, base, handles
            self._handle = handles[0]
            return
        raise SourceError(f"{base_name} and its suffixes -2 to -{MAX_SUFFIX} are all in use")

    @property
    def description(self) -> str:
        mode = "in real time" if self.realtime else "as fast as possible"
        parties = f" as a call ({', '.join(p.role for p in self.split.parties)})" if self.split else ""
        return f"replaying {self.path}{parties} {mode}{' in a loop' if self.loop else ''}"

    @property
    def stream_ids(self) -> list[str]:
        return [handle.stream_id for handle in self._handles if not handle.closed]

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
        handles = self._handles
        assert handles
        reason = "end"
        try:
            self._replay(handles)
            if self._stop.is_set():
                reason = "stopped"
        except Exception as exc:  # noqa: BLE001 - any read failure is this stream's, reported on it
            # The reader's SourceError already names the file and the cause.
            known = isinstance(exc, SourceError)
            self.error = str(exc) if known else f"cannot read audio file {self.path}: {one_line(exc)}"
            for handle in handles:
                handle.fail(self.error, code="decode_error")
            reason = "error"
        finally:
            self._file.close()
            for handle in handles:
                handle.close(reason=reason)
            self.done.set()

    def _replay(self, handles: list[StreamHandle]) -> None:
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
                # Every party's ring must take the block: the parties stay on one clock.
                for handle in handles:
                    while not handle.wait_for_space(block.shape[0], timeout=0.5):
                        if self._stop.is_set() or handle.closed:
                            return
            if any(handle.closed for handle in handles):
                return
            if self.split is None:
                handles[0].push(block)
            else:
                for handle, mono in zip(handles, self.split.split(block), strict=True):
                    handle.push(mono)
            self.frames_pushed += block.shape[0]
