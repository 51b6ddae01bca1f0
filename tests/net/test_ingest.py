"""WebSocket ingest against a live server: real sockets, real monitor, the factory model.

Two clients push different espeak-ng speech at once and each gets only its
own stream's events; tokens are enforced with close code 1008; a bad hello
is refused with a one-line reason; text and partial-sample frames mid-stream
are counted and reported once while the stream goes on; a client that drops
mid-frame is reported "disconnected" and the other client keeps going.
"""

from __future__ import annotations

import asyncio
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from serstream.client import EmotionEvent, Event, IngestClient, IngestRefused, StreamEvent, parse_event
from serstream.sources.ingest import HelloError, parse_hello
from tests.audio import speech_with_pauses
from tests.net.conftest import LiveServer, wait_until

TOKEN = "s3cret-token"


def read_audio(path: Path) -> tuple[np.ndarray, int]:
    audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
    return audio, int(rate)


async def push_and_collect(client: IngestClient, audio: np.ndarray, block: int) -> list[Event]:
    """Send ``audio`` as fast as the server takes it, end, and return every event received."""
    received: list[Event] = []

    async def gather() -> None:
        async for event in client.events():
            received.append(event)

    reader = asyncio.create_task(gather())
    for start in range(0, audio.shape[0], block):
        await client.send(audio[start:start + block])
    await client.end()
    await asyncio.wait_for(reader, 60)
    return received


async def hello_then(url: str, hello: dict[str, Any] | str | bytes, headers: dict[str, str] | None = None) -> Any:
    """Open a raw connection, send ``hello``, and return the connection after its first reply or close."""
    ws = await connect(url, additional_headers=headers or {})
    await ws.send(hello if isinstance(hello, (str, bytes)) else json.dumps(hello))
    try:
        first = await asyncio.wait_for(ws.recv(), 10)
    except ConnectionClosed:
        return ws, None
    return ws, json.loads(first)


def test_parse_hello_accepts_a_full_hello_and_names_each_problem() -> None:
    hello = parse_hello('{"type":"hello","stream":"call-1","sample_rate":8000,"format":"f32le","channels":2,"x":1}')
    assert (hello.stream, hello.sample_rate, hello.format, hello.channels) == ("call-1", 8000, "f32le", 2)
    cases = {
        b"\x00\x01": (1003, "binary"),
        "not json": (1002, "not valid JSON"),
        '{"type":"hi"}': (1002, '"type": "hello"'),
        '{"type":"hello","stream":"","sample_rate":16000}': (1002, "'stream'"),
        '{"type":"hello","stream":"a b","sample_rate":16000}': (1002, "'stream'"),
        '{"type":"hello","stream":"rtp:123","sample_rate":16000}': (1003, "reserved"),
        '{"type":"hello","stream":"a"}': (1002, "lacks 'sample_rate'"),
        '{"type":"hello","stream":"a","sample_rate":"16000"}': (1002, "integer"),
        '{"type":"hello","stream":"a","sample_rate":12}': (1003, "outside"),
        '{"type":"hello","stream":"a","sample_rate":16000,"format":"mp3"}': (1003, "not supported"),
        '{"type":"hello","stream":"a","sample_rate":16000,"channels":0}': (1003, "channels"),
        '{"type":"hello","stream":"a","sample_rate":16000,"token":5}': (1002, "token"),
    }
    for message, (code, fragment) in cases.items():
        with pytest.raises(HelloError) as info:
            parse_hello(message)
        assert info.value.code == code, message
        assert fragment in info.value.reason, (message, info.value.reason)
        assert "\n" not in info.value.reason


def test_two_clients_get_only_their_own_events(
    live_server_factory: Any, speech_wav: Path, speech_wav_44k_stereo: Path
) -> None:
    server: LiveServer = live_server_factory(token=TOKEN)
    mono, mono_rate = read_audio(speech_wav)
    stereo, stereo_rate = read_audio(speech_wav_44k_stereo)
    url = server.url("/ingest")

    async def run() -> tuple[tuple[str | None, list[Event]], tuple[str | None, list[Event]]]:
        # Both ask for the same name: one gets it, the other a suffix.
        first = IngestClient(url, "caller", mono_rate, "s16le", TOKEN)
        second = IngestClient(url, "caller", stereo_rate, "f32le", TOKEN, channels=2)
        async with first, second:
            got_first, got_second = await asyncio.gather(
                push_and_collect(first, mono[:, 0], 1600),
                push_and_collect(second, stereo, 4410),
            )
        return (first.stream_id, got_first), (second.stream_id, got_second)

    (id_a, events_a), (id_b, events_b) = asyncio.run(run())
    assert {id_a, id_b} == {"caller", "caller-2"}
    for stream_id, received, codec, rate, channels in (
        (id_a, events_a, "pcm_s16le", mono_rate, 1),
        (id_b, events_b, "pcm_f32le", stereo_rate, 2),
    ):
        assert received, stream_id
        assert {e.stream for e in received} == {stream_id}, "a client got another stream's events"
        opened = received[0]
        assert isinstance(opened, StreamEvent) and opened.state == "open"
        got = (opened.source, opened.codec, opened.sample_rate, opened.channels)
        assert got == ("websocket", codec, rate, channels)
        assert any(isinstance(e, EmotionEvent) for e in received), f"{stream_id} got no emotion event"
        last = received[-1]
        assert isinstance(last, StreamEvent) and last.state == "closed" and last.reason == "end of stream"
        assert not any(e.type == "stats" for e in received)
    # The monitor-side view agrees: each stream's emotion events are its own.
    assert server.collector.of(id_a, "emotion") and server.collector.of(id_b, "emotion")
    assert server.handler is not None and server.handler.counters["ended"] == 2


def test_token_is_required_and_checked(live_server_factory: Any) -> None:
    server: LiveServer = live_server_factory(token=TOKEN)
    url = server.url("/ingest")
    hello = {"type": "hello", "stream": "t", "sample_rate": 16000, "format": "s16le"}

    async def run() -> None:
        with pytest.raises(IngestRefused) as info:
            async with IngestClient(url, "t", 16000, token="wrong"):
                pass
        assert (info.value.code, info.value.reason) == (1008, "invalid token")
        assert "invalid token" in str(info.value)
        # Missing token, and a wrong one in the hello instead of the header.
        for sent in (hello, {**hello, "token": "nope"}):
            ws, first = await hello_then(url, sent)
            assert first is None
            assert (ws.close_code, ws.close_reason) == (1008, "invalid token")
        # The right token in the hello is as good as the header.
        ws, first = await hello_then(url, {**hello, "token": TOKEN})
        assert first is not None and first["type"] == "stream" and first["state"] == "open"
        await ws.close()

    asyncio.run(run())
    assert server.handler is not None and server.handler.counters["refused_token"] == 3


@pytest.mark.parametrize(
    ("first", "code", "fragment"),
    [
        (b"\x01\x02\x03\x04", 1003, "JSON text hello"),
        ("{", 1002, "not valid JSON"),
        ({"type": "hello", "stream": "x", "sample_rate": 16000, "format": "u8"}, 1003, "format"),
        # A reason quoting a long or non-string value must still fit a close frame (123 bytes).
        ({"type": "hello", "stream": "x", "sample_rate": 16000, "format": "x" * 300}, 1003, "format"),
        ({"type": "hello", "stream": "x", "sample_rate": 16000, "format": [1]}, 1003, "format"),
        ({"type": "hello", "stream": "x", "sample_rate": 10**200}, 1003, "sample_rate"),
    ],
)
def test_a_bad_hello_is_refused_with_a_reason(live_server_factory: Any, first: Any, code: int, fragment: str) -> None:
    server: LiveServer = live_server_factory()

    async def run() -> None:
        ws, reply = await hello_then(server.url("/ingest"), first)
        assert reply is None
        assert ws.close_code == code
        assert fragment in ws.close_reason

    asyncio.run(run())
    assert server.handler is not None and server.handler.counters["bad_hello"] == 1
    assert server.monitor is not None and server.monitor.stream_ids == []


def test_text_and_partial_frames_mid_stream_are_counted_and_reported_once(live_server_factory: Any) -> None:
    server: LiveServer = live_server_factory()
    speech = speech_with_pauses(((0.3, 1.5),), tail_s=0.8)
    pcm = (speech * 32767).astype("<i2").tobytes()

    async def run() -> list[dict[str, Any]]:
        ws, opened = await hello_then(server.url("/ingest"), {"type": "hello", "stream": "chat", "sample_rate": 16000})
        assert opened is not None and opened["stream"] == "chat"
        half = len(pcm) // 2 // 640 * 640
        for start in range(0, half, 640):
            await ws.send(pcm[start:start + 640])
        for text in ("hello?", '{"type":"pause"}', "x" * 1000):
            await ws.send(text)
        for odd in (b"\x01", b"\x01\x02\x03"):
            await ws.send(odd)
        for start in range(half, len(pcm), 640):
            await ws.send(pcm[start:start + 640])
        await ws.send(json.dumps({"type": "end"}))
        received = [json.loads(message) async for message in ws]
        assert ws.close_code == 1000
        return received

    received = asyncio.run(run())
    errors = [e for e in received if e["type"] == "error"]
    assert sorted(e["code"] for e in errors) == ["bad_frame", "bad_message"]
    assert all(e["count"] == 1 for e in errors)
    assert any(e["type"] == "emotion" for e in received), "the stream stopped after the bad messages"
    assert received[-1]["type"] == "stream" and received[-1]["state"] == "closed"
    counters = server.handler.counters if server.handler else {}
    assert counters["bad_messages"] == 3
    assert counters["bad_frames"] == 2 and counters["bad_frame_bytes"] == 4
    assert server.monitor is not None
    drops = server.monitor.stats()["drops"]
    assert (drops["ingest_bad_messages"], drops["ingest_bad_frames"]) == (3, 2)


def _partial_masked_frame(declared: int, sent: int) -> bytes:
    """The start of a masked binary frame that claims ``declared`` payload bytes but carries ``sent``."""
    header = bytes([0x82, 0x80 | 126]) + struct.pack("!H", declared) + b"\x11\x22\x33\x44"
    return header + bytes(sent)


def test_a_client_dropping_mid_frame_is_reported_and_others_continue(live_server_factory: Any) -> None:
    server: LiveServer = live_server_factory()
    url = server.url("/ingest")
    speech = speech_with_pauses(((0.3, 2.0), (1.0, 1.5)), tail_s=0.8)

    async def run() -> list[Event]:
        steady = IngestClient(url, "steady", 16000)
        await steady.open()
        received: list[Event] = []

        async def gather() -> None:
            async for event in steady.events():
                received.append(event)

        reader = asyncio.create_task(gather())
        half = speech.size // 2
        for start in range(0, half, 1600):
            await steady.send(speech[start:start + 1600])
        ws, opened = await hello_then(url, {"type": "hello", "stream": "flaky", "sample_rate": 16000})
        assert opened is not None
        await ws.send(bytes(3200))
        # Half a frame on the wire, then the TCP connection is gone.
        ws.transport.write(_partial_masked_frame(4000, 100))
        ws.transport.abort()
        await asyncio.to_thread(
            wait_until, lambda: bool(server.collector.of("flaky", "stream", state="closed")), 10, "flaky closed"
        )
        for start in range(half, speech.size, 1600):
            await steady.send(speech[start:start + 1600])
        await steady.end()
        await asyncio.wait_for(reader, 60)
        await steady.close()
        return received

    received = asyncio.run(run())
    closed = server.collector.of("flaky", "stream", state="closed")
    assert [e["reason"] for e in closed] == ["disconnected"]
    assert server.handler is not None and server.handler.counters["disconnects"] == 1
    finals = [e for e in received if isinstance(e, EmotionEvent) and e.kind == "final"]
    assert len({e.utterance for e in finals}) == 2, "the other client lost an utterance"
    assert {e.stream for e in received} == {"steady"}
    assert isinstance(received[-1], StreamEvent) and received[-1].reason == "end of stream"


def test_an_oversized_frame_closes_with_1009_and_is_counted(live_server_factory: Any) -> None:
    server: LiveServer = live_server_factory(max_frame_bytes=4096)

    async def run() -> int | None:
        ws, opened = await hello_then(server.url("/ingest"), {"type": "hello", "stream": "big", "sample_rate": 16000})
        assert opened is not None
        await ws.send(bytes(2048))
        with pytest.raises(ConnectionClosed):
            await ws.send(bytes(8192))
            await asyncio.wait_for(ws.recv(), 10)
            await asyncio.wait_for(ws.recv(), 10)
        return ws.close_code

    code = asyncio.run(run())
    assert code == 1009
    wait_until(lambda: bool(server.collector.of("big", "stream", state="closed")), 10, "big closed")
    assert server.handler is not None and server.handler.counters["oversized_frames"] == 1
    assert server.handler.counters["frames"] == 1


def test_a_fast_sender_is_held_back_not_dropped(live_server_factory: Any) -> None:
    # A ring of 0.25 s: 6 s of audio sent at once must wait for room instead of overwriting. (With a
    # 1 s ring the pipeline thread sometimes drained each 1 s frame's pieces as fast as they came, and
    # the handler never had to wait: one CI run of 2026-12-03. A frame is now 16 pieces into a ring
    # that holds under 4.)
    from serstream.monitor import MonitorConfig

    server: LiveServer = live_server_factory(monitor_config=MonitorConfig(ring_seconds=0.25), max_speed=None)
    speech = speech_with_pauses(((0.3, 2.0), (1.0, 2.5)), tail_s=0.8)

    async def run() -> list[Event]:
        async with IngestClient(server.url("/ingest"), "replay", 16000, "f32le") as client:
            return await push_and_collect(client, speech, 16000)

    received = asyncio.run(run())
    assert server.handler is not None and server.handler.counters["backpressure_waits"] > 0
    assert server.monitor is not None
    assert server.monitor.stats()["drops"]["audio_samples"] == 0
    finals = [e for e in received if isinstance(e, EmotionEvent) and e.kind == "final"]
    assert len({e.utterance for e in finals}) == 2
    assert parse_event(json.dumps(server.collector.of("replay", "stream")[-1])).reason == "end of stream"  # type: ignore[union-attr]


def test_a_replay_faster_than_real_time_is_paced_to_the_speed_cap(live_server_factory: Any) -> None:
    # 6 s of audio sent at once, a cap of 2x real time after the default 2 s burst:
    # taking it in must last about (6 - 2) / 2 = 2 s, and nothing is dropped meanwhile.
    server: LiveServer = live_server_factory(max_speed=2.0)
    speech = speech_with_pauses(((0.3, 2.0), (1.0, 2.0)), tail_s=0.7)
    assert abs(speech.size / 16000 - 6.0) < 0.05

    async def run() -> tuple[float, list[Event]]:
        async with IngestClient(server.url("/ingest"), "replay", 16000, "f32le") as client:
            started = asyncio.get_running_loop().time()
            received = await push_and_collect(client, speech, 1600)
            return asyncio.get_running_loop().time() - started, received

    took, received = asyncio.run(run())
    assert server.handler is not None and server.handler.counters["speed_waits"] > 0
    assert took >= 1.7, f"6 s of audio went in within {took:.2f} s, faster than the 2x cap allows"
    assert server.monitor is not None and server.monitor.stats()["drops"]["audio_samples"] == 0
    finals = [e for e in received if isinstance(e, EmotionEvent) and e.kind == "final"]
    assert len({e.utterance for e in finals}) == 2


def test_split_connections_share_the_name_rule_and_the_stream_cap(live_server_factory: Any) -> None:
    """Two split clients ask for one name: the second's parties move to the next base; a third is refused.

    The second names its call (CA1): its parties carry that call, the first's carry their base name.
    """
    server: LiveServer = live_server_factory(max_streams=5)
    url = server.url("/ingest")
    stereo = np.stack([speech_with_pauses(((0.3, 1.2),), seed=1), speech_with_pauses(((0.3, 1.2),), seed=2)], axis=1)

    async def run() -> tuple[list[Event], list[Event], Any]:
        first = IngestClient(url, "desk", 16000, "f32le", channels=2, split=True)
        second = IngestClient(url, "desk", 16000, "f32le", channels=2, roles=["left", "right"], call="CA1")
        async with first, second:
            # 4 of 5 streams are open: another split connection (2 more) does not fit.
            ws, reply = await hello_then(url, {"type": "hello", "stream": "more", "sample_rate": 16000,
                                               "channels": 2, "split": True})
            got = await asyncio.gather(push_and_collect(first, stereo, 1600), push_and_collect(second, stereo, 1600))
        return got[0], got[1], (ws.close_code, ws.close_reason, reply)

    first_events, second_events, refused = asyncio.run(run())
    assert refused[0] == 1013 and "too many ingest streams" in refused[1] and refused[2] is None
    for received, ids, call in (
        (first_events, {"desk:left": "left", "desk:right": "right"}, "desk"),
        (second_events, {"desk-2:left": "left", "desk-2:right": "right"}, "CA1"),
    ):
        opened = {e.stream: e for e in received if isinstance(e, StreamEvent) and e.state == "open"}
        assert {sid: e.role for sid, e in opened.items()} == ids
        assert {e.call for e in opened.values()} == {call}
        assert {e.stream for e in received if isinstance(e, EmotionEvent)} == set(ids), "a party got no estimate"
    assert server.handler is not None and server.handler.counters["streams_opened"] == 4
    assert server.handler.counters["refused_busy"] == 1
    wait_until(lambda: server.handler is not None and server.handler.active == 0, 10, "the streams to be let go")
