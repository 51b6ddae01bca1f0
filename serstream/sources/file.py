"""File replay: any file :mod:`serstream.audiofile` reads, at its native rate and channels, into one stream.

libsndfile reads WAV, FLAC, AIFF, Ogg Vorbis ...; FFmpeg (PyAV) what
recorders write besides (M4A/AAC, MP4, Opus in WebM or Ogg, MP3). Its
stream id is ``file:NAME`` (``file:NAME-2`` ... when another stream has
it: the rule of :mod:`serstream.core.stream_ids`).

In real time the blocks (``chunk_s``, 20 ms) are paced by a monotonic
clock, as a microphone would deliver them: a block is pushed once its
duration has elapsed, at ``start + (frames before it + its frames) / rate``.
Every real-time file of the process is driven by one thread, the shared
pacer of :mod:`serstream.sources.pacer` (a thread per file made 100 files
100 threads contending for the GIL, and the monitor's pipeline starved). As
fast as possible (``realtime=False``) a file has a thread of its own that
waits for ring space instead of overwriting, so a replay never drops audio
(it is bounded by the monitor, not by a clock).

Either way the file is read 0.5 s at a time and the blocks are cut from
memory (:class:`~serstream.sources.pacer.ReadAhead`), so a block costs no
decoder call; the blocks are exactly those of reading block by block.
Opening an unreadable file raises :class:`~serstream.monitor.SourceError`;
a read failure later is reported on the stream (``decode_error``, after the
audio read before it has been pushed) and closes it; the process's other
files go on.

With ``split=True`` a file of two or more channels is a call: one stream per
channel, ``file:NAME:left`` and ``file:NAME:right`` (roles from ``roles``,
:mod:`serstream.core.parties`), each with ``call`` ``file:NAME``. Every block
is pushed to all the parties at once (as fast as possible: after waiting for
room in all their rings), so the same instant has the same ``t0`` in each. A
mono file is not split (``split_skipped`` says so).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from serstream.audiofile import AudioReader, open_audio
from serstream.core.parties import PartySplit, plan_parties
from serstream.core.stream_ids import MAX_SUFFIX, candidates
from serstream.errors import one_line
from serstream.monitor import SourceError, StreamIdTaken
from serstream.sources.pacer import Pacer, ReadAhead, block_due, read_ahead_frames, shared_pacer

if TYPE_CHECKING:
    from serstream.monitor import Monitor, StreamHandle

__all__ = ["FileSource", "open_audio_file"]


def open_audio_file(path: str | Path) -> AudioReader:
    """Open ``path`` for reading (libsndfile, else FFmpeg), or raise SourceError with a one-line reason."""
    return open_audio(path)


class FileSource:
    """Replay one file into the monitor: in real time on the shared pacer, else on a thread of its own.

    ``pacer``: the :class:`~serstream.sources.pacer.Pacer` for real-time
    replay (default the process's :func:`~serstream.sources.pacer.shared_pacer`).
    """

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
        pacer: Pacer | None = None,
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
        self._thread: threading.Thread | None = None  # as fast as possible only
        self._pacer = pacer  # real time only; the shared one unless given
        self._ahead = ReadAhead(self.chunk, self.channels)
        self._piece = read_ahead_frames(self.chunk, self.sample_rate)
        self._read_error: Exception | None = None  # raised once the audio read before it is pushed
        # One step (read, push) or the finish (close the file and the streams) at a time: stop() may
        # come from any thread while the pacer is reading this file, and a closed file must not be read.
        self._lock = threading.Lock()
        self._started_at = 0.0
        self._next: np.ndarray | None = None  # real time: the block due next
        self._started = False
        self._finished = False

    @property
    def duration_s(self) -> float:
        return self._file.frames / self.sample_rate if self._file.frames > 0 else 0.0

    def start(self) -> None:
        """Open the monitor stream (split: the parties' streams) and start the replay (pacer or thread)."""
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
        self._started = True
        if self.realtime:
            if self._pacer is None:
                self._pacer = shared_pacer()
            pacer = self._pacer
            self._started_at = pacer.clock()
            # The first step only reads ahead and says when the first block is due (a read error fails there).
            pacer.add(self, self._started_at)
        else:
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
        """Stop early and close (flush) the stream(s); returns once they are closed. Safe to call twice."""
        self._stop.set()
        if not self._started:
            return
        if self.realtime:
            if self._pacer is not None:
                self._pacer.remove(self)
            with self._lock:  # waits for a step in progress (a block's push, at most one read)
                self._finish("stopped")
        elif self._thread is not None:
            self._thread.join(timeout=5)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the replay to end; True when it has."""
        return self.done.wait(timeout)

    # ------------------------------------------------------------ real time: called by the pacer

    def pace(self, now: float) -> float | None:
        """Push the block due now, read the next; when it is due, or None when the replay has ended."""
        with self._lock:
            if self._finished:
                return None
            try:
                if self._next is not None:
                    if any(handle.closed for handle in self._handles):
                        self._finish("end")
                        return None
                    self._push(self._next)
                self._next = self._next_block()
            except Exception as exc:  # noqa: BLE001 - any read failure is this stream's, reported on it
                self._fail(exc)
                return None
            if self._next is None:
                self._finish("stopped" if self._stop.is_set() else "end")
                return None
            return block_due(self._started_at, self.frames_pushed, self._next.shape[0], self.sample_rate)

    # ------------------------------------------------------------ as fast as possible: a thread per file

    def _run(self) -> None:
        reason = "end"
        try:
            self._replay_fast(self._handles)
            if self._stop.is_set():
                reason = "stopped"
        except Exception as exc:  # noqa: BLE001 - any read failure is this stream's, reported on it
            with self._lock:
                self._fail(exc)
        finally:
            with self._lock:
                self._finish(reason)

    def _replay_fast(self, handles: list[StreamHandle]) -> None:
        while not self._stop.is_set():
            block = self._next_block()
            if block is None:
                return
            # Every party's ring must take the block: the parties stay on one clock.
            for handle in handles:
                while not handle.wait_for_space(block.shape[0], timeout=0.5):
                    if self._stop.is_set() or handle.closed:
                        return
            if any(handle.closed for handle in handles):
                return
            self._push(block)

    # ------------------------------------------------------------ both

    def _next_block(self) -> np.ndarray | None:
        """The file's next block (rewinding when looping), or None at its end; a read error is raised here
        once every frame read before it has been taken."""
        while True:
            block = self._ahead.take()
            if block is None:
                self._read_more()
                continue
            if block.shape[0]:
                return block
            if self._read_error is not None:
                raise self._read_error
            if self.loop and self.frames_pushed > 0 and not self._stop.is_set():
                self._file.rewind()
                self._ahead.restart()
                continue
            return None

    def _read_more(self) -> None:
        try:
            piece = self._file.read(self._piece)
        except Exception as exc:  # noqa: BLE001 - reported once the audio before it is pushed
            self._read_error = exc
            self._ahead.end()
            return
        if piece.shape[0] == 0:
            self._ahead.end()
        else:
            self._ahead.feed(piece)

    def _push(self, block: np.ndarray) -> None:
        if self.split is None:
            self._handles[0].push(block)
        else:
            for handle, mono in zip(self._handles, self.split.split(block), strict=True):
                handle.push(mono)
        self.frames_pushed += block.shape[0]

    def _fail(self, exc: Exception) -> None:
        """Report a read failure on every stream of this file and close them (caller holds the lock)."""
        if self._finished:
            return
        # The reader's SourceError already names the file and the cause.
        known = isinstance(exc, SourceError)
        self.error = str(exc) if known else f"cannot read audio file {self.path}: {one_line(exc)}"
        for handle in self._handles:
            handle.fail(self.error, code="decode_error")
        self._finish("error")

    def _finish(self, reason: str) -> None:
        """Close the file and the streams once (caller holds the lock): the monitor flushes them."""
        if self._finished:
            return
        self._finished = True
        self._next = None
        try:
            self._file.close()
        finally:
            for handle in self._handles:
                handle.close(reason=reason)
            self.done.set()
