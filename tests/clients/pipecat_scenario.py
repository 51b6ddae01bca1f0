"""One user turn through a real Pipecat pipeline with ``SerstreamEmotionProcessor``.

Run by tests/clients/test_pipecat.py with the interpreter of
clients/pipecat/.venv (pipecat-ai and serstream-pipecat; no serstream, no
pytest). It feeds a WAV of espeak-ng speech as 20 ms ``InputAudioRawFrame``\\ s,
paced in real time, with VAD and user-turn start/stop frames around the
speech and a ``TranscriptionFrame`` after the turn, through
``[SerstreamEmotionProcessor, Collector]``, then ``EndFrame``. It writes what
happened as JSON to ``--out``: the frames the collector saw (in order), the
``on_emotion`` calls, the warnings the plugin logged and its counters.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import wave
from pathlib import Path
from typing import Any

from loguru import logger
from pipecat.frames.frames import (
    EndFrame,
    Frame,
    InputAudioRawFrame,
    SystemFrame,
    TranscriptionFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.workers.runner import WorkerRunner
from serstream_pipecat import TRANSCRIPTION_METADATA_KEY, EmotionFrame, SerstreamEmotionProcessor

FRAME_S = 0.02


class Collector(FrameProcessor):
    """Records every downstream frame that reaches the end of the pipeline, then passes it on."""

    def __init__(self) -> None:
        super().__init__()
        self.frames: list[Frame] = []

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if direction == FrameDirection.DOWNSTREAM:
            self.frames.append(frame)
        await self.push_frame(frame, direction)


def build_frames(wav: Path, lead_s: float, tail_s: float, abrupt: bool = False) -> list[Frame]:
    """Audio frames of ``wav`` with the turn frames where a VAD and turn detector would put them.

    ``abrupt``: the turn ends with the audio and ``EndFrame`` follows at once
    (no silence after it, no transcription): the pipeline stops mid-utterance
    as far as the monitor can tell.
    """
    with wave.open(str(wav), "rb") as f:
        assert f.getsampwidth() == 2, "the scenario needs 16-bit PCM"
        rate, channels = f.getframerate(), f.getnchannels()
        pcm = f.readframes(f.getnframes())
    step = int(rate * FRAME_S) * channels * 2
    chunks = [pcm[i:i + step] for i in range(0, len(pcm), step)]
    if abrupt:
        start = round((lead_s + 0.2) / FRAME_S)
        frames = [InputAudioRawFrame(audio=c, sample_rate=rate, num_channels=channels) for c in chunks]
        frames[start:start] = [VADUserStartedSpeakingFrame(start_secs=0.2), UserStartedSpeakingFrame()]
        return frames + [VADUserStoppedSpeakingFrame(stop_secs=0.0), UserStoppedSpeakingFrame(), EndFrame()]
    # One more second of silence after the file, then the transcription, then half a second.
    silence = bytes(step)
    chunks += [silence] * int(1.0 / FRAME_S)
    total_s = len(pcm) / (rate * channels * 2)
    speech_end = total_s - tail_s
    # A VAD confirms speech ~0.2 s after it starts and silence ~0.4 s after it ends.
    marks = {round((lead_s + 0.2) / FRAME_S): "start", round((speech_end + 0.4) / FRAME_S): "stop"}
    frames: list[Frame] = []
    for index, chunk in enumerate(chunks):
        if marks.get(index) == "start":
            frames += [VADUserStartedSpeakingFrame(start_secs=0.2), UserStartedSpeakingFrame()]
        elif marks.get(index) == "stop":
            frames += [VADUserStoppedSpeakingFrame(stop_secs=0.4), UserStoppedSpeakingFrame()]
        frames.append(InputAudioRawFrame(audio=chunk, sample_rate=rate, num_channels=channels))
    frames.append(TranscriptionFrame(text="I am really upset", user_id="user", timestamp="now"))
    frames += [InputAudioRawFrame(audio=silence, sample_rate=rate, num_channels=channels)
               for _ in range(int(0.5 / FRAME_S))]
    frames.append(EndFrame())
    return frames


def describe(frame: Frame) -> dict[str, Any]:
    out: dict[str, Any] = {"type": type(frame).__name__, "id": frame.id}
    if isinstance(frame, EmotionFrame):
        out.update(label=frame.label, confidence=frame.confidence, probs=frame.probs, arousal=frame.arousal,
                   valence=frame.valence, dominance=frame.dominance, t0=frame.t0, t1=frame.t1,
                   stream=frame.stream, turn=frame.turn, estimates=frame.estimates, final=frame.final)
    if isinstance(frame, TranscriptionFrame):
        out["metadata"] = {k: v for k, v in frame.metadata.items() if k == TRANSCRIPTION_METADATA_KEY}
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    warnings: list[str] = []
    logger.remove()
    logger.add(lambda message: warnings.append(message.record["message"]), level="WARNING")
    frames = build_frames(Path(args.wav), args.lead, args.tail, args.abrupt)
    audio_before = [bytes(f.audio) for f in frames if isinstance(f, InputAudioRawFrame)]
    emotion = SerstreamEmotionProcessor(url=args.url, stream="pipecat-test",
                                        attach_to_transcription=args.attach, token=args.token,
                                        ca_file=args.ca_file)
    calls: list[dict[str, Any]] = []

    @emotion.event_handler("on_emotion")
    async def on_emotion(processor: SerstreamEmotionProcessor, frame: EmotionFrame) -> None:
        calls.append({"processor_is_ours": processor is emotion, **describe(frame)})

    collector = Collector()
    worker = PipelineWorker(Pipeline([emotion, collector]), enable_rtvi=False, idle_timeout_secs=None)
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)

    async def feed() -> None:
        for frame in frames:
            await worker.queue_frame(frame)
            if isinstance(frame, InputAudioRawFrame):
                await asyncio.sleep(FRAME_S / args.speed)

    started = time.monotonic()
    await asyncio.wait_for(asyncio.gather(runner.run(), feed()), timeout=args.timeout)
    elapsed = time.monotonic() - started
    await asyncio.sleep(0.05)  # let the on_emotion task (an asyncio task per call) finish

    seen = collector.frames
    by_id = {f.id: f for f in frames}
    passed = [f for f in seen if f.id in by_id]

    def in_order(system: bool) -> bool:
        # Pipecat itself lets system frames (audio, turn frames) overtake queued data and
        # control frames, so order is promised within each of the two classes.
        mine = [f.id for f in frames if isinstance(f, SystemFrame) == system]
        return [f.id for f in passed if isinstance(f, SystemFrame) == system] == mine

    return {
        "elapsed_s": elapsed,
        "originals": len(frames),
        "passed": len(passed),
        "system_in_order": in_order(True),
        "others_in_order": in_order(False),
        "same_objects": len(passed) == len(frames) and all(by_id[f.id] is f for f in passed),
        "audio_unchanged": [bytes(f.audio) for f in frames if isinstance(f, InputAudioRawFrame)] == audio_before,
        "sequence": [describe(f) for f in seen if not isinstance(f, InputAudioRawFrame)],
        "on_emotion": calls,
        "warnings": [w for w in warnings if "serstream" in w],
        "counters": emotion.counters,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--token", default=None)
    parser.add_argument("--ca-file", default=None)
    parser.add_argument("--wav", required=True)
    parser.add_argument("--lead", type=float, required=True, help="silence before the speech, seconds")
    parser.add_argument("--tail", type=float, required=True, help="silence after the speech, seconds")
    parser.add_argument("--attach", action="store_true")
    parser.add_argument("--abrupt", action="store_true", help="EndFrame right after the turn's last audio")
    parser.add_argument("--speed", type=float, default=1.0, help="feed this many times faster than real time")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    result = asyncio.run(run(args))
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
