"""``SerstreamEmotion`` given bad settings and odd input, with no monitor at all.

Run by tests/clients/test_livekit.py with the interpreter of
clients/livekit/.venv. Bad settings must be one clear ``ValueError`` when
the plugin is made; odd input (an item in the audio that is not an
``rtc.AudioFrame``, a frame pushed from outside the event loop, annotate
and close called twice) must pass through or be counted, never raise. It
writes what happened as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
from pathlib import Path
from typing import Any, AsyncIterator

from livekit import rtc
from serstream_livekit import SerstreamEmotion


def error_of(**kwargs: Any) -> str:
    try:
        SerstreamEmotion(**kwargs)
    except ValueError as exc:
        return str(exc)
    return ""


async def run(port: int) -> dict[str, Any]:
    warnings: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            warnings.append(record.getMessage())

    logging.getLogger("serstream_livekit").addHandler(Keep(level=logging.WARNING))
    emotion = SerstreamEmotion(url=f"ws://127.0.0.1:{port}", retry_first_s=0.05, retry_max_s=0.1)
    frame = rtc.AudioFrame(bytes(960), 24_000, 1, 480)
    odd = "not a frame"
    items: list[Any] = [frame, odd, frame]

    async def audio() -> AsyncIterator[Any]:
        for item in items:
            yield item
            await asyncio.sleep(0.02)

    out = [item async for item in emotion.tap(audio())]
    emotion.user_stopped()  # no open turn: ignored
    emotion.user_started()
    emotion.user_started()  # one is open: ignored
    emotion.user_stopped()
    first = await emotion.annotate(None, wait_s=5.0)
    await emotion.aclose()
    await emotion.aclose()
    return {
        "passed_through": len(out) == len(items) and all(a is b for a, b in zip(out, items)),
        "annotate": first,
        "closed": emotion.closed,
        "counters": emotion.counters,
        "warnings": warnings,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True, help="a port nothing listens on")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    result: dict[str, Any] = {
        "bad_url": error_of(url="http://127.0.0.1:8765"),
        "unknown_setting": error_of(url="ws://127.0.0.1:8765", colour="blue"),
        "bad_ca_file": error_of(url="wss://127.0.0.1:8765", ca_file="/nonexistent/ca.pem"),
    }
    # A frame pushed with no event loop running (from a thread, say): counted, logged, never raised.
    outside = SerstreamEmotion(url=f"ws://127.0.0.1:{args.port}")
    outside.push_frame(rtc.AudioFrame(bytes(960), 24_000, 1, 480))
    result["outside_loop"] = outside.counters
    result.update(asyncio.run(run(args.port)))
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
