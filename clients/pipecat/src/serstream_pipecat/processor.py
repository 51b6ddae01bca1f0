"""``SerstreamEmotionProcessor``: speech emotion from a serstream monitor, per user turn.

The processor passes every frame through untouched (the same object, in the
same order). Beside that it streams the user's ``InputAudioRawFrame`` audio
to a serstream monitor's ``/ingest`` WebSocket, reads the emotion estimates
the monitor sends back for that stream, and when a user turn has been
analysed it

* pushes an :class:`EmotionFrame` downstream,
* fires the ``on_emotion`` event handler with that frame, and
* optionally (``attach_to_transcription=True``) puts the reading into the
  ``metadata["serstream_emotion"]`` of the ``TranscriptionFrame``\\ s of the
  turn that pass it later.

Turns are delimited by ``UserStartedSpeakingFrame``/``UserStoppedSpeakingFrame``
or, until one of those is seen, by ``VADUserStartedSpeakingFrame``/
``VADUserStoppedSpeakingFrame``.

The monitor is reached with the ``serstream-client`` distribution's
:class:`~serstream_client.IngestClient` (it depends only on ``websockets``),
not by importing serstream: pipecat-ai needs the plain ``onnxruntime``, which
must never share an environment with the monitor's ``onnxruntime-gpu``. A
monitor that is down, a lost connection, a rejected stream or an inference
error is logged once (loguru, Pipecat's logger) and retried in the
background; the pipeline never waits for the monitor and never fails
because of it. Audio that arrives while there is no connection is not
analysed (and counted in :attr:`SerstreamEmotionProcessor.counters`).

A monitor with a token wants ``token=`` (sent as ``Authorization: Bearer``
with the handshake); one serving TLS is reached at ``wss://`` and, with a
self-signed or private certificate, ``ca_file=`` (its PEM file or its CA's).
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from loguru import logger
from pipecat.frames.frames import (
    CancelFrame,
    DataFrame,
    EndFrame,
    Frame,
    InputAudioRawFrame,
    StartFrame,
    TranscriptionFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from serstream_client import (
    AnyEvent,
    EmotionEvent,
    ErrorEvent,
    IngestClient,
    SpeechEvent,
    StreamEvent,
    UnknownEvent,
    client_ssl_context,
)

from serstream_pipecat.turns import EmotionReading, TurnConfig, TurnTracker

__all__ = [
    "EmotionFrame",
    "SerstreamSettings",
    "SerstreamEmotionProcessor",
    "TRANSCRIPTION_METADATA_KEY",
    "SUPPORTED_SCHEMA_VERSION",
]

#: Key of the reading in ``TranscriptionFrame.metadata`` (``attach_to_transcription=True``).
TRANSCRIPTION_METADATA_KEY = "serstream_emotion"
#: The serstream event schema version this plugin was written for.
SUPPORTED_SCHEMA_VERSION = 1
_BYTES_PER_SAMPLE = 2  # Pipecat audio is 16-bit PCM


@dataclass
class EmotionFrame(DataFrame):
    """The emotion of one user turn, as estimated by a serstream monitor.

    Parameters:
        label: The most probable category (the model's labels, e.g. "angry").
        confidence: Its probability.
        probs: Category -> probability, every label of the model.
        arousal: Arousal in [-1, 1].
        valence: Valence in [-1, 1].
        dominance: Dominance in [-1, 1].
        t0: Start of the audio the reading covers, seconds on the monitor's stream clock.
        t1: End of that audio.
        stream: The monitor's stream id of this pipeline's audio.
        turn: 0, 1, 2, ... per processor.
        estimates: How many monitor estimates were combined (weighted by duration).
        final: True when made from final estimates, False when only a partial was there.
    """

    label: str
    confidence: float
    probs: dict[str, float]
    arousal: float
    valence: float
    dominance: float
    t0: float
    t1: float
    stream: str
    turn: int
    estimates: int = 1
    final: bool = True

    @classmethod
    def from_reading(cls, reading: EmotionReading) -> EmotionFrame:
        return cls(
            label=reading.label, confidence=reading.confidence, probs=dict(reading.probs),
            arousal=reading.arousal, valence=reading.valence, dominance=reading.dominance,
            t0=reading.t0, t1=reading.t1, stream=reading.stream, turn=reading.turn,
            estimates=reading.estimates, final=reading.final,
        )

    def __str__(self) -> str:
        return (f"{self.name}(turn: {self.turn}, label: {self.label}, confidence: {self.confidence:.2f}, "
                f"arousal: {self.arousal:+.2f}, valence: {self.valence:+.2f})")


@dataclass(frozen=True)
class SerstreamSettings:
    """How the processor reaches the monitor and matches estimates to turns."""

    #: The monitor: ``ws://HOST:PORT`` (``/ingest`` is added) or the full ``/ingest`` URL.
    url: str = "ws://127.0.0.1:8765"
    #: Stream id on the monitor; default ``pipecat-<random>``.
    stream: str | None = None
    #: The monitor's token, sent as ``Authorization: Bearer`` with the handshake (docs/security.md).
    token: str | None = None
    #: PEM file to verify a ``wss://`` monitor's certificate with (default: the system's CAs).
    ca_file: str | None = None
    #: Put the reading into following ``TranscriptionFrame``\ s' metadata.
    attach_to_transcription: bool = False
    turns: TurnConfig = field(default_factory=TurnConfig)
    open_timeout_s: float = 5.0
    #: Reconnect backoff: first delay, doubled per failure up to the maximum.
    retry_first_s: float = 0.5
    retry_max_s: float = 5.0
    #: Audio waiting to be sent beyond this means the monitor is not keeping up: reconnect.
    max_backlog_s: float = 5.0
    #: On EndFrame, wait at most this long for the last turn's reading.
    end_flush_s: float = 2.0


class SerstreamEmotionProcessor(FrameProcessor):
    """Passes every frame through and adds serstream emotion readings per user turn.

    Event handlers available:

    - on_emotion: Called with the :class:`EmotionFrame` of each analysed user turn.

    Example::

        emotion = SerstreamEmotionProcessor(url="ws://127.0.0.1:8765")

        @emotion.event_handler("on_emotion")
        async def on_emotion(processor, frame):
            print(frame.label, frame.confidence)
    """

    def __init__(self, *, settings: SerstreamSettings | None = None, **kwargs: Any) -> None:
        """Create the processor.

        Args:
            settings: Connection and matching settings; the fields of
                :class:`SerstreamSettings` can also be given as keyword
                arguments (``url=``, ``stream=``, ``attach_to_transcription=``, ...).
            **kwargs: Remaining arguments go to :class:`FrameProcessor`.
        """
        own = {k: kwargs.pop(k) for k in list(kwargs) if k in SerstreamSettings.__dataclass_fields__}
        base = settings or SerstreamSettings()
        self.settings = SerstreamSettings(**{**base.__dict__, **own})
        super().__init__(**kwargs)
        self._requested_stream = self.settings.stream or f"pipecat-{uuid.uuid4().hex[:8]}"
        #: The monitor's id of this pipeline's stream (the requested name, or the one the monitor gave).
        self.stream_id = self._requested_stream
        self.ingest_url = _ingest_url(self.settings.url)
        try:  # checked now, so a bad ca_file is one clear error at construction
            client_ssl_context(self.ingest_url, self.settings.ca_file)
        except ConnectionError as exc:
            raise ValueError(f"serstream ca_file: {exc}") from None
        self._tracker = TurnTracker(self.stream_id, self.settings.turns)
        self._turn_source: str | None = None  # "user" once a User*SpeakingFrame was seen
        self._audio_format: tuple[int, int] | None = None  # (sample_rate, channels)
        self._backlog: deque[bytes] = deque()
        self._backlog_bytes = 0
        self._wake = asyncio.Event()
        self._connected = False
        self._session_connected = False
        self._force_reconnect = False
        self._running = False
        self._ending = False  # EndFrame seen: send what is left, then {"type": "end"}
        self._link_task: asyncio.Task | None = None
        self._settle_task: asyncio.Task | None = None
        self._logged: set[str] = set()
        self._warned_version = False
        #: What happened so far; nothing is dropped without being counted here.
        self.counters: dict[str, float] = {
            "frames": 0, "audio_sent_s": 0.0, "audio_not_analysed_s": 0.0, "connects": 0,
            "connect_failures": 0, "disconnects": 0, "readings": 0, "malformed_messages": 0,
            "monitor_errors": 0,
        }
        self._register_event_handler("on_emotion")

    # ------------------------------------------------------------ frames

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        self.counters["frames"] += 1
        try:
            if isinstance(frame, StartFrame):
                self._start()
            elif isinstance(frame, EndFrame):
                await self._stop(flush=True)
            elif isinstance(frame, CancelFrame):
                await self._stop(flush=False)
            else:
                self._observe(frame)
        except Exception as exc:  # the plugin's trouble must never become the pipeline's
            self._log_once("internal", f"serstream: internal error, frame passed on untouched: "
                           f"{type(exc).__name__}: {exc}")
        await self.push_frame(frame, direction)

    def _observe(self, frame: Frame) -> None:
        now = time.monotonic()
        if isinstance(frame, InputAudioRawFrame):
            self._audio(frame)
        elif isinstance(frame, UserStartedSpeakingFrame):
            self._turn_source = "user"
            self._tracker.user_started(now)
        elif isinstance(frame, UserStoppedSpeakingFrame):
            self._turn_source = "user"
            self._tracker.user_stopped(now)
        elif isinstance(frame, VADUserStartedSpeakingFrame) and self._turn_source is None:
            self._tracker.user_started(now)
        elif isinstance(frame, VADUserStoppedSpeakingFrame) and self._turn_source is None:
            self._tracker.user_stopped(now)
        elif isinstance(frame, TranscriptionFrame) and self.settings.attach_to_transcription:
            reading = self._tracker.current()
            if reading is not None:
                frame.metadata[TRANSCRIPTION_METADATA_KEY] = reading.as_dict()

    def _audio(self, frame: InputAudioRawFrame) -> None:
        seconds = len(frame.audio) / (_BYTES_PER_SAMPLE * max(1, frame.num_channels) * max(1, frame.sample_rate))
        audio_format = (int(frame.sample_rate), int(frame.num_channels))
        if self._audio_format is None:
            self._audio_format = audio_format
            self._wake.set()  # the link waits for the first frame's format
        elif audio_format != self._audio_format:
            # The hello fixed the format: a new one needs a new monitor stream.
            self._audio_format = audio_format
            self._force_reconnect = True
            self._wake.set()
        if not self._connected or self._force_reconnect:
            self.counters["audio_not_analysed_s"] += seconds
            return
        max_bytes = self.settings.max_backlog_s * audio_format[0] * audio_format[1] * _BYTES_PER_SAMPLE
        if self._backlog_bytes + len(frame.audio) > max_bytes:
            self.counters["audio_not_analysed_s"] += seconds + self._backlog_seconds()
            self._log_once("backlog", f"serstream: the monitor at {self.ingest_url} is not keeping up "
                           f"(more than {self.settings.max_backlog_s:g} s of audio waiting); reconnecting")
            self._force_reconnect = True
            self._wake.set()
            return
        self._backlog.append(frame.audio)
        self._backlog_bytes += len(frame.audio)
        self._tracker.audio(seconds)
        self._wake.set()

    def _backlog_seconds(self) -> float:
        if self._audio_format is None:
            return 0.0
        rate, channels = self._audio_format
        return self._backlog_bytes / (rate * channels * _BYTES_PER_SAMPLE)

    # ------------------------------------------------------------ lifecycle

    def _start(self) -> None:
        if self._running:
            return
        self._running = True
        self._ending = False
        self._link_task = self.create_task(self._link_loop(), "serstream_link")
        self._settle_task = self.create_task(self._settle_loop(), "serstream_settle")

    async def _stop(self, flush: bool) -> None:
        if not self._running:
            return
        if flush and self._connected:
            # Ask the monitor to finish the stream: it closes the open utterance and
            # sends its final estimate, which is what settles the last turn.
            self._ending = True
            self._wake.set()
            deadline = time.monotonic() + self.settings.end_flush_s
            while self._tracker.pending() and time.monotonic() < deadline and self._connected:
                await self._emit_due(time.monotonic())
                await asyncio.sleep(0.02)
            await self._emit_due(time.monotonic())
        if flush:
            # No time left to wait: a turn that ended gives what it has (its finals, else its partial).
            await self._emit_due(time.monotonic() + self.settings.turns.settle_timeout_s)
        self._running = False
        for task in (self._settle_task, self._link_task):
            if task is not None:
                await self.cancel_task(task)
        self._settle_task = self._link_task = None
        self._connected = False

    async def cleanup(self) -> None:
        await self._stop(flush=False)
        await super().cleanup()

    # ------------------------------------------------------------ readings

    async def _settle_loop(self) -> None:
        while True:
            await asyncio.sleep(0.05)
            await self._emit_due(time.monotonic())

    async def _emit_due(self, now: float) -> None:
        for reading in self._tracker.due(now):
            frame = EmotionFrame.from_reading(reading)
            self.counters["readings"] += 1
            await self.push_frame(frame)
            await self._call_event_handler("on_emotion", frame)

    # ------------------------------------------------------------ the monitor link

    async def _link_loop(self) -> None:
        """Connect, stream, read; on any trouble log once, back off and try again."""
        failures = 0
        while self._running:
            while self._audio_format is None:
                self._wake.clear()
                await self._wake.wait()
            self._session_connected = False
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not self._ending:  # after our own end the monitor closes: nothing went wrong
                    self._connection_trouble(exc)
            finally:
                self._connected = False
                self._backlog.clear()
                self._backlog_bytes = 0
            if self._ending:
                return  # the stream was finished on purpose; EndFrame stops the processor
            if self._session_connected:
                failures = 0
                self.counters["disconnects"] += 1
            else:
                failures += 1
                self.counters["connect_failures"] += 1
            if self._force_reconnect:
                self._force_reconnect = False
                continue
            delay = min(self.settings.retry_max_s, self.settings.retry_first_s * 2 ** max(0, failures - 1))
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))

    def _connection_trouble(self, exc: BaseException) -> None:
        what = "lost the connection to" if self._session_connected else "cannot reach"
        self._log_once("link", f"serstream: {what} the monitor at {self.ingest_url} ({_describe(exc)}); "
                       "retrying in the background, audio is not analysed meanwhile")

    async def _session(self) -> None:
        assert self._audio_format is not None
        rate, channels = self._audio_format
        client = IngestClient(self.ingest_url, self._requested_stream, rate, "s16le", self.settings.token,
                              channels=channels, open_timeout_s=self.settings.open_timeout_s,
                              ca_file=self.settings.ca_file)
        try:
            await client.open()  # the hello, and the monitor's answer (a refusal raises here)
            self._tracker.new_connection()
            self._connected = True
            self._session_connected = True
            self.counters["connects"] += 1
            if "link" in self._logged:
                logger.info(f"serstream: connected to {self.ingest_url} again (stream {self.stream_id})")
                self._logged.discard("link")
            else:
                logger.debug(f"serstream: streaming to {self.ingest_url} as {self.stream_id}")
            self._logged.discard("backlog")
            reader = asyncio.ensure_future(self._read(client))
            try:
                await self._write(client, reader)
            finally:
                reader.cancel()
                # Collects the reader's outcome; _write has already raised its error.
                await asyncio.gather(reader, return_exceptions=True)
        finally:
            await client.abort()

    async def _write(self, client: IngestClient, reader: asyncio.Future) -> None:
        while self._running and not self._force_reconnect:
            if reader.done():
                exc = reader.exception()
                if exc is not None:
                    raise exc
                raise ConnectionError("the monitor closed the connection")
            if not self._backlog and self._ending:
                await client.end()
                await reader  # the last events, then the monitor closes the connection
                return
            if not self._backlog:
                self._wake.clear()
                waiter = asyncio.ensure_future(self._wake.wait())
                await asyncio.wait({waiter, reader}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                continue
            chunk = self._backlog.popleft()
            self._backlog_bytes -= len(chunk)
            await client.send(chunk)
            rate, channels = self._audio_format or (1, 1)
            self.counters["audio_sent_s"] += len(chunk) / (rate * channels * _BYTES_PER_SAMPLE)

    async def _read(self, client: IngestClient) -> None:
        async for event in client.events():
            self._on_event(event)
        reason = f": {client.close_reason}" if client.close_reason else ""
        raise ConnectionError(f"closed by the monitor (code {client.close_code}{reason})")

    def _on_event(self, event: AnyEvent) -> None:
        if event.v > SUPPORTED_SCHEMA_VERSION and not self._warned_version:
            self._warned_version = True
            logger.warning(f"serstream: the monitor sends event schema v{event.v}; this plugin knows "
                           f"v{SUPPORTED_SCHEMA_VERSION} and reads only the fields it knows")
        if isinstance(event, UnknownEvent):
            if event.malformed:
                self.counters["malformed_messages"] += 1
                self._log_once("malformed", "serstream: ignored a malformed message from the monitor "
                               "(further ones are only counted)")
            return  # a newer monitor's event type: nothing to do with it
        if isinstance(event, StreamEvent) and event.state == "open":
            # The monitor may rename a stream whose name is taken (``name-2``): use its id.
            self.stream_id = self._tracker.stream = event.stream
        elif isinstance(event, ErrorEvent):
            self.counters["monitor_errors"] += 1
            self._log_once(f"error:{event.code}", f"serstream: monitor reported {event.code} on "
                           f"{self.stream_id}: {event.message}")
        elif isinstance(event, (SpeechEvent, EmotionEvent)):
            self._tracker.monitor_event(event.to_dict())

    def _log_once(self, key: str, message: str) -> None:
        if key in self._logged:
            logger.debug(message)
        else:
            self._logged.add(key)
            logger.warning(message)


# --------------------------------------------------------------------------- helpers


def _ingest_url(url: str) -> str:
    """``ws://HOST:PORT`` -> ``ws://HOST:PORT/ingest``; a URL with a path is kept as given."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("ws", "wss") or not parts.netloc:
        raise ValueError(f"serstream monitor URL must look like ws://HOST:PORT, got {url!r}")
    path = parts.path if parts.path not in ("", "/") else "/ingest"
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def _describe(exc: BaseException) -> str:
    """One line for the log: the client's own message (ClientError), else the exception's."""
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused: is `serstream serve` running?"
    if isinstance(exc, OSError) and not str(exc):
        return exc.strerror or type(exc).__name__
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
