"""``SerstreamEmotionProcessor`` against a "monitor" that sends bad and newer messages.

Run by tests/clients/test_pipecat.py with the interpreter of
clients/pipecat/.venv. A real serstream monitor never sends malformed JSON,
so this script serves a small WebSocket endpoint of its own that takes the
plugin's hello and answers with what a broken or newer monitor might send:
text that is not JSON, a JSON array, an emotion event with broken fields,
events of schema version 2 (one of an unknown type), and the same
``inference_error`` three times. Audio frames run through a real Pipecat
pipeline meanwhile. It writes the counters, the warnings the plugin logged,
and whether every frame passed, as JSON to ``--out``; a wrong URL's error
goes there too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any

from loguru import logger
from pipecat.frames.frames import EndFrame, Frame, InputAudioRawFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineWorker
from pipecat.workers.runner import WorkerRunner

# Run as a script from tests/clients/, so its sibling scenario module is importable.
from pipecat_scenario import Collector
from serstream_pipecat import SerstreamEmotionProcessor
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

BAD = [
    "this is not JSON",
    "[1, 2, 3]",
    json.dumps({"type": "emotion", "v": 1, "stream": "bad", "t0": "soon", "t1": 1.0, "probs": {"angry": 1}}),
    json.dumps({"type": "emotion", "v": 1, "stream": "bad", "t0": 0.0, "t1": 1.0, "probs": "angry"}),
]
NEWER = [
    json.dumps({"type": "speech", "v": 2, "stream": "bad", "ts": 1.0, "state": "start", "t": 0.1, "new": 1}),
    json.dumps({"type": "telepathy", "v": 2, "stream": "bad", "ts": 1.0}),
]
ERROR = json.dumps({"type": "error", "v": 1, "stream": "bad", "ts": 1.0, "code": "inference_error",
                    "message": "the worker failed", "count": 1})


async def run() -> dict[str, Any]:
    warnings: list[str] = []
    logger.remove()
    logger.add(lambda message: warnings.append(message.record["message"]), level="WARNING")
    sent = asyncio.Event()
    hellos: list[dict[str, Any]] = []

    async def monitor(ws: ServerConnection) -> None:
        hellos.append(json.loads(await ws.recv()))
        await ws.send(json.dumps({"type": "stream", "v": 1, "stream": "bad", "ts": 1.0, "state": "open",
                                  "source": "websocket", "codec": "pcm_s16le", "sample_rate": 16000,
                                  "channels": 1}))
        for message in [*BAD, *NEWER, ERROR, ERROR, ERROR, *BAD]:
            await ws.send(message)
        sent.set()
        with contextlib.suppress(ConnectionClosed):
            async for _ in ws:  # take the audio until the plugin goes
                pass

    wrong_url = ""
    try:
        SerstreamEmotionProcessor(url="http://127.0.0.1:8765")
    except ValueError as exc:
        wrong_url = str(exc)

    async with serve(monitor, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        emotion = SerstreamEmotionProcessor(url=f"ws://127.0.0.1:{port}", stream="bad")
        collector = Collector()
        worker = PipelineWorker(Pipeline([emotion, collector]), enable_rtvi=False, idle_timeout_secs=None)
        runner = WorkerRunner(handle_sigint=False)
        await runner.add_workers(worker)
        frames: list[Frame] = [InputAudioRawFrame(audio=bytes(640), sample_rate=16000, num_channels=1)
                               for _ in range(50)]

        async def feed() -> None:
            for frame in frames:
                await worker.queue_frame(frame)
                await asyncio.sleep(0.02)
            await asyncio.wait_for(sent.wait(), 10)
            await asyncio.sleep(0.3)  # let the reader get through the messages
            await worker.queue_frame(EndFrame())

        await asyncio.wait_for(asyncio.gather(runner.run(), feed()), timeout=60)
    ids = {f.id for f in frames}
    return {
        "passed": sum(f.id in ids for f in collector.frames),
        "originals": len(frames),
        "ended": isinstance(collector.frames[-1], EndFrame) if collector.frames else False,
        "hellos": hellos,
        "counters": emotion.counters,
        "stream_id": emotion.stream_id,
        "warnings": [w for w in warnings if "serstream" in w],
        "wrong_url": wrong_url,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    Path(args.out).write_text(json.dumps(asyncio.run(run()), indent=1))


if __name__ == "__main__":
    main()
