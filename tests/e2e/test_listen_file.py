"""``serstream listen --file`` with espeak-ng speech; a real WebSocket client reads the events."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from websockets.asyncio.client import connect

from serstream import events
from tests.e2e.helpers import Background

pytestmark = pytest.mark.slow


async def _collect(url: str, timeout: float) -> list[dict[str, Any]]:
    received: list[dict[str, Any]] = []
    async with connect(url, open_timeout=10) as ws:

        async def read() -> None:
            async for message in ws:  # ends when the server closes (it exits when done)
                received.append(json.loads(message))

        await asyncio.wait_for(read(), timeout)
    return received


def test_listen_file_streams_events_over_websocket(factory_model: Path, speech_wav: Path, free_port: int) -> None:
    proc = Background([
        "listen", "--model", str(factory_model), "--file", str(speech_wav), "--port", str(free_port),
        "--exit-when-done", "--wait-for-client",
    ])
    try:
        proc.wait_for(lambda: proc.stderr_has("waiting for a client"), 60, "the server to start")
        with urllib.request.urlopen(f"http://127.0.0.1:{free_port}/healthz", timeout=10) as response:
            health = json.loads(response.read())
        assert response.status == 200
        assert health["status"] == "ok" and health["device"] == "cpu"
        received = asyncio.run(_collect(f"ws://127.0.0.1:{free_port}/events", timeout=90))
        code = proc.finish(timeout=30)
    finally:
        proc.kill()
    assert code == 0, "\n".join(proc.stderr)
    assert "Traceback" not in "\n".join(proc.stderr)

    validator = jsonschema.Draft202012Validator(events.load_schema())
    for event in received:
        validator.validate(event)
    stream_id = f"file:{speech_wav.name}"
    mine = [e for e in received if e["stream"] == stream_id]
    states = [(e["type"], e.get("state") or e.get("kind")) for e in mine]
    assert states[0] == ("stream", "open")
    assert states[-1] == ("stream", "closed")
    starts = states.count(("speech", "start"))
    ends = states.count(("speech", "end"))
    finals = states.count(("emotion", "final"))
    # Three sentences with one-second pauses: espeak-ng's short inner pauses may split one.
    assert 3 <= starts == ends
    assert finals >= 3
    assert ("emotion", "partial") in states
    emotions = [e for e in mine if e["type"] == "emotion"]
    assert [e["seq"] for e in emotions] == list(range(len(emotions)))
    # Every final follows the end of its speech.
    for index, event in enumerate(mine):
        if event["type"] == "emotion" and event["kind"] == "final":
            before = [e for e in mine[:index] if e["type"] == "speech" and e["state"] == "end"]
            assert before and before[-1]["t"] == pytest.approx(event["t1"], abs=1e-3)


def test_listen_file_json_lines_fast(factory_model: Path, speech_wav_44k_stereo: Path, free_port: int) -> None:
    """--fast --json: a 44.1 kHz stereo file, replayed without pacing, comes out whole on stdout."""
    proc = Background([
        "listen", "--model", str(factory_model), "--file", str(speech_wav_44k_stereo), "--fast",
        "--port", str(free_port), "--exit-when-done", "--json", "--quiet",
    ])
    try:
        code = proc.finish(timeout=90)
    finally:
        proc.kill()
    assert code == 0, "\n".join(proc.stderr)
    lines = proc.json_events()
    validator = jsonschema.Draft202012Validator(events.load_schema())
    for event in lines:
        validator.validate(event)
    stream = [e for e in lines if e["stream"] != events.STATS_STREAM]
    opened = stream[0]
    assert opened["type"] == "stream" and opened["sample_rate"] == 44100 and opened["channels"] == 2
    assert stream[-1]["type"] == "stream" and stream[-1]["state"] == "closed"
    finals = [e for e in stream if e["type"] == "emotion" and e["kind"] == "final"]
    assert len(finals) >= 2
    # The monitor's last word is a stats event with the run's totals: nothing dropped.
    last = lines[-1]
    assert last["type"] == "stats"
    assert last["drops"]["audio_samples"] == 0 and last["drops"]["bad_samples"] == 0
