"""User turns through ``SerstreamEmotion`` with livekit-agents' own classes, without a LiveKit server.

Run by tests/clients/test_livekit.py with the interpreter of
clients/livekit/.venv (livekit-agents and serstream-livekit; no serstream,
no pytest). No LiveKit server can run here, so no room: the scenario plays
the parts a room and the session's VAD would play, with the framework's own
objects. It makes ``rtc.AudioFrame``\\ s (20 ms, paced in real time) of a
WAV of espeak-ng speech and feeds them through ``emotion.tap()`` (what an
``Agent.stt_node`` override does) to a consumer standing in for the STT; it
signals the turn on a real ``AgentSession`` the way the session does
(``user_state_changed`` with a ``UserStateChangedEvent``: ``speaking``
where a VAD would confirm the speech, ``listening`` after its silence), and
half a second later calls the ``on_user_turn_completed`` of a real
``Agent`` subclass with a real ``ChatContext`` and ``ChatMessage``; the
agent calls ``emotion.annotate(new_message)``. Then it closes the session.

``--turns 2 --sync-dir D`` plays the WAV twice: after the first turn it
writes ``D/phase1`` and feeds silence until ``D/resume`` exists and the
plugin is connected again (the test kills and restarts the monitor
meanwhile). It writes what happened as JSON to ``--out``: whether every frame
reached the consumer as the same object with the same bytes, the readings the
callback got, what ``annotate`` returned and put into the messages, the
warnings the plugin logged and its counters.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
import wave
from pathlib import Path
from typing import Any, AsyncIterator

from livekit import rtc
from livekit.agents import Agent, AgentSession, llm
from livekit.agents.voice.events import CloseEvent, CloseReason, UserStateChangedEvent
from serstream_livekit import METADATA_KEY, EmotionReading, SerstreamEmotion

FRAME_S = 0.02


class Warnings(logging.Handler):
    """Keeps the messages the plugin logs at WARNING and above."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


class EmotionAgent(Agent):
    """The agent of docs/livekit.md: its on_user_turn_completed puts the reading into the user message."""

    def __init__(self, emotion: SerstreamEmotion, wait_s: float) -> None:
        super().__init__(instructions="You are a helpful voice assistant.")
        self.emotion = emotion
        self.wait_s = wait_s

    async def on_user_turn_completed(self, turn_ctx: llm.ChatContext, new_message: llm.ChatMessage) -> None:
        await self.emotion.annotate(new_message, wait_s=self.wait_s)


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
    total_s = len(turn_frames) * FRAME_S
    # A VAD confirms speech ~0.2 s after it starts and silence ~0.4 s after it ends.
    marks = {round((args.lead + 0.2) / FRAME_S): "speaking", round((total_s - args.tail + 0.4) / FRAME_S): "listening"}

    emotion = SerstreamEmotion(url=args.url, stream="livekit-test", token=args.token, ca_file=args.ca_file,
                               retry_first_s=0.2, retry_max_s=0.5)
    session: AgentSession = AgentSession()
    emotion.attach(session)
    agent = EmotionAgent(emotion, args.annotate_wait)
    readings: list[dict[str, Any]] = []

    @emotion.on_emotion
    async def on_emotion(reading: EmotionReading) -> None:
        readings.append(reading.as_dict())

    if args.bad_callback:
        @emotion.on_emotion
        def broken(reading: EmotionReading) -> None:
            raise RuntimeError("this callback is broken")

    sent: list[rtc.AudioFrame] = []
    sent_bytes: list[bytes] = []
    received: list[rtc.AudioFrame] = []
    annotated: list[dict[str, Any]] = []
    queue: asyncio.Queue[rtc.AudioFrame | None] = asyncio.Queue()
    user_state = "listening"

    def set_user_state(new: str) -> None:
        nonlocal user_state
        session.emit("user_state_changed", UserStateChangedEvent(old_state=user_state, new_state=new))
        user_state = new

    async def source() -> AsyncIterator[rtc.AudioFrame]:
        while (frame := await queue.get()) is not None:
            yield frame

    async def stt() -> None:
        """Stands in for the STT behind ``Agent.stt_node``: takes every frame the tap yields."""
        async for frame in emotion.tap(source()):
            received.append(frame)

    async def play(frame: rtc.AudioFrame) -> None:
        sent.append(frame)
        sent_bytes.append(frame.data.tobytes())
        await queue.put(frame)
        await asyncio.sleep(FRAME_S / args.speed)

    async def turn_completed(index: int) -> None:
        await asyncio.sleep(0.5 / args.speed)  # LiveKit's end-of-turn delay after the VAD's silence
        message = llm.ChatMessage(role="user", content=[f"turn {index}"])
        chat = llm.ChatContext()
        chat.insert(message)
        started = time.monotonic()
        await agent.on_user_turn_completed(chat, message)
        annotated.append({"turn": index, "extra": dict(message.extra), "waited_s": time.monotonic() - started,
                          "text": message.text_content})

    async def feed() -> None:
        pending: list[asyncio.Task[None]] = []
        for turn in range(args.turns):
            if turn > 0 and args.sync_dir:
                sync = Path(args.sync_dir)
                await asyncio.gather(*pending)
                (sync / "phase1").write_text("done")
                deadline = time.monotonic() + 60
                while not ((sync / "resume").exists() and emotion.connected) and time.monotonic() < deadline:
                    await play(silence_frame(rate, channels))
                for _ in range(int(0.5 / FRAME_S)):
                    await play(silence_frame(rate, channels))
            for index, frame in enumerate(turn_frames):
                if marks.get(index) == "speaking":
                    set_user_state("speaking")
                elif marks.get(index) == "listening":
                    set_user_state("listening")
                    pending.append(asyncio.ensure_future(turn_completed(turn)))
                await play(frame)
        for _ in range(int(1.0 / FRAME_S)):
            await play(silence_frame(rate, channels))
        await asyncio.gather(*pending)
        await queue.put(None)

    started = time.monotonic()
    await asyncio.wait_for(asyncio.gather(stt(), feed()), timeout=args.timeout)
    # The session's end, as AgentSession._aclose_impl signals it (a session that was never
    # started, as here without a room, emits nothing on aclose()): the plugin closes on it.
    session.emit("close", CloseEvent(error=None, reason=CloseReason.USER_INITIATED))
    for _ in range(100):
        if emotion.closed:
            break
        await asyncio.sleep(0.05)
    elapsed = time.monotonic() - started
    return {
        "elapsed_s": elapsed,
        "sent": len(sent),
        "received": len(received),
        "same_objects": len(sent) == len(received) and all(a is b for a, b in zip(sent, received)),
        "bytes_unchanged": [f.data.tobytes() for f in received] == sent_bytes,
        "turn_s": total_s,
        "readings": readings,
        "annotated": annotated,
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
    parser.add_argument("--speed", type=float, default=1.0, help="feed this many times faster than real time")
    parser.add_argument("--timeout", type=float, default=90.0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    result = asyncio.run(run(args))
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
