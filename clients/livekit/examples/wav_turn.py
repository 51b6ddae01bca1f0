"""One user turn from a WAV file through serstream-livekit, without a LiveKit server.

Usage: python wav_turn.py speech.wav [ws://127.0.0.1:8765]

It plays the parts a room and the session's VAD would play: the file's
audio as 20 ms ``rtc.AudioFrame``\\ s through ``emotion.tap()`` (what an
``Agent.stt_node`` does), the turn as the ``AgentSession``'s
``user_state_changed`` events, then the agent's ``on_user_turn_completed``,
which puts the reading into the user message for the LLM.
"""

import asyncio
import sys
import wave

from livekit import rtc
from livekit.agents import Agent, AgentSession, llm
from livekit.agents.voice.events import UserStateChangedEvent

from serstream_livekit import SerstreamEmotion

emotion = SerstreamEmotion(url=sys.argv[2] if len(sys.argv) > 2 else "ws://127.0.0.1:8765")


@emotion.on_emotion
def show(reading):
    print(f"turn {reading.turn}: {reading.label} {reading.confidence:.0%}, "
          f"arousal {reading.arousal:+.2f}, valence {reading.valence:+.2f} "
          f"(audio {reading.t0:.2f}-{reading.t1:.2f} s)")


class MyAgent(Agent):
    async def on_user_turn_completed(self, turn_ctx, new_message):
        await emotion.annotate(new_message)
        print("for the LLM:", new_message.extra.get("serstream_emotion", {}).get("label"))


async def frames(path):
    with wave.open(path) as f:
        rate, channels = f.getframerate(), f.getnchannels()
        step = rate // 50  # 20 ms
        while len(chunk := f.readframes(step)) == step * channels * 2:
            yield rtc.AudioFrame(chunk, rate, channels, step)
            await asyncio.sleep(0.02)
        for _ in range(50):  # a second of silence after the speech
            yield rtc.AudioFrame(bytes(step * channels * 2), rate, channels, step)
            await asyncio.sleep(0.02)


async def main(path):
    session = AgentSession()
    emotion.attach(session)
    agent = MyAgent(instructions="You are a helpful voice assistant.")
    session.emit("user_state_changed", UserStateChangedEvent(old_state="listening", new_state="speaking"))
    async for _frame in emotion.tap(frames(path)):
        pass  # an STT would take the frames here
    session.emit("user_state_changed", UserStateChangedEvent(old_state="speaking", new_state="listening"))
    message = llm.ChatMessage(role="user", content=["(what the STT heard)"])
    await agent.on_user_turn_completed(llm.ChatContext(), message)
    await session.aclose()


asyncio.run(main(sys.argv[1]))
