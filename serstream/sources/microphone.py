"""Live capture from an input device through PortAudio (sounddevice).

The PortAudio callback does the least it can: it hands the block to
:meth:`StreamHandle.push` (which copies it into the stream's ring) and counts
overflow flags. Device lookup and every PortAudio failure become
:class:`~serstream.monitor.SourceError` with a one-line message; a device that
does not exist gets the list of the input devices that do.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from serstream.errors import SourceError, one_line

if TYPE_CHECKING:
    from serstream.monitor import Monitor, StreamHandle

__all__ = [
    "DeviceInfo",
    "list_input_devices",
    "resolve_input_device",
    "MicrophoneSource",
]

_NO_PORTAUDIO = (
    "no audio: the PortAudio library could not be loaded (install libportaudio2, "
    "e.g. scripts/install-system-deps.sh)"
)


@dataclass(frozen=True)
class DeviceInfo:
    """One input device as PortAudio reports it."""

    index: int
    name: str
    hostapi: str
    max_input_channels: int
    default_samplerate: float

    def describe(self) -> str:
        return (f"{self.index}: {self.name} ({self.hostapi}, {self.max_input_channels} ch, "
                f"{self.default_samplerate:g} Hz)")


def _sounddevice() -> Any:
    """Import sounddevice lazily: it raises OSError at import when libportaudio is missing."""
    try:
        import sounddevice
    except OSError as exc:
        raise SourceError(_NO_PORTAUDIO) from exc
    return sounddevice


def list_input_devices() -> list[DeviceInfo]:
    """Every device with at least one input channel, in PortAudio's order."""
    sd = _sounddevice()
    try:
        devices = sd.query_devices()
        hostapis = sd.query_hostapis()
    except sd.PortAudioError as exc:
        raise SourceError(f"PortAudio could not list devices: {one_line(exc, limit=None)}") from exc
    found: list[DeviceInfo] = []
    for index, dev in enumerate(devices):
        if int(dev["max_input_channels"]) <= 0:
            continue
        found.append(
            DeviceInfo(
                index=index,
                name=str(dev["name"]),
                hostapi=str(hostapis[int(dev["hostapi"])]["name"]),
                max_input_channels=int(dev["max_input_channels"]),
                default_samplerate=float(dev["default_samplerate"]),
            )
        )
    return found


def _default_input_index(sd: Any) -> int | None:
    try:
        index = sd.default.device[0]
    except (TypeError, IndexError):
        index = sd.default.device
    if index is None or int(index) < 0:
        return None
    return int(index)


def resolve_input_device(device: int | str | None, devices: list[DeviceInfo] | None = None) -> DeviceInfo:
    """Find the input device named by index, exact name or unique name fragment (None: the default)."""
    inputs = list_input_devices() if devices is None else devices
    if not inputs:
        raise SourceError(
            "no audio input device found (is a microphone connected? PortAudio may lack "
            "libportaudio2's backends or a running PulseAudio/PipeWire server)"
        )
    listing = "; ".join(d.describe() for d in inputs)
    if device is None:
        index = _default_input_index(_sounddevice())
        by_index = {d.index: d for d in inputs}
        if index is None or index not in by_index:
            # No default input: the first input device is the only sensible choice.
            return inputs[0]
        return by_index[index]
    if isinstance(device, int) or (isinstance(device, str) and device.strip().isdigit()):
        wanted = int(device)
        for info in inputs:
            if info.index == wanted:
                return info
        raise SourceError(f"no input device with index {wanted}; input devices: {listing}")
    name = str(device).strip()
    exact = [d for d in inputs if d.name == name]
    if exact:
        return exact[0]
    partial = [d for d in inputs if name.lower() in d.name.lower()]
    if len(partial) == 1:
        return partial[0]
    if len(partial) > 1:
        raise SourceError(f"input device name {name!r} is ambiguous; input devices: {listing}")
    raise SourceError(f"no input device named {name!r}; input devices: {listing}")



class MicrophoneSource:
    """Capture one input device into one monitor stream.

    ``sample_rate=None`` uses the device's default rate (the monitor resamples);
    ``channels`` is how many channels to open (down-mixed to mono by the monitor).
    """

    def __init__(
        self,
        monitor: Monitor,
        device: int | str | None = None,
        sample_rate: int | None = None,
        channels: int = 1,
        blocksize: int | None = None,
        stream_id: str | None = None,
    ) -> None:
        if sample_rate is not None and sample_rate < 1:
            raise SourceError(f"sample rate must be a positive number of Hz, got {sample_rate}")
        self.monitor = monitor
        self.device = resolve_input_device(device)
        self.sample_rate = int(sample_rate or round(self.device.default_samplerate))
        if channels < 1:
            raise SourceError(f"channels must be >= 1, got {channels}")
        self.channels = min(int(channels), self.device.max_input_channels)
        # 20 ms blocks: small enough for low latency, large enough to keep callbacks cheap.
        self.blocksize = int(blocksize or max(1, self.sample_rate // 50))
        # The base id; start() may give it a suffix (``mic:NAME-2``) if another stream has it.
        self.stream_id = stream_id or f"mic:{self.device.name}"
        self.overflows = 0
        self.callbacks = 0
        self.first_callback = threading.Event()
        self._handle: StreamHandle | None = None
        self._stream: Any = None
        self._stopping = False

    def start(self) -> None:
        """Open the PortAudio stream and the monitor stream; raises SourceError on failure."""
        sd = _sounddevice()
        self._handle = self.monitor.open_stream(
            self.stream_id,
            source="microphone",
            codec="pcm_f32",
            sample_rate=self.sample_rate,
            channels=self.channels,
            detail=self.device.describe(),
            unique=True,
        )
        self.stream_id = self._handle.stream_id
        try:
            self._stream = sd.InputStream(
                device=self.device.index,
                samplerate=self.sample_rate,
                channels=self.channels,
                dtype="float32",
                blocksize=self.blocksize,
                callback=self._callback,
                finished_callback=self._finished,
            )
            self._stream.start()
        except (sd.PortAudioError, ValueError) as exc:
            self._handle.close(reason="error")
            raise SourceError(
                f"cannot open input device {self.device.index} ({self.device.name}) at "
                f"{self.sample_rate} Hz, {self.channels} ch: {one_line(exc, limit=None)}"
            ) from exc

    def _callback(self, indata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
        # Runs on PortAudio's thread: copy the block into the ring and return; nothing else.
        self.callbacks += 1
        if status and status.input_overflow:
            self.overflows += 1
            self._handle.note_overflow()  # type: ignore[union-attr]
        self._handle.push(indata)  # type: ignore[union-attr]
        if not self.first_callback.is_set():
            self.first_callback.set()

    def _finished(self) -> None:
        # PortAudio ended the stream without being asked (device unplugged, driver error).
        if not self._stopping and self._handle is not None:
            self._handle.fail("input device stopped delivering audio (PortAudio stream finished)", code="device_error")

    @property
    def description(self) -> str:
        return f"listening to {self.device.describe()} at {self.sample_rate} Hz"

    @property
    def stream_ids(self) -> list[str]:
        handle = self._handle
        return [handle.stream_id] if handle is not None and not handle.closed else []

    def stats(self) -> dict[str, Any]:
        return {"callbacks": self.callbacks, "overflows": self.overflows}

    def stop(self) -> None:
        """Stop capture and close the monitor stream (its open segment is flushed)."""
        self._stopping = True
        if self._stream is not None:
            try:
                self._stream.stop()
                self._stream.close()
            except Exception:  # noqa: BLE001 - a failing close must not hide the shutdown
                pass
            self._stream = None
        if self._handle is not None:
            self._handle.close()
