"""``SerstreamEmotion`` against a scripted "monitor": annotate's wait, one reading for two speech spans, bad messages.

Run by tests/clients/test_livekit.py with the interpreter of
clients/livekit/.venv. A real monitor decides itself when it sends what;
this script serves a small WebSocket endpoint of its own instead, so the
timing is fixed: it takes the plugin's hello and audio (stereo, 24 kHz),
renames the stream (``lk-fake-2``, as a monitor does when a name is taken),
and sends the speech and emotion events of two speech spans of one user
turn, the second span's final 0.6 s after the turn ended, so ``annotate``
has to wait for it. In between it sends what a broken or newer monitor
might: text that is not JSON, an emotion event with broken fields, an event
of schema version 2 and the same ``inference_error`` three times. It writes
what happened as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from livekit import rtc
from livekit.agents import llm
from serstream_livekit import SerstreamEmotion
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

RATE, CHANNELS, FRAME_S = 24_000, 2, 0.02
LABELS = ["angry", "neutral"]


def emotion_event(t0: float, t1: float, angry: float, utterance: int) -> str:
    mood = {"label": "angry" if angry > 0.5 else "neutral", "confidence": max(angry, 1 - angry),
            "probs": {"angry": angry, "neutral": 1 - angry}, "arousal": angry, "valence": -angry, "dominance": 0.0}
    return json.dumps({"type": "emotion", "v": 1, "stream": "lk-fake-2", "ts": 1.0, "seq": utterance,
                       "kind": "final", "utterance": utterance, "t0": t0, "t1": t1, **mood, "smoothed": mood,
                       "latency_ms": 5.0})


def speech(state: str, t: float) -> str:
    return json.dumps({"type": "speech", "v": 1, "stream": "lk-fake-2", "ts": 1.0, "state": state, "t": t})


BAD = [
    "this is not JSON",
    json.dumps({"type": "emotion", "v": 1, "stream": "lk-fake-2", "ts": 1.0, "t0": "soon", "t1": 1.0,
                "probs": {"angry": 1}}),
]
NEWER = json.dumps({"type": "telepathy", "v": 2, "stream": "lk-fake-2", "ts": 1.0})
ERROR = json.dumps({"type": "error", "v": 1, "stream": "lk-fake-2", "ts": 1.0, "code": "inference_error",
                    "message": "the worker failed", "count": 1})


async def run() -> dict[str, Any]:
    warnings: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            warnings.append(record.getMessage())

    logging.getLogger("serstream_livekit").addHandler(Keep(level=logging.WARNING))
    hellos: list[dict[str, Any]] = []
    received = bytearray()
    outbox: asyncio.Queue[str | None] = asyncio.Queue()

    async def monitor(ws: ServerConnection) -> None:
        hellos.append(json.loads(await ws.recv()))
        await ws.send(json.dumps({"type": "stream", "v": 1, "stream": "lk-fake-2", "ts": 1.0, "state": "open",
                                  "source": "websocket", "codec": "pcm_s16le", "sample_rate": RATE,
                                  "channels": CHANNELS}))

        async def take() -> None:
            with contextlib.suppress(ConnectionClosed):
                async for message in ws:
                    if isinstance(message, bytes):
                        received.extend(message)

        taker = asyncio.ensure_future(take())
        with contextlib.suppress(ConnectionClosed):
            while (message := await outbox.get()) is not None:
                await ws.send(message)
        taker.cancel()

    async with serve(monitor, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        emotion = SerstreamEmotion(url=f"ws://127.0.0.1:{port}", stream="lk-fake", annotate_wait_s=3.0)
        readings: list[dict[str, Any]] = []
        emotion.on_emotion(lambda reading: readings.append(reading.as_dict()))
        pushed = 0

        async def feed(seconds: float) -> None:
            nonlocal pushed
            per_frame = int(RATE * FRAME_S)
            for i in range(round(seconds / FRAME_S)):
                # a ramp, so the bytes are not all zeros
                samples = bytes((i + k) % 256 for k in range(per_frame * CHANNELS * 2))
                emotion.push_frame(rtc.AudioFrame(samples, RATE, CHANNELS, per_frame))
                if emotion.connected:
                    pushed += len(samples)
                await asyncio.sleep(FRAME_S)

        deadline = time.monotonic() + 10
        while not emotion.connected and time.monotonic() < deadline:
            await feed(FRAME_S)
        connected_at = emotion.stream_seconds  # where the turn's audio starts on the stream clock
        # Span A: 1 s of speech, and the monitor's events for it, final included.
        emotion.user_started()
        await feed(1.0)
        emotion.user_stopped()
        for message in [speech("start", connected_at), speech("end", connected_at + 1.0),
                        emotion_event(connected_at, connected_at + 1.0, 0.9, 0), *BAD, NEWER, ERROR, ERROR]:
            await outbox.put(message)
        await feed(0.3)
        # Span B: another second; its final comes 0.6 s after the turn ended.
        emotion.user_started()
        await feed(1.0)
        emotion.user_stopped()
        b0 = connected_at + 1.3
        await outbox.put(speech("start", b0))

        async def late_final() -> None:
            await asyncio.sleep(0.6)
            for message in [speech("end", b0 + 1.0), emotion_event(b0, b0 + 1.0, 0.3, 1), ERROR, *BAD]:
                await outbox.put(message)

        message = llm.ChatMessage(role="user", content=["I am upset"])
        late = asyncio.ensure_future(late_final())
        started = time.monotonic()
        reading = await emotion.annotate(message)
        waited = time.monotonic() - started
        await late
        await feed(0.3)
        await emotion.aclose()
        await outbox.put(None)
        return {
            "hellos": hellos,
            "waited_s": waited,
            "annotated": reading.as_dict() if reading else None,
            "extra": dict(message.extra),
            "text": message.text_content,
            "readings": readings,
            "pushed_bytes": pushed,
            "received_bytes": len(received),
            "stream_id": emotion.stream_id,
            "counters": emotion.counters,
            "warnings": [w for w in warnings if "serstream" in w],
        }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    Path(args.out).write_text(json.dumps(asyncio.run(run()), indent=1))


if __name__ == "__main__":
    main()
