"""The Python client: typed events from real event dicts, tolerant parsing, reconnects, clear errors.

Events are made with the monitor's own constructors (serstream.events), so
the client is checked against what the server really sends. The connection
tests use real servers on loopback: a MonitorServer that is stopped and
started again on the same port, a port nothing listens on, an HTTP path that
is not an endpoint, and a live monitor for ``push_file``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from serstream_client import client as client_impl

from serstream import client, events
from serstream.client import (
    BadURL,
    EmotionEvent,
    ErrorEvent,
    FileEvent,
    MonitorUnavailable,
    SpeechEvent,
    StatsEvent,
    StreamEvent,
    UnknownEvent,
    parse_event,
    push_file,
)
from serstream.contract import LABELS
from serstream.core.smoother import MoodState
from serstream.server import EventBus, MonitorServer
from tests.net.conftest import LiveServer

PROBS = np.full(len(LABELS), 1 / len(LABELS))
PROBS[4] += 0.1
PROBS /= PROBS.sum()


def sample_events() -> list[dict[str, Any]]:
    mood = MoodState(label="angry", confidence=0.3, probs=dict(zip(LABELS, PROBS.tolist())), arousal=0.5,
                     valence=-0.2, dominance=0.1)
    return [
        events.stream_opened("s", source="rtp", codec="pcmu", sample_rate=8000, channels=1, ts=1.0, detail="x"),
        events.stream_closed("s", source="rtp", codec="pcmu", sample_rate=8000, channels=1, ts=2.0, reason="idle"),
        events.speech_start("s", t=0.5, ts=1.0),
        events.speech_end("s", t=2.5, duration=2.0, reason="silence", ts=3.0),
        events.emotion_event("s", seq=3, kind="final", utterance=1, t0=0.5, t1=2.5, labels=LABELS, probs=PROBS,
                             avd=[0.5, -0.2, 0.1], smoothed=mood, latency_ms=12.5, ts=3.0,
                             gender=[0.3, 0.7], model="1.0"),
        events.stats_event(uptime_s=5, streams=1, windows_per_s=2.0, batches={"count": 3, "mean_size": 1.5,
                           "max_size": 2}, queues={"worker": 0}, drops={"audio_samples": 0},
                           latency_ms={"p50": 10, "p95": 20, "p99": 30, "count": 4}, device="cpu", ts=5.0),
        events.error_event("s", code="bad_message", message="text ignored", count=1, ts=4.0),
        events.file_event("f", file="a.wav", labels=LABELS, probs=PROBS, avd=[0, 0, 0], segments=2,
                          duration_s=3.5, ts=6.0),
    ]


def test_every_event_type_parses_to_its_dataclass() -> None:
    parsed = [parse_event(events.dumps(e)) for e in sample_events()]
    kinds = [type(p) for p in parsed]
    assert kinds == [StreamEvent, StreamEvent, SpeechEvent, SpeechEvent, EmotionEvent, StatsEvent, ErrorEvent,
                     FileEvent]
    opened, closed, start, end, emotion, stats, error, summary = parsed
    assert isinstance(opened, StreamEvent) and (opened.codec, opened.sample_rate, opened.detail) == ("pcmu", 8000, "x")
    assert isinstance(closed, StreamEvent) and closed.reason == "idle" and closed.state == "closed"
    assert isinstance(end, SpeechEvent) and (end.duration, end.reason) == (2.0, "silence")
    assert isinstance(start, SpeechEvent) and start.duration is None
    assert isinstance(emotion, EmotionEvent)
    assert emotion.label == "angry" and emotion.kind == "final" and emotion.smoothed.label == "angry"
    assert set(emotion.probs) == set(LABELS) and emotion.gender is not None and emotion.gender["male"] == 0.7
    assert isinstance(stats, StatsEvent) and stats.latency_ms["p95"] == 20
    assert isinstance(error, ErrorEvent) and (error.code, error.count) == ("bad_message", 1)
    assert isinstance(summary, FileEvent) and summary.segments == 2
    assert emotion.raw["type"] == "emotion"


def test_unknown_fields_are_ignored() -> None:
    event = sample_events()[2]
    event["mood_of_the_day"] = {"nested": [1, 2]}
    parsed = parse_event(event)
    assert isinstance(parsed, SpeechEvent) and parsed.t == 0.5
    assert parsed.raw["mood_of_the_day"] == {"nested": [1, 2]}


def test_unknown_types_and_newer_versions_warn_once(caplog: pytest.LogCaptureFixture) -> None:
    client_impl._warned.clear()
    caplog.set_level(logging.WARNING, logger="serstream_client.client")
    newer = {**sample_events()[0], "v": 2}
    alien = {"type": "telepathy", "v": 1, "stream": "s", "ts": 1.0}
    broken_newer = {"type": "speech", "v": 3, "stream": "s", "ts": 1.0}  # a field we need was renamed
    for _ in range(3):
        a, b, c = parse_event(newer), parse_event(alien), parse_event(broken_newer)
        # A newer version is read for the fields this client knows (docs/events.md, Versioning).
        assert not isinstance(a, UnknownEvent) and a.v == 2 and a.stream == "s"
        assert isinstance(b, UnknownEvent) and "telepathy" in b.problem and b.type == "telepathy"
        assert isinstance(c, UnknownEvent) and c.v == 3
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 4, messages  # version 2, telepathy, version 3, the malformed v3 speech event
    assert any("version 2" in m for m in messages)
    assert all("\n" not in m for m in messages)


@pytest.mark.parametrize(
    "message",
    [
        "not json",
        "[1, 2]",
        "null",
        b"\xff\xfe",
        '{"type": "emotion", "v": 1, "stream": "s", "ts": 1}',
        '{"type": "stream", "v": 1, "stream": "s", "ts": "yesterday", "state": "open"}',
        '{"type": "error", "v": 1, "stream": "s", "ts": 1, "code": "x", "message": "m", "count": "1"}',
        '{"type": "speech", "v": true, "stream": "s", "ts": 1, "state": "start", "t": 0}',
        '{"type": "emotion", "v": 1, "stream": "s", "ts": 1, "seq": 1, "kind": "final", "utterance": 0,'
        ' "t0": 0, "t1": 1, "label": "a", "confidence": 1, "probs": {"a": 1}, "arousal": 0, "valence": 0,'
        ' "dominance": 0, "smoothed": {"label": "a"}, "latency_ms": 1}',
    ],
)
def test_malformed_messages_become_unknown_events(message: Any) -> None:
    parsed = parse_event(message)
    assert isinstance(parsed, UnknownEvent)
    assert parsed.problem and "\n" not in parsed.problem


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=6),
    max_leaves=8,
)


@settings(derandomize=True, database=None, max_examples=120, deadline=None)
@given(
    kind=st.sampled_from(["emotion", "speech", "stream", "stats", "error", "file", "other"]),
    fields=st.dictionaries(st.sampled_from(["v", "stream", "ts", "state", "t", "seq", "probs", "smoothed", "code",
                                            "count", "sample_rate", "label"]), json_values, max_size=8),
)
def test_parse_event_never_raises(kind: str, fields: dict[str, Any]) -> None:
    parsed = parse_event({"type": kind, **fields})
    assert parsed.type in (kind, "")


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _quiet_server(bus: EventBus, port: int) -> MonitorServer:
    return MonitorServer(bus, "127.0.0.1", port, health=lambda: {"status": "ok"}, metrics=lambda: "")


def test_events_reconnects_after_the_monitor_restarts(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="serstream_client.client")
    port = _port()
    first_event, second_event = sample_events()[2], sample_events()[3]

    async def run() -> list[Any]:
        received: list[Any] = []
        bus = EventBus()
        server = _quiet_server(bus, port)
        await server.start()

        async def consume() -> None:
            async for event in client.events(f"ws://127.0.0.1:{port}/events", stream="s", max_backoff_s=0.3):
                received.append(event)
                if len([e for e in received if not isinstance(e, client.GapEvent)]) == 2:
                    return

        task = asyncio.create_task(consume())
        while bus.subscribers == 0:
            await asyncio.sleep(0.01)
        bus.publish(first_event)
        while not received:
            await asyncio.sleep(0.01)
        await server.close()
        bus = EventBus()
        server = _quiet_server(bus, port)
        await server.start()
        while bus.subscribers == 0:
            await asyncio.sleep(0.01)
        bus.publish({**second_event, "stream": "other"})  # filtered out by ?stream=s
        bus.publish(second_event)
        await asyncio.wait_for(task, 20)
        await server.close()
        return received

    received = asyncio.run(run())
    # The client resumed with ?since=1; the restarted server numbers from 1 again
    # and says so with a `future` gap (nothing lost) before its events.
    assert [type(e) for e in received] == [SpeechEvent, client.GapEvent, SpeechEvent]
    assert (received[1].reason, received[1].lost, received[1].since) == ("future", 0, 1)
    assert [received[0].state, received[2].state] == ["start", "end"]
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("disconnected from") for m in messages), messages
    assert any(m.startswith("reconnected to") for m in messages), messages


def test_no_monitor_and_wrong_urls_are_one_line_connection_errors() -> None:
    port = _port()

    async def first_event(url: str) -> Any:
        async for event in client.events(url, reconnect=False):
            return event

    with pytest.raises(MonitorUnavailable) as info:
        asyncio.run(first_event(f"ws://127.0.0.1:{port}/events"))
    assert "no serstream monitor at" in str(info.value) and "serstream serve" in str(info.value)
    assert isinstance(info.value, ConnectionError) and "\n" not in str(info.value)

    with pytest.raises(BadURL, match="not a WebSocket URL"):
        asyncio.run(first_event(f"http://127.0.0.1:{port}/events"))
    with pytest.raises(BadURL, match="not a WebSocket URL"):
        client.IngestClient(f"127.0.0.1:{port}/ingest")

    async def wrong_path() -> None:
        server = _quiet_server(EventBus(), port)
        await server.start()
        try:
            await first_event(f"ws://127.0.0.1:{port}/evnets")
        finally:
            await server.close()

    with pytest.raises(BadURL, match="HTTP 404"):
        asyncio.run(wrong_path())

    async def ingest_nowhere() -> None:
        async with client.IngestClient(f"ws://127.0.0.1:{port}/ingest", "x", 16000):
            pass

    with pytest.raises(MonitorUnavailable):
        asyncio.run(ingest_nowhere())


def test_push_file_returns_the_streams_events(live_server_factory: Any, speech_wav: Path) -> None:
    server: LiveServer = live_server_factory()
    received = push_file(server.url("/ingest"), speech_wav, "from-file", realtime=False)
    assert isinstance(received[0], StreamEvent) and received[0].state == "open"
    assert received[0].codec == "pcm_f32le" and received[0].sample_rate == 16000
    assert any(isinstance(e, EmotionEvent) for e in received)
    assert isinstance(received[-1], StreamEvent) and received[-1].reason == "end of stream"
    assert {e.stream for e in received} == {"from-file"}


def test_ingest_client_encodes_samples_in_the_declared_format() -> None:
    s16 = client.IngestClient("ws://127.0.0.1:1/ingest", "x", 8000, "s16le")
    assert s16._encode(np.array([0.0, 1.0, -1.0, 2.0])) == np.array([0, 32767, -32767, 32767], "<i2").tobytes()
    assert s16._encode(np.array([5, -5], dtype=np.int16)) == np.array([5, -5], "<i2").tobytes()
    f32 = client.IngestClient("ws://127.0.0.1:1/ingest", "x", 8000, "f32le", channels=2)
    stereo = np.array([[0.5, -0.5], [0.25, 0.0]], dtype=np.float32)
    assert f32._encode(stereo) == stereo.astype("<f4").tobytes()
    with pytest.raises(ValueError, match="channels"):
        f32._encode(np.zeros((4, 3)))


def test_events_filtered_by_call_give_both_parties_and_nothing_else() -> None:
    """A real server and bus: two calls and a lone stream; ``events(call=...)`` keeps one call's parties."""
    port = _port()

    def opened(stream: str, call: str | None = None, role: str | None = None) -> dict[str, Any]:
        return events.stream_opened(stream, source="websocket", codec="pcm_s16le", sample_rate=8000, channels=1,
                                    ts=1.0, call=call, role=role)

    def closed(stream: str, call: str) -> dict[str, Any]:
        return events.stream_closed(stream, source="websocket", codec="pcm_s16le", sample_rate=8000, channels=1,
                                    ts=2.0, reason="end of stream", call=call, role="left")

    published = [
        opened("c1:left", "c1", "left"), opened("c1:right", "c1", "right"), opened("c2:left", "c2", "left"),
        opened("lone"),
        events.speech_start("c1:left", t=1.0, ts=1.0), events.speech_start("c2:left", t=1.0, ts=1.0),
        events.speech_start("lone", t=1.0, ts=1.0), events.speech_start("c1:right", t=2.0, ts=1.0),
        closed("c1:left", "c1"),
        # The id is free again: another stream of that name is not the call's.
        events.speech_start("c1:left", t=9.0, ts=1.0),
        events.speech_end("c1:right", t=3.0, duration=1.0, reason="silence", ts=1.0),
    ]

    async def run() -> list[Any]:
        received: list[Any] = []
        bus = EventBus()
        server = _quiet_server(bus, port)
        await server.start()

        async def consume() -> None:
            async for event in client.events(f"ws://127.0.0.1:{port}/events", call="c1", reconnect=False):
                received.append(event)
                if isinstance(event, SpeechEvent) and event.state == "end":
                    return

        task = asyncio.create_task(consume())
        while bus.subscribers == 0:
            await asyncio.sleep(0.01)
        for event in published:
            bus.publish(event)
        await asyncio.wait_for(task, 20)
        await server.close()
        return received

    received = asyncio.run(run())
    got = [(type(e).__name__, e.stream, getattr(e, "state", None), getattr(e, "role", None)) for e in received]
    assert got == [
        ("StreamEvent", "c1:left", "open", "left"), ("StreamEvent", "c1:right", "open", "right"),
        ("SpeechEvent", "c1:left", "start", None), ("SpeechEvent", "c1:right", "start", None),
        ("StreamEvent", "c1:left", "closed", "left"), ("SpeechEvent", "c1:right", "end", None),
    ]
