"""``serstream.client.events`` against a real monitor: typed events, the stream filter, a restart.

``serstream listen`` replays two files with the factory model; the client
asks for one stream. tests/net/test_client.py covers the parsing, the bad
URLs and ``push_file``; this is the same iterator against the real thing,
killed and started again on its port under it.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from serstream import client
from serstream.client import EmotionEvent, SpeechEvent, StatsEvent, StreamEvent, UnknownEvent
from serstream.contract import LABELS
from tests.clients.helpers import start_monitor

pytestmark = pytest.mark.slow

STREAM = "file:speech.wav"
OTHER = "file:speech-44k.wav"


def test_events_are_typed_filtered_and_survive_a_monitor_restart(
    factory_model: Path, speech_wav: Path, speech_wav_44k_stereo: Path, free_port: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="serstream_client.client")
    args = ["listen", "--model", str(factory_model), "--file", str(speech_wav), "--file",
            str(speech_wav_44k_stereo), "--loop", "--port", str(free_port)]
    monitors = [start_monitor(args)]
    before: list[Any] = []
    after: list[Any] = []

    async def run() -> None:
        into = before
        restarted = False
        async for event in client.events(f"ws://127.0.0.1:{free_port}/events", stream=STREAM, max_backoff_s=0.5):
            into.append(event)
            if not restarted and any(isinstance(e, EmotionEvent) and e.kind == "final" for e in before):
                # The monitor goes away under the iterator and comes back on the same port.
                await asyncio.to_thread(monitors[0].kill)
                monitors.append(await asyncio.to_thread(start_monitor, args))
                restarted, into = True, after
            if restarted and any(isinstance(e, EmotionEvent) for e in after):
                return

    try:
        asyncio.run(asyncio.wait_for(run(), 120))
    finally:
        for monitor in monitors:
            monitor.kill()

    every = before + after
    assert not [e for e in every if isinstance(e, UnknownEvent)]
    kinds = {type(e) for e in every}
    assert {EmotionEvent, SpeechEvent} <= kinds, kinds
    assert kinds <= {EmotionEvent, SpeechEvent, StreamEvent, StatsEvent, client.GapEvent}, kinds
    # The client resumed with ?since= the last id it saw; the restarted monitor numbers
    # its ids above the old run's and says so with one `restart` gap, before its own events.
    gaps = [e for e in every if isinstance(e, client.GapEvent)]
    assert [g.reason for g in gaps] == ["restart"] and gaps[0] is after[0], gaps
    old_ids = [e.id for e in before if e.id is not None]
    assert old_ids and gaps[0].since == old_ids[-1] < gaps[0].resume_from
    # Filtered: only the asked-for stream (stats, for the whole monitor, come as "*").
    assert {e.stream for e in every if not isinstance(e, StatsEvent)} == {STREAM}
    assert OTHER not in {e.stream for e in every}
    final = next(e for e in before if isinstance(e, EmotionEvent) and e.kind == "final")
    assert set(final.probs) == set(LABELS) and final.label in LABELS
    assert final.t0 < final.t1 and isinstance(final.smoothed, client.Mood)
    assert all(-1.0 <= v <= 1.0 for v in (final.arousal, final.valence, final.dominance))
    # After the restart the iterator delivers again, and said so once each way.
    assert any(isinstance(e, EmotionEvent) and e.stream == STREAM for e in after)
    messages = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith("disconnected from") for m in messages) == 1, messages
    assert sum(m.startswith("reconnected to") for m in messages) == 1, messages
