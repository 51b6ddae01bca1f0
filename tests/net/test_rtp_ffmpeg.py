"""An RTP sender nobody here wrote: ffmpeg sends espeak-ng speech as PCMU to ``serstream listen --rtp``.

The real command runs as a subprocess; the test reads its events over the
``/events`` WebSocket with :func:`serstream.client.events` and checks that the
SSRC's stream says ``rtp``/``pcmu``/8000 Hz and that emotion estimates for it
arrive. ffmpeg also sends RTCP sender reports to the next port, which the
source binds and ignores.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

from serstream.client import EmotionEvent, Event, StreamEvent, events
from tests.conftest import REPO, require_tools, serstream_command


def free_udp_pair() -> int:
    """An even UDP port on loopback whose successor is free too (for RTP + RTCP)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            if port % 2 or port >= 65535:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port
    raise AssertionError("no free UDP port pair")


async def read_until_emotion(url: str, ffmpeg_cmd: list[str], timeout: float) -> list[Event]:
    """Connect to /events, start ffmpeg, and collect events until the RTP stream has an emotion event."""
    received: list[Event] = []
    ffmpeg: subprocess.Popen[bytes] | None = None

    async def consume() -> None:
        nonlocal ffmpeg
        async for event in events(url, reconnect=True, max_backoff_s=0.5):
            if ffmpeg is None:
                # The first event (a stats tick) proves the subscription is live: start sending.
                ffmpeg = subprocess.Popen(ffmpeg_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            received.append(event)
            if any(isinstance(e, EmotionEvent) and e.stream.startswith("rtp:") for e in received):
                return

    try:
        await asyncio.wait_for(consume(), timeout)
    finally:
        if ffmpeg is not None:
            ffmpeg.terminate()
            ffmpeg.wait(10)
    return received


def test_ffmpeg_pcmu_over_rtp_reaches_the_events_websocket(
    factory_model: Path, speech_wav: Path, free_port: int, tmp_path: Path
) -> None:
    require_tools("ffmpeg")
    rtp_port = free_udp_pair()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("SERSTREAM_MODEL", None)
    stdout_path, stderr_path = tmp_path / "stdout.jsonl", tmp_path / "stderr.txt"
    with open(stdout_path, "w") as out, open(stderr_path, "w") as err:
        listen = subprocess.Popen(
            [*serstream_command(), "listen", "--rtp", f"127.0.0.1:{rtp_port}", "--port", str(free_port), "--json",
             "--model", str(factory_model)],
            cwd=REPO, env=env, stdout=out, stderr=err,
        )
        ffmpeg_cmd = ["ffmpeg", "-nostdin", "-loglevel", "error", "-re", "-i", str(speech_wav), "-ar", "8000",
                      "-ac", "1", "-acodec", "pcm_mulaw", "-f", "rtp", f"rtp://127.0.0.1:{rtp_port}"]
        try:
            received = asyncio.run(read_until_emotion(f"ws://127.0.0.1:{free_port}/events", ffmpeg_cmd, 60))
        finally:
            if listen.poll() is None:
                listen.send_signal(signal.SIGINT)
            try:
                code = listen.wait(30)
            except subprocess.TimeoutExpired:
                listen.kill()
                raise
    stderr = stderr_path.read_text()
    opened = [e for e in received if isinstance(e, StreamEvent) and e.state == "open" and e.source == "rtp"]
    assert len(opened) == 1, [e for e in received if isinstance(e, StreamEvent)]
    stream = opened[0]
    assert stream.stream.startswith("rtp:") and len(stream.stream) == len("rtp:") + 8
    assert (stream.codec, stream.sample_rate, stream.channels) == ("pcmu", 8000, 1)
    assert stream.detail is not None and f"on 127.0.0.1:{rtp_port}" in stream.detail
    emotions = [e for e in received if isinstance(e, EmotionEvent) and e.stream == stream.stream]
    assert emotions and all(0.0 <= e.confidence <= 1.0 for e in emotions)
    assert code == 0, stderr[-2000:]
    # The stream is closed at shutdown, and nothing was rejected (RTCP went to its own port).
    lines: list[dict[str, Any]] = [json.loads(x) for x in stdout_path.read_text().splitlines() if x.startswith("{")]
    closed = [e for e in lines if e["type"] == "stream" and e["stream"] == stream.stream and e["state"] == "closed"]
    assert [e.get("reason") for e in closed] == ["shutdown"]
    assert not [e for e in lines if e["type"] == "error" and e["stream"].startswith("rtp@")]
    assert "Traceback" not in stderr
