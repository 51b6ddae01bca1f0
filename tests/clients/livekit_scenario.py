"""User turns through ``SerstreamEmotion`` in a running ``AgentSession``, without a LiveKit server.

Run by tests/clients/test_livekit.py with the interpreter of
clients/livekit/.venv (livekit-agents and serstream-livekit; no serstream,
no pytest). No LiveKit server can run here, so there is no room; everything
else is livekit-agents' own machinery. The scenario starts a real
``AgentSession`` whose audio input (``session.input.audio``, what RoomIO
would set) yields 20 ms ``rtc.AudioFrame``\\ s of a WAV of espeak-ng speech,
paced in real time. The session runs the agent below, whose ``stt_node``
is docs/livekit.md's (``Agent.default.stt_node(self, emotion.tap(audio),
model_settings)``), so the framework hands every frame through the plugin's
tap to the session's STT. The one stand-in is that STT provider:
:class:`LevelSTT`, a streaming ``stt.STT`` like a cloud STT plugin, reports
speech start, a final transcript and speech end from the audio's level.
From those the session itself moves the user state (``user_state_changed``:
the plugin's turns, via ``emotion.attach(session)``), decides the end of the
user turn and calls the agent's ``on_user_turn_completed``, where the agent
calls ``emotion.annotate(new_message)``. ``session.aclose()`` emits
``close``, which closes the plugin. The session has no LLM and no TTS: it
only listens.

``--turns 2 --sync-dir D`` plays the WAV twice: after the first turn it
writes ``D/phase1`` and feeds silence until ``D/resume`` exists and the
plugin is connected again (the test kills and restarts the monitor
meanwhile). ``--abrupt`` closes the session right after the last frame of a
WAV that ends in speech. It writes what happened as JSON to ``--out``: whether every frame
left the tap as the same object with the same bytes it entered with (and as
the scenario made it), the readings the callback got, what ``annotate`` put
into the user messages, the warnings the plugin logged and its counters.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
import wave
from pathlib import Path
from typing import Any, AsyncIterable, AsyncIterator

from livekit import rtc
from livekit.agents import DEFAULT_API_CONNECT_OPTIONS, NOT_GIVEN, Agent, AgentSession, APIConnectOptions, io, llm, stt
from livekit.agents.voice.agent import ModelSettings
from serstream_livekit import METADATA_KEY, EmotionReading, SerstreamEmotion

FRAME_S = 0.02
#: Peak level above which LevelSTT calls a frame speech (int16; espeak-ng speaks far louder).
LOUD = 500
#: Quiet frames that end the speech (0.4 s, like a VAD's minimum silence).
QUIET_FRAMES = 20


class Warnings(logging.Handler):
    """Keeps the messages the plugin logs at WARNING and above."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


class LevelSTT(stt.STT):
    """A streaming STT provider, as a cloud STT plugin is one, that hears speech from the audio level."""

    def __init__(self) -> None:
        super().__init__(capabilities=stt.STTCapabilities(streaming=True, interim_results=False))

    async def _recognize_impl(self, buffer: Any, *, language: Any = None, conn_options: Any = None) -> Any:
        raise NotImplementedError("LevelSTT only streams")

    def stream(self, *, language: Any = NOT_GIVEN,
               conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS) -> stt.RecognizeStream:
        return LevelStream(stt=self, conn_options=conn_options)


class LevelStream(stt.RecognizeStream):
    """Speech start at the first loud frame; after 0.4 s of quiet a final transcript and speech end."""

    async def _run(self) -> None:
        speaking, quiet, turn = False, 0, 0
        async for frame in self._input_ch:
            if not isinstance(frame, rtc.AudioFrame):
                continue  # a flush
            loud = max((abs(x) for x in frame.data), default=0) > LOUD
            if loud:
                quiet = 0
                if not speaking:
                    speaking = True
                    self._event_ch.send_nowait(stt.SpeechEvent(type=stt.SpeechEventType.START_OF_SPEECH))
            elif speaking:
                quiet += 1
                if quiet >= QUIET_FRAMES:
                    speaking = False
                    self._event_ch.send_nowait(stt.SpeechEvent(
                        type=stt.SpeechEventType.FINAL_TRANSCRIPT,
                        alternatives=[stt.SpeechData(language="en", text=f"turn {turn}")]))
                    self._event_ch.send_nowait(stt.SpeechEvent(type=stt.SpeechEventType.END_OF_SPEECH))
                    turn += 1


class ScenarioInput(io.AudioInput):
    """``session.input.audio``: the frames the scenario queues (what RoomIO feeds from the user's track)."""

    def __init__(self, queue: asyncio.Queue[rtc.AudioFrame | None]) -> None:
        super().__init__(label="scenario")
        self.queue = queue

    async def __anext__(self) -> rtc.AudioFrame:
        frame = await self.queue.get()
        if frame is None:
            raise StopAsyncIteration
        return frame


class EmotionAgent(Agent):
    """The agent of docs/livekit.md (its stt_node and on_user_turn_completed), recording around the tap."""

    def __init__(self, emotion: SerstreamEmotion, wait_s: float) -> None:
        super().__init__(instructions="You are a helpful voice assistant.")
        self.emotion = emotion
        self.wait_s = wait_s
        self.tap_in: list[rtc.AudioFrame] = []
        self.tap_in_bytes: list[bytes] = []
        self.tap_out: list[rtc.AudioFrame] = []
        self.annotated: list[dict[str, Any]] = []

    async def stt_node(self, audio: AsyncIterable[rtc.AudioFrame], model_settings: ModelSettings) -> Any:
        async def before(frames: AsyncIterable[rtc.AudioFrame]) -> AsyncIterator[rtc.AudioFrame]:
            async for frame in frames:
                self.tap_in.append(frame)
                self.tap_in_bytes.append(frame.data.tobytes())
                yield frame

        async def after(frames: AsyncIterable[rtc.AudioFrame]) -> AsyncIterator[rtc.AudioFrame]:
            async for frame in frames:
                self.tap_out.append(frame)
                yield frame

        return Agent.default.stt_node(self, after(self.emotion.tap(before(audio))), model_settings)

    async def on_user_turn_completed(self, turn_ctx: llm.ChatContext, new_message: llm.ChatMessage) -> None:
        started = time.monotonic()
        await self.emotion.annotate(new_message, wait_s=self.wait_s)
        self.annotated.append({"text": new_message.text_content, "extra": dict(new_message.extra),
                               "waited_s": time.monotonic() - started})


def read_frames(wav: Path) -> list[rtc.AudioFrame]:
    with wave.open(str(wav), "rb") as f:
        assert f.getsampwidth() == 2, "the scenario needs 16-bit PCM"
        rate, channels = f.getframerate(), f.getnchannels()
        pcm = f.readframes(f.getnframes())
    per_frame = int(rate * FRAME_S)
    step = per_frame * channels * 2
    frames = []
    for i in range(0, len(pcm) - step + 1, step):
        frames.append(rtc.AudioFrame(pcm[i:i + step], rate, channels, per_frame))
    return frames


def silence_frame(rate: int, channels: int) -> rtc.AudioFrame:
    per_frame = int(rate * FRAME_S)
    return rtc.AudioFrame(bytes(per_frame * channels * 2), rate, channels, per_frame)


def reading_dict(reading: EmotionReading | None) -> dict[str, Any] | None:
    return None if reading is None else reading.as_dict()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    handler = Warnings()
    logging.getLogger("serstream_livekit").addHandler(handler)
    logging.getLogger("serstream_livekit").setLevel(logging.DEBUG)
    turn_frames = read_frames(Path(args.wav))
    rate, channels = turn_frames[0].sample_rate, turn_frames[0].num_channels

    emotion = SerstreamEmotion(url=args.url, stream="livekit-test", token=args.token, ca_file=args.ca_file,
                               retry_first_s=0.2, retry_max_s=0.5)
    readings: list[dict[str, Any]] = []

    @emotion.on_emotion
    async def on_emotion(reading: EmotionReading) -> None:
        readings.append(reading.as_dict())

    if args.bad_callback:
        @emotion.on_emotion
        def broken(reading: EmotionReading) -> None:
            raise RuntimeError("this callback is broken")

    queue: asyncio.Queue[rtc.AudioFrame | None] = asyncio.Queue()
    session: AgentSession = AgentSession(stt=LevelSTT(), turn_handling={"turn_detection": "stt"})
    emotion.attach(session)
    states: list[str] = []
    session.on("user_state_changed", lambda event: states.append(event.new_state))
    session.input.audio = ScenarioInput(queue)
    agent = EmotionAgent(emotion, args.annotate_wait)
    await session.start(agent)

    sent: list[rtc.AudioFrame] = []
    sent_bytes: list[bytes] = []

    async def play(frame: rtc.AudioFrame) -> None:
        sent.append(frame)
        sent_bytes.append(frame.data.tobytes())
        await queue.put(frame)
        await asyncio.sleep(FRAME_S / args.speed)

    async def wait_for(what: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not what() and time.monotonic() < deadline:
            await play(silence_frame(rate, channels))

    started = time.monotonic()
    for turn in range(args.turns):
        if turn > 0 and args.sync_dir:
            sync = Path(args.sync_dir)
            (sync / "phase1").write_text("done")
            await wait_for(lambda: (sync / "resume").exists() and emotion.connected, 60)  # noqa: B023 (called now)
            for _ in range(int(0.5 / FRAME_S)):
                await play(silence_frame(rate, channels))
        for frame in turn_frames:
            await play(frame)
        if args.abrupt:
            break  # the session closes while the user is still speaking
        # Silence until the session has completed the user turn (end of speech, then its endpointing delay).
        await wait_for(lambda: len(agent.annotated) > turn, 20 / args.speed)  # noqa: B023 (called now)
    for _ in range(0 if args.abrupt else int(0.5 / FRAME_S)):
        await play(silence_frame(rate, channels))
    await asyncio.sleep(0.2)  # the session's audio forwarding drains the queue
    await session.aclose()  # its "close" event closes the plugin
    for _ in range(100):
        if emotion.closed:
            break
        await asyncio.sleep(0.05)
    elapsed = time.monotonic() - started
    tap_in, tap_out = agent.tap_in, agent.tap_out
    return {
        "elapsed_s": elapsed,
        "sent": len(sent),
        "tap_in": len(tap_in),
        "tap_out": len(tap_out),
        "same_objects": len(tap_in) == len(tap_out) and all(a is b for a, b in zip(tap_in, tap_out)),
        "bytes_unchanged": [f.data.tobytes() for f in tap_out] == agent.tap_in_bytes,
        # The session hands the stt_node the scenario's own frame objects (then, on close, its own
        # flush silence): how many of the scenario's frames arrived, as themselves, in order.
        "sent_reached_tap": next((i for i, (a, b) in enumerate(zip(sent, tap_in)) if a is not b),
                                 min(len(sent), len(tap_in))),
        "turn_s": len(turn_frames) * FRAME_S,
        "user_states": states,
        "readings": readings,
        "annotated": agent.annotated,
        "latest": reading_dict(emotion.latest),
        "closed": emotion.closed,
        "metadata_key": METADATA_KEY,
        "warnings": [w for w in handler.messages if "serstream" in w],
        "counters": emotion.counters,
        "stream_id": emotion.stream_id,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--token", default=None)
    parser.add_argument("--ca-file", default=None)
    parser.add_argument("--wav", required=True)
    parser.add_argument("--lead", type=float, required=True, help="silence before the speech, seconds")
    parser.add_argument("--tail", type=float, required=True, help="silence after the speech, seconds")
    parser.add_argument("--turns", type=int, default=1)
    parser.add_argument("--sync-dir", default=None)
    parser.add_argument("--annotate-wait", type=float, default=3.0)
    parser.add_argument("--bad-callback", action="store_true")
    parser.add_argument("--abrupt", action="store_true", help="close the session right after the speech")
    parser.add_argument("--speed", type=float, default=1.0, help="feed this many times faster than real time")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    result = asyncio.run(run(args))
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
