"""``SerstreamEmotion``: the user's speech emotion per turn, from a serstream monitor, for a LiveKit agent.

It streams the user's audio (``rtc.AudioFrame``, 16-bit PCM at the frame's
own rate and channel count) to a running monitor's ``/ingest`` WebSocket,
matches the estimates the monitor sends back to the user's turns, and gives
each turn's reading

* to the ``on_emotion`` callbacks,
* as :attr:`SerstreamEmotion.latest`, and
* to the agent's LLM, through :meth:`SerstreamEmotion.annotate`, which puts
  it into the user message's ``extra["serstream_emotion"]`` (call it from
  ``Agent.on_user_turn_completed``).

Where the plugin meets LiveKit:

* audio: :meth:`tap` wraps the audio iterator an ``Agent.stt_node`` gets and
  yields every frame unchanged (the same objects, in order), or
  :meth:`push_frame` takes frames from any loop (``rtc.AudioStream``);
* turns: :meth:`attach` follows an ``AgentSession``'s ``user_state_changed``
  (``speaking`` opens a turn, leaving it closes it) and closes the plugin
  with the session's ``close`` event; :meth:`user_started` and
  :meth:`user_stopped` are there for other signals.

The monitor is reached with the ``serstream-client`` distribution, never by
importing serstream (the monitor runs ``onnxruntime-gpu``; an agent
environment must not). A monitor that is down, a lost connection, a refused
stream, an error the monitor reports, a bad message or a failing callback is
logged once per cause (logger ``serstream_livekit``) and retried in the
background with backoff; the agent never waits for the monitor beyond
:meth:`annotate`'s bounded wait and never sees an exception from the plugin.
Audio that arrives without a connection is not analysed and is counted in
:attr:`SerstreamEmotion.counters`.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
import time
import uuid
from collections import deque
from dataclasses import dataclass, field, fields, replace
from typing import Any, AsyncIterable, AsyncIterator, Awaitable, Callable

from livekit import rtc
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
from serstream_client.turns import EmotionReading, TurnConfig, TurnTracker

from serstream_livekit.pure import combine_readings, ingest_url, pcm_seconds, user_state_edge

__all__ = ["SerstreamEmotion", "SerstreamSettings", "METADATA_KEY", "SUPPORTED_SCHEMA_VERSION"]

logger = logging.getLogger("serstream_livekit")

#: Key of the reading in a ``ChatMessage``'s ``extra`` (:meth:`SerstreamEmotion.annotate`).
METADATA_KEY = "serstream_emotion"
#: The serstream event schema version this plugin was written for.
SUPPORTED_SCHEMA_VERSION = 1

EmotionCallback = Callable[[EmotionReading], Awaitable[None] | None]


@dataclass(frozen=True)
class SerstreamSettings:
    """How the plugin reaches the monitor and matches estimates to turns."""

    #: The monitor: ``ws://HOST:PORT`` (``/ingest`` is added) or the full ``/ingest`` URL.
    url: str = "ws://127.0.0.1:8765"
    #: Stream id on the monitor; default ``livekit-<random>``.
    stream: str | None = None
    #: The monitor's token, sent as ``Authorization: Bearer`` with the handshake (docs/security.md).
    token: str | None = None
    #: PEM file to verify a ``wss://`` monitor's certificate with (default: the system's CAs).
    ca_file: str | None = None
    turns: TurnConfig = field(default_factory=TurnConfig)
    open_timeout_s: float = 5.0
    #: Reconnect backoff: first delay, doubled per failure up to the maximum.
    retry_first_s: float = 0.5
    retry_max_s: float = 5.0
    #: Audio waiting to be sent beyond this means the monitor is not keeping up: reconnect.
    max_backlog_s: float = 5.0
    #: :meth:`SerstreamEmotion.annotate` waits at most this long for the turn's reading.
    annotate_wait_s: float = 1.0
    #: On :meth:`SerstreamEmotion.aclose`, wait at most this long for the last turn's reading.
    end_flush_s: float = 2.0


class SerstreamEmotion:
    """Streams a LiveKit agent's user audio to serstream and gives a reading per user turn.

    Example::

        emotion = SerstreamEmotion(url="ws://127.0.0.1:8765")
        emotion.attach(session)            # turns from the session's user_state_changed

        @emotion.on_emotion
        def show(reading):
            print(reading.label, reading.confidence)

        class MyAgent(Agent):
            async def stt_node(self, audio, model_settings):
                return Agent.default.stt_node(self, emotion.tap(audio), model_settings)

            async def on_user_turn_completed(self, turn_ctx, new_message):
                await emotion.annotate(new_message)   # new_message.extra["serstream_emotion"]
    """

    def __init__(self, *, settings: SerstreamSettings | None = None, **kwargs: Any) -> None:
        """Create the plugin; the fields of :class:`SerstreamSettings` can be given as keywords.

        A malformed URL, an unknown keyword or an unreadable ``ca_file`` is a
        ``ValueError`` here, once, rather than a retry loop later.
        """
        known = {f.name for f in fields(SerstreamSettings)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"SerstreamEmotion: unknown setting(s) {', '.join(unknown)}")
        self.settings = replace(settings or SerstreamSettings(), **kwargs)
        self.ingest_url = ingest_url(self.settings.url)
        try:
            client_ssl_context(self.ingest_url, self.settings.ca_file)
        except ConnectionError as exc:
            raise ValueError(f"serstream ca_file: {exc}") from None
        self._requested_stream = self.settings.stream or f"livekit-{uuid.uuid4().hex[:8]}"
        #: The monitor's id of this agent's stream (the requested name, or the one the monitor gave).
        self.stream_id = self._requested_stream
        self._tracker = TurnTracker(self.stream_id, self.settings.turns)
        self._callbacks: list[EmotionCallback] = []
        #: The latest reading given (None before the first).
        self.latest: EmotionReading | None = None
        self._unclaimed: list[EmotionReading] = []  # readings not yet given to annotate()
        self._readings_changed = asyncio.Event()
        self._audio_format: tuple[int, int] | None = None  # (sample_rate, channels)
        self._backlog: deque[bytes] = deque()
        self._backlog_bytes = 0
        self._wake = asyncio.Event()
        self._connected = False
        self._session_connected = False
        self._force_reconnect = False
        self._running = False
        self._closed = False
        self._ending = False
        self._tasks: list[asyncio.Task[None]] = []
        self._closers: set[asyncio.Task[None]] = set()
        self._logged: set[str] = set()
        self._warned_version = False
        #: What happened so far; nothing is dropped without being counted here.
        self.counters: dict[str, float] = {
            "frames": 0, "audio_sent_s": 0.0, "audio_not_analysed_s": 0.0, "connects": 0,
            "connect_failures": 0, "disconnects": 0, "turns": 0, "readings": 0, "turns_without_reading": 0,
            "malformed_messages": 0, "monitor_errors": 0, "callback_errors": 0, "not_audio": 0,
        }

    # ------------------------------------------------------------ public state

    @property
    def connected(self) -> bool:
        """True while a connection to the monitor is open and taking audio."""
        return self._connected

    @property
    def stream_seconds(self) -> float:
        """Seconds of audio queued for the monitor on the current connection: the monitor's stream clock."""
        return self._tracker.clock

    @property
    def closed(self) -> bool:
        """True once :meth:`aclose` has finished (the session's ``close`` event calls it)."""
        return self._closed and not self._tasks and not self._running

    def on_emotion(self, callback: EmotionCallback) -> EmotionCallback:
        """Call ``callback(reading)`` for each user turn's reading (plain or ``async``); usable as a decorator."""
        self._callbacks.append(callback)
        return callback

    # ------------------------------------------------------------ LiveKit wiring

    def attach(self, session: Any) -> None:
        """Follow an ``AgentSession``: its ``user_state_changed`` delimits turns, its ``close`` ends the plugin.

        ``session`` is a ``livekit.agents.AgentSession`` (any LiveKit event
        emitter with those events will do).
        """

        def on_user_state(event: Any) -> None:
            self._guard(self._user_state, getattr(event, "old_state", ""), getattr(event, "new_state", ""))

        def on_close(event: Any) -> None:
            self._guard(self._close_soon)

        session.on("user_state_changed", on_user_state)
        session.on("close", on_close)

    async def tap(self, audio: AsyncIterable[rtc.AudioFrame]) -> AsyncIterator[rtc.AudioFrame]:
        """Yield every frame of ``audio`` unchanged (the same objects, in order), sending a copy to the monitor.

        Meant for ``Agent.stt_node``: ``Agent.default.stt_node(self, emotion.tap(audio), model_settings)``.
        """
        async for frame in audio:
            self.push_frame(frame)
            yield frame

    def push_frame(self, frame: rtc.AudioFrame) -> None:
        """Send a copy of one user audio frame to the monitor; never raises, never blocks."""
        self._guard(self._audio, frame)

    def user_started(self) -> None:
        """The user started speaking: a turn opens (ignored while one is open)."""
        self._guard(self._turn_edge, "start")

    def user_stopped(self) -> None:
        """The user stopped speaking: the open turn closes; its reading follows once the monitor settles it."""
        self._guard(self._turn_edge, "stop")

    async def annotate(self, message: Any = None, wait_s: float | None = None) -> EmotionReading | None:
        """The reading of the user's speech since the last call, put into ``message.extra["serstream_emotion"]``.

        For ``Agent.on_user_turn_completed(turn_ctx, new_message)``: LiveKit
        ends a user turn a little after the user went quiet, and the
        monitor's final estimate may still be on its way, so this waits at
        most ``wait_s`` (default ``settings.annotate_wait_s``) for turns that
        have ended to be settled. Several speech spans (a pause inside one
        turn) give one duration-weighted reading. Returns None, and leaves the
        message alone, when there is no reading (monitor down, nothing heard).
        """
        try:
            wait = self.settings.annotate_wait_s if wait_s is None else max(0.0, wait_s)
            deadline = time.monotonic() + wait
            # Without a connection no final is coming: no reason to hold the agent up.
            while self._tracker.pending() and self._running and self._connected:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._readings_changed.clear()
                try:
                    await asyncio.wait_for(self._readings_changed.wait(), min(left, 0.1))
                except asyncio.TimeoutError:
                    pass
                await self._emit_due(time.monotonic())
            reading = combine_readings(self._unclaimed)
            self._unclaimed = []
            if reading is not None and message is not None:
                _put_extra(message, reading.as_dict())
            return reading
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the plugin's trouble must never become the agent's
            self._log_once("internal", f"serstream: internal error in annotate, message left as it was: "
                           f"{type(exc).__name__}: {exc}")
            return None

    async def aclose(self, flush: bool = True) -> None:
        """Stop: with ``flush``, send the rest, end the ingest stream and give the last turn's reading first."""
        if self._closed:
            return
        self._closed = True
        try:
            if flush and self._running:
                await self._flush()
        except Exception as exc:
            self._log_once("internal", f"serstream: internal error while closing: {type(exc).__name__}: {exc}")
        finally:
            self._running = False
            tasks, self._tasks = self._tasks, []
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._connected = False

    # ------------------------------------------------------------ internals: inputs

    def _guard(self, func: Callable[..., Any], *args: Any) -> None:
        try:
            func(*args)
        except Exception as exc:  # the plugin's trouble must never become the agent's
            self._log_once("internal", f"serstream: internal error, the agent goes on: {type(exc).__name__}: {exc}")

    def _user_state(self, old_state: str, new_state: str) -> None:
        edge = user_state_edge(str(old_state), str(new_state))
        if edge is not None:
            self._turn_edge(edge)

    def _turn_edge(self, edge: str) -> None:
        now = time.monotonic()
        if edge == "start":
            if self._tracker.user_started(now):
                self.counters["turns"] += 1
        elif self._tracker.user_stopped(now):
            self._readings_changed.set()

    def _audio(self, frame: rtc.AudioFrame) -> None:
        if self._closed:
            return
        if not isinstance(frame, rtc.AudioFrame):
            self.counters["not_audio"] += 1  # passed on to the agent, not sent
            return
        self.counters["frames"] += 1
        rate, channels = int(frame.sample_rate), int(frame.num_channels)
        pcm = frame.data.tobytes()  # a copy: the agent's frame is never touched
        seconds = pcm_seconds(len(pcm), rate, channels)
        if seconds <= 0:
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            self.counters["audio_not_analysed_s"] += seconds
            self._log_once("loop", "serstream: push_frame was called outside the agent's event loop "
                           "(call it from async code); that audio is not analysed")
            return
        self._start()
        if self._audio_format is None:
            self._audio_format = (rate, channels)
            self._wake.set()  # the link waits for the first frame's format
        elif (rate, channels) != self._audio_format:
            # The hello fixed the format: a new one needs a new monitor stream.
            self._audio_format = (rate, channels)
            self._force_reconnect = True
            self._wake.set()
        if not self._connected or self._force_reconnect:
            self.counters["audio_not_analysed_s"] += seconds
            return
        if pcm_seconds(self._backlog_bytes + len(pcm), rate, channels) > self.settings.max_backlog_s:
            self.counters["audio_not_analysed_s"] += seconds + pcm_seconds(self._backlog_bytes, rate, channels)
            self._log_once("backlog", f"serstream: the monitor at {self.ingest_url} is not keeping up "
                           f"(more than {self.settings.max_backlog_s:g} s of audio waiting); reconnecting")
            self._force_reconnect = True
            self._wake.set()
            return
        self._backlog.append(pcm)
        self._backlog_bytes += len(pcm)
        self._tracker.audio(seconds)
        self._wake.set()

    # ------------------------------------------------------------ internals: lifecycle

    def _start(self) -> None:
        if self._running or self._closed:
            return
        self._running = True
        self._tasks = [self._spawn(self._link_loop()), self._spawn(self._settle_loop())]

    def _close_soon(self) -> None:
        task = self._spawn(self.aclose())
        self._closers.add(task)  # held until done: the loop keeps only a weak reference
        task.add_done_callback(self._closers.discard)

    def _spawn(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        async def run() -> None:
            await coro

        return asyncio.get_running_loop().create_task(run())

    async def _flush(self) -> None:
        if self._connected:
            # Ask the monitor to finish the stream: it closes the open utterance and
            # sends its final estimate, which is what settles the last turn.
            self._tracker.user_stopped(time.monotonic())
            self._ending = True
            self._wake.set()
            deadline = time.monotonic() + self.settings.end_flush_s
            while self._tracker.pending() and time.monotonic() < deadline and self._connected:
                await self._emit_due(time.monotonic())
                await asyncio.sleep(0.02)
            # Let the link finish the ending (the monitor's last events, then its close) rather than
            # cutting the connection: the monitor then records an end of stream, not a lost client.
            link = self._tasks[0] if self._tasks else None
            if link is not None and not link.done():
                await asyncio.wait({link}, timeout=max(0.0, deadline - time.monotonic()))
        # No time left to wait: a turn that ended gives what it has (its finals, else its partial).
        self._tracker.user_stopped(time.monotonic())
        await self._emit_due(time.monotonic() + self.settings.turns.settle_timeout_s)

    # ------------------------------------------------------------ internals: readings

    async def _settle_loop(self) -> None:
        while True:
            await asyncio.sleep(0.05)
            await self._emit_due(time.monotonic())

    async def _emit_due(self, now: float) -> None:
        without = self._tracker.turns_without_reading
        due = self._tracker.due(now)
        self.counters["turns_without_reading"] += self._tracker.turns_without_reading - without
        if due or self._tracker.turns_without_reading != without:
            self._readings_changed.set()
        for reading in due:
            self.counters["readings"] += 1
            self.latest = reading
            self._unclaimed.append(reading)
            del self._unclaimed[:-16]  # an agent that never annotates keeps only the recent ones
            for callback in list(self._callbacks):
                try:
                    result = callback(reading)
                    if inspect.isawaitable(result):
                        await result
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self.counters["callback_errors"] += 1
                    self._log_once(f"callback:{id(callback)}", f"serstream: on_emotion callback "
                                   f"{getattr(callback, '__name__', callback)!s} failed: {type(exc).__name__}: {exc}")

    # ------------------------------------------------------------ internals: the monitor link

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
                return
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
                await asyncio.gather(reader, return_exceptions=True)
        finally:
            await client.abort()

    async def _write(self, client: IngestClient, reader: asyncio.Future[None]) -> None:
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
                waiter: asyncio.Future[Any] = asyncio.ensure_future(self._wake.wait())
                await asyncio.wait({waiter, reader}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                continue
            chunk = self._backlog.popleft()
            self._backlog_bytes -= len(chunk)
            await client.send(chunk)
            rate, channels = self._audio_format or (1, 1)
            self.counters["audio_sent_s"] += pcm_seconds(len(chunk), rate, channels)

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
            return
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


def _put_extra(message: Any, value: dict[str, Any]) -> None:
    """``message.extra[METADATA_KEY] = value`` on a ``ChatMessage`` (or a dict-like ``extra`` anywhere)."""
    extra = getattr(message, "extra", None)
    if extra is None:
        extra = {}
        message.extra = extra
    extra[METADATA_KEY] = value


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
