"""A LiveKit agent session that hears a WAV file, with serstream emotion per user turn; no LiveKit server needed.

Usage: python wav_turn.py speech.wav [ws://127.0.0.1:8765]   (with `serstream serve` running)

A real ``AgentSession`` runs the agent: its audio input, which RoomIO would
fill from the user's track, plays the file in 20 ms ``rtc.AudioFrame``\\ s.
The agent's ``stt_node`` is the one of a real agent: the audio goes through
``emotion.tap()`` to the session's STT, which here, for want of a cloud STT,
is ``LevelSTT``: it finds the speech from the audio level. The session turns
that into the user's turn and calls ``on_user_turn_completed``, where the
reading goes into the user message.
"""

import asyncio
import sys
import wave

from livekit import rtc
from livekit.agents import DEFAULT_API_CONNECT_OPTIONS, NOT_GIVEN, Agent, AgentSession, io, stt
from serstream_livekit import SerstreamEmotion

emotion = SerstreamEmotion(url=sys.argv[2] if len(sys.argv) > 2 else "ws://127.0.0.1:8765")
done = asyncio.Event()


@emotion.on_emotion
def show(reading):
    print(f"turn {reading.turn}: {reading.label} {reading.confidence:.0%}, arousal {reading.arousal:+.2f}, "
          f"valence {reading.valence:+.2f} (audio {reading.t0:.2f}-{reading.t1:.2f} s)")


class LevelSTT(stt.STT):
    """For want of a cloud STT here: a streaming STT that finds the speech from the audio level."""

    def __init__(self):
        super().__init__(capabilities=stt.STTCapabilities(streaming=True, interim_results=False))

    async def _recognize_impl(self, buffer, *, language=None, conn_options=None):
        raise NotImplementedError

    def stream(self, *, language=NOT_GIVEN, conn_options=DEFAULT_API_CONNECT_OPTIONS):
        return LevelStream(stt=self, conn_options=conn_options)


class LevelStream(stt.RecognizeStream):
    """Speech start at the first loud frame, end (with a stand-in transcript) after 0.4 s of quiet."""

    async def _run(self):
        speaking, quiet = False, 0
        async for frame in self._input_ch:
            if not isinstance(frame, rtc.AudioFrame):
                continue  # a flush
            loud = max((abs(x) for x in frame.data), default=0) > 500
            quiet = 0 if loud else quiet + 1
            if loud and not speaking:
                speaking = True
                self._event_ch.send_nowait(stt.SpeechEvent(type=stt.SpeechEventType.START_OF_SPEECH))
            elif speaking and quiet >= 20:
                speaking = False
                self._event_ch.send_nowait(stt.SpeechEvent(
                    type=stt.SpeechEventType.FINAL_TRANSCRIPT,
                    alternatives=[stt.SpeechData(language="en", text="(what was said)")]))
                self._event_ch.send_nowait(stt.SpeechEvent(type=stt.SpeechEventType.END_OF_SPEECH))


class MyAgent(Agent):
    def __init__(self):
        super().__init__(instructions="You are a helpful voice assistant.")

    async def stt_node(self, audio, model_settings):
        # every frame goes on to the session's STT unchanged; a copy goes to the monitor
        return Agent.default.stt_node(self, emotion.tap(audio), model_settings)

    async def on_user_turn_completed(self, turn_ctx, new_message):
        await emotion.annotate(new_message)
        print("for the LLM:", new_message.extra.get("serstream_emotion", {}).get("label"))
        done.set()


class WavInput(io.AudioInput):
    """What RoomIO would be: the user's audio, here from a file, then silence."""

    def __init__(self, path):
        super().__init__(label="wav")
        self.wav = wave.open(path)
        self.rate, self.channels = self.wav.getframerate(), self.wav.getnchannels()
        self.step = self.rate // 50  # 20 ms

    async def __anext__(self):
        await asyncio.sleep(0.02)
        chunk = self.wav.readframes(self.step)
        if len(chunk) < self.step * self.channels * 2:
            chunk = bytes(self.step * self.channels * 2)
        return rtc.AudioFrame(chunk, self.rate, self.channels, self.step)


async def main(path):
    session = AgentSession(stt=LevelSTT(), turn_handling={"turn_detection": "stt"})
    emotion.attach(session)
    session.input.audio = WavInput(path)
    await session.start(MyAgent())
    await asyncio.wait_for(done.wait(), 60)
    await session.aclose()


asyncio.run(main(sys.argv[1]))
