"""The one place that opens audio files for reading, and the one list of what counts as one.

Recorders write what libsndfile cannot read: phones and meeting tools save
AAC in M4A/MP4, browsers Opus in WebM or Ogg. So :func:`open_audio` tries
libsndfile first (through soundfile: WAV, FLAC, AIFF, Ogg Vorbis, MP3 where
the bundled libsndfile has it ...), and when libsndfile does not recognise
the file, FFmpeg's decoders through PyAV (``av``; its wheels bundle FFmpeg,
so no system ffmpeg is needed). Either way the caller gets an
:class:`AudioReader`: float32 blocks ``[frames, channels]`` at the file's
native rate and channel count (resampling and down-mixing stay in the
pipeline), read block by block, so a two-hour recording is never decoded
into memory at once.

Every failure, at open or later (a corrupt packet, a truncated file), is a
:class:`~serstream.errors.SourceError` whose message is one line naming the
file and the cause: ``serstream listen --file`` refuses to start on it,
``serstream analyze`` reports it for that file and goes on with the others.

:func:`expand_audio_paths` turns folder arguments into the audio files under
them (recursively, by :data:`AUDIO_EXTENSIONS`, hidden entries skipped,
sorted by relative path so every run sees the same order).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path
from types import TracebackType
from typing import Any, Iterator, Sequence

import numpy as np
import soundfile as sf

from serstream.errors import SourceError, one_line

__all__ = [
    "AUDIO_EXTENSIONS",
    "AudioReader",
    "SourceError",
    "audio_files_under",
    "expand_audio_paths",
    "open_audio",
]

#: What a folder argument picks up (lower case, no dot): libsndfile's containers and FFmpeg's usual audio ones.
AUDIO_EXTENSIONS: tuple[str, ...] = (
    "wav", "wave", "w64", "rf64", "flac", "aif", "aiff", "aifc", "caf", "au", "snd",
    "ogg", "oga", "opus", "spx", "mp3", "mp2", "m4a", "m4b", "mp4", "aac", "3gp", "amr",
    "webm", "weba", "mka", "mkv", "wma",
)

#: Extensions libsndfile owns: when neither decoder reads such a file, libsndfile's reason is the one shown.
_SNDFILE_NATIVE = frozenset({"wav", "wave", "w64", "rf64", "flac", "aif", "aiff", "aifc", "caf", "au", "snd"})

#: Full scale of the integer sample formats FFmpeg decoders output (planar "p" variants alike).
_INT_SCALE = {"s16": 32768.0, "s32": 2147483648.0, "s64": 9223372036854775808.0}


class AudioReader(ABC):
    """An open audio file: float32 blocks at its native rate and channel count.

    ``frames`` is the length in frames as far as it is known: the header's
    count for libsndfile; for FFmpeg the container's duration estimate (0
    when it has none) until the end is reached, then the exact number read.
    ``codec`` names the encoding for the ``stream`` event (``pcm_16``,
    ``aac``, ``opus`` ...); ``decoder`` is ``libsndfile`` or ``ffmpeg``.
    """

    path: Path
    sample_rate: int
    channels: int
    frames: int
    codec: str
    decoder: str

    @abstractmethod
    def read(self, frames: int) -> np.ndarray:
        """Up to ``frames`` frames as float32 ``[n, channels]``; ``n == 0`` only at the end. SourceError on failure."""

    @abstractmethod
    def rewind(self) -> None:
        """Start again from the first frame (``--loop``). SourceError on failure."""

    @abstractmethod
    def close(self) -> None:
        """Release the file; reading after it is an error."""

    def __enter__(self) -> AudioReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _error(self, exc: BaseException | str) -> SourceError:
        # FFmpeg's errors (and OSError) carry "[Errno N] text: 'path'": the text alone is the cause.
        strerror = getattr(exc, "strerror", None)
        reason = strerror if isinstance(strerror, str) and strerror else exc
        return SourceError(f"cannot read audio file {self.path}: {one_line(reason)}")


def open_audio(path: str | Path) -> AudioReader:
    """Open ``path`` for reading with libsndfile, else with FFmpeg (PyAV); SourceError with one line if neither can."""
    p = Path(path)
    if not p.exists():
        raise SourceError(f"audio file not found: {p}")
    if p.is_dir():
        raise SourceError(f"audio file is a directory: {p}")
    if p.is_file() and p.stat().st_size == 0:
        raise SourceError(f"cannot read audio file {p}: the file is empty")
    try:
        return _SndfileReader(p)
    except SourceError as sndfile_error:
        try:
            return _AvReader(p)
        except SourceError as av_error:
            # Both refused: show the reason of the decoder that should have read this kind of file.
            native = p.suffix.lower().lstrip(".") in _SNDFILE_NATIVE
            raise (sndfile_error if native else av_error) from None


class _SndfileReader(AudioReader):
    """libsndfile through soundfile: exact frame counts and sample-accurate seeking."""

    decoder = "libsndfile"

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._file = sf.SoundFile(str(path))
        except Exception as exc:  # noqa: BLE001 - LibsndfileError, RuntimeError, OSError, TypeError: all "unreadable"
            raise self._error(exc) from None
        if self._file.samplerate <= 0 or self._file.channels <= 0:
            self._file.close()
            raise self._error("no audio channels or rate")
        self.sample_rate = int(self._file.samplerate)
        self.channels = int(self._file.channels)
        self.frames = max(0, int(self._file.frames))
        self.codec = str(self._file.subtype or self._file.format).lower()

    def read(self, frames: int) -> np.ndarray:
        try:
            block: np.ndarray = self._file.read(frames, dtype="float32", always_2d=True)
        except Exception as exc:  # noqa: BLE001 - a file corrupt past its header
            raise self._error(exc) from None
        return block

    def rewind(self) -> None:
        try:
            self._file.seek(0)
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc) from None

    def close(self) -> None:
        self._file.close()


class _AvReader(AudioReader):
    """FFmpeg's demuxers and decoders through PyAV, the first audio stream, decoded as it is read.

    Decoded frames are kept only until a ``read`` takes them: at most one
    codec frame (about 20-60 ms of audio) beyond what was asked for. The
    first frame is decoded at open, so a file whose header parses but whose
    audio does not decode is refused before anything starts.
    """

    decoder = "ffmpeg"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sample_rate = self.channels = 0  # known from the first decoded frame
        self._container: Any = None
        self._frames_iter: Iterator[Any] | None = None
        self.codec = "unknown"
        self._pending: list[np.ndarray] = []  # decoded [n, channels] blocks not yet read
        self._pending_frames = 0
        self._read_frames = 0  # frames handed out since the last rewind
        self._ended = False
        stream = self._open()
        try:
            self.codec = str(getattr(stream.codec_context, "name", None) or "unknown")
            first = self._next_frame()
            if first is None:
                raise self._error("no decodable audio in it")
            self.sample_rate = int(first.sample_rate)
            self.channels = int(first.layout.nb_channels)
            if self.sample_rate <= 0 or self.channels <= 0:
                raise self._error("no audio channels or rate")
            self.frames = _estimated_frames(self._container, stream, self.sample_rate)
            block = self._convert(first)  # after rate and channels are known: it checks against them
        except BaseException:
            self.close()  # a refused file leaves no FFmpeg context open
            raise
        self._pending, self._pending_frames = [block], block.shape[0]

    def _open(self) -> Any:
        """Open the container and start decoding its first audio stream, which is returned."""
        import av  # only when libsndfile could not read the file: FFmpeg's libraries load on first use

        try:
            self._container = av.open(str(self.path), mode="r")
        except Exception as exc:  # noqa: BLE001 - av.FFmpegError subclasses (also OSError/ValueError)
            raise self._error(exc) from None
        if not self._container.streams.audio:
            self.close()
            raise self._error("no audio stream in it")
        stream = self._container.streams.audio[0]
        self._frames_iter = iter(self._container.decode(stream))
        self._ended = False
        return stream

    def _next_frame(self) -> Any:
        """The next decoded audio frame, or None at the end; SourceError when FFmpeg fails."""
        if self._ended or self._frames_iter is None:
            return None
        try:
            return next(self._frames_iter)
        except StopIteration:
            self._ended = True
            return None
        except Exception as exc:  # noqa: BLE001 - InvalidDataError and friends: corrupt or truncated data
            self._ended = True
            # FFmpeg's own words can mislead (a bad AAC frame reads "Operation not permitted"): say where and what.
            ffmpeg = getattr(exc, "strerror", None) or one_line(exc)
            if not self.sample_rate:  # not one frame decoded yet
                raise self._error(f"cannot decode its {self.codec} audio (FFmpeg: {ffmpeg})") from None
            at = (self._read_frames + self._pending_frames) / self.sample_rate
            raise self._error(f"corrupt audio data after {at:.2f} s (FFmpeg: {ffmpeg})") from None

    def _convert(self, frame: Any) -> np.ndarray:
        """One decoded frame as float32 ``[samples, channels]``, whatever FFmpeg's sample format."""
        if int(frame.sample_rate) != self.sample_rate:
            raise self._error(f"the sample rate changes inside the file ({self.sample_rate} -> {frame.sample_rate} Hz)")
        channels = int(frame.layout.nb_channels)
        if channels != self.channels:
            raise self._error(f"the channel count changes inside the file ({self.channels} -> {channels})")
        data = np.asarray(frame.to_ndarray())
        fmt = frame.format
        # Planar: [channels, samples]; packed: [1, samples * channels] interleaved.
        block = data.T if fmt.is_planar else data.reshape(-1, channels)
        name = str(fmt.name).rstrip("p")
        if name in _INT_SCALE:
            return (block.astype(np.float64) / _INT_SCALE[name]).astype(np.float32)
        if name == "u8":
            return ((block.astype(np.float32) - 128.0) / 128.0).astype(np.float32)
        return np.ascontiguousarray(block, dtype=np.float32)

    def read(self, frames: int) -> np.ndarray:
        if self._container is None:
            raise self._error("the file is closed")
        frames = max(0, int(frames))
        while self._pending_frames < frames:
            frame = self._next_frame()
            if frame is None:
                break
            block = self._convert(frame)
            if block.shape[0]:
                self._pending.append(block)
                self._pending_frames += block.shape[0]
        if self._pending_frames == 0:
            if self._ended:
                self.frames = self._read_frames  # the exact length, now that it is known
            return np.zeros((0, self.channels), np.float32)
        joined = self._pending[0] if len(self._pending) == 1 else np.concatenate(self._pending)
        out, rest = joined[:frames], joined[frames:]
        self._pending = [rest] if rest.shape[0] else []
        self._pending_frames = rest.shape[0]
        self._read_frames += out.shape[0]
        if self._ended and not self._pending_frames:
            self.frames = self._read_frames
        return np.ascontiguousarray(out)

    def rewind(self) -> None:
        # Reopening is the one restart every container and codec supports (seeking AAC/Opus needs pre-roll).
        self.close()
        self._pending, self._pending_frames, self._read_frames = [], 0, 0
        self._open()

    def close(self) -> None:
        container, self._container, self._frames_iter = self._container, None, None
        if container is not None:
            container.close()


def _estimated_frames(container: Any, stream: Any, rate: int) -> int:
    """The stream's (else the container's) duration in frames at ``rate``; 0 when neither says."""
    if stream.duration is not None and stream.time_base is not None:
        return max(0, int(round(float(stream.duration * stream.time_base) * rate)))
    if container.duration is not None:
        return max(0, int(round(container.duration / 1_000_000 * rate)))  # AV_TIME_BASE: microseconds
    return 0


# ---------------------------------------------------------------- folder arguments


def audio_files_under(root: Path) -> list[Path]:
    """Audio files under ``root`` (any depth) by extension, hidden files and folders skipped, sorted by relative path.

    Sorting by the relative path's parts (``a/b.wav`` before ``a-b.wav`` and
    ``a/c/d.wav``'s folder order kept) makes the order the same on every
    machine and every run, whatever order the file system lists. Symlinked
    folders are not followed (no loops); an unreadable folder is an error.
    """

    def refuse(exc: OSError) -> None:
        raise SourceError(f"cannot read folder {exc.filename or root}: {exc.strerror or one_line(exc)}")

    found: list[Path] = []
    for folder, subfolders, names in os.walk(root, onerror=refuse):
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        for name in names:
            if not name.startswith(".") and Path(name).suffix.lower().lstrip(".") in AUDIO_EXTENSIONS:
                found.append(Path(folder) / name)
    found.sort(key=lambda path: path.relative_to(root).parts)
    return found


def expand_audio_paths(args: Sequence[str | Path]) -> list[Path]:
    """Each argument as it is, except a folder, which becomes :func:`audio_files_under` it.

    A missing file stays in the list (its reader reports it, as for any
    file); a folder with no audio file in it is a SourceError, one line.
    """
    out: list[Path] = []
    for arg in args:
        path = Path(arg)
        if path.is_dir():
            files = audio_files_under(path)
            if not files:
                raise SourceError(
                    f"no audio files under {path} (none ends in a known audio extension such as .wav, .flac, "
                    ".mp3, .m4a, .opus, .webm; hidden files are skipped)"
                )
            out.extend(files)
        else:
            out.append(path)
    return out
