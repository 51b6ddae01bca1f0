"""Fuzzing the live network inputs: random and mutated ingest messages and RTP datagrams.

Bounded, seeded loops (the same inputs every run) against a live server:

* ingest: connections whose first message is random bytes, random text, a
  mutated hello or a huge text; then connections that, after a good hello,
  send thousands of random binary frames (whole and partial samples), random
  text and mutated JSON. The server must survive, account for every message
  in its counters, and still serve a well-behaved client afterwards.
* RTP: a burst of 12,000 random and mutated datagrams at the live RtpSource
  on loopback, while a valid stream is open. Every datagram must be counted
  (accepted, rejected per cause, or dropped by the kernel), and the valid
  stream must still produce emotion events.

* hello parser: a seeded loop of 100,000 random and mutated first messages
  through :func:`serstream.sources.ingest.parse_hello` (no server: the pure part).
  Each is a valid hello or a :class:`HelloError` with a close code and a
  one-line reason that fits a WebSocket close frame; nothing else escapes.

(The 100,000-packet fuzz of the pure RTP parser and demux is tests/rtp/test_fuzz.py.)
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from typing import Any

import numpy as np
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from serstream.client import EmotionEvent, IngestClient
from serstream.rtp import build_rtp, encode_ulaw
from serstream.sources.ingest import FORMATS, MAX_CLOSE_REASON_BYTES, Hello, HelloError, parse_hello
from serstream.sources.rtp import RtpSourceConfig
from tests.audio import speech_with_pauses
from tests.net.conftest import LiveServer, wait_until

MAX_FRAME = 16 * 1024
GOOD_HELLO = {"type": "hello", "stream": "fuzz", "sample_rate": 48000, "format": "s16le", "channels": 1}


def random_text(rng: np.random.Generator, n: int) -> str:
    return "".join(chr(c) for c in rng.integers(32, 0x2FF, n))


def bad_first_message(rng: np.random.Generator, i: int) -> str | bytes:
    """A first message that must be refused: random bytes, random text, or a broken hello."""
    kind = i % 5
    if kind == 0:
        return rng.bytes(int(rng.integers(0, 300)))
    if kind == 1:
        return random_text(rng, int(rng.integers(0, 200)))
    if kind == 2:
        # A good hello with one field made wrong.
        broken = dict(GOOD_HELLO)
        key = ["type", "stream", "sample_rate", "format", "channels"][int(rng.integers(0, 5))]
        broken[key] = [None, -1, "", "x" * 300, 3.5, [1], {"a": 1}][int(rng.integers(0, 7))]
        return json.dumps(broken)
    if kind == 3:
        text = json.dumps(GOOD_HELLO)
        cut = int(rng.integers(1, len(text)))
        return text[:cut]
    return json.dumps({"type": "hello", "stream": "s", "sample_rate": 16000, "pad": "x" * (MAX_FRAME * 2)})


async def refused_hellos(url: str, rng: np.random.Generator, count: int) -> int:
    """Send ``count`` bad first messages, one connection each; return how many were refused with a reason."""
    refused = 0
    for i in range(count):
        ws = await connect(url, max_size=None)
        message = bad_first_message(rng, i)
        try:
            await ws.send(message)
            await asyncio.wait_for(ws.recv(), 5)
        except ConnectionClosed:
            pass
        if ws.close_code in (1002, 1003, 1009) and (ws.close_reason or ws.close_code == 1009):
            refused += 1
        await ws.close()
    return refused


async def noisy_stream(url: str, rng: np.random.Generator, count: int, name: str) -> dict[str, int]:
    """After a good hello, ``count`` random messages; returns what was sent, by kind."""
    sent = {"whole": 0, "partial": 0, "text": 0}
    async with connect(url) as ws:
        await ws.send(json.dumps({**GOOD_HELLO, "stream": name}))
        opened = json.loads(await ws.recv())
        assert opened["type"] == "stream" and opened["state"] == "open"

        async def drain() -> None:
            try:
                async for _ in ws:
                    pass
            except ConnectionClosed:
                pass

        reader = asyncio.create_task(drain())
        for _ in range(count):
            choice = rng.random()
            if choice < 0.6:
                size = int(rng.integers(0, 2000))
                await ws.send(rng.bytes(size))
                sent["whole" if size % 2 == 0 else "partial"] += 1
            elif choice < 0.8:
                await ws.send(random_text(rng, int(rng.integers(0, 100))))
                sent["text"] += 1
            else:
                text = json.dumps({"type": ["end!", "hello", "pause", 7][int(rng.integers(0, 4))],
                                   "data": random_text(rng, 20)})
                await ws.send(text)
                sent["text"] += 1
        await ws.send(json.dumps({"type": "end"}))
        await asyncio.wait_for(reader, 60)
        assert ws.close_code == 1000
    return sent


def test_ingest_survives_random_messages_and_counts_them(live_server_factory: Any) -> None:
    server: LiveServer = live_server_factory(max_frame_bytes=MAX_FRAME, max_speed=None)
    url = server.url("/ingest")
    rng = np.random.default_rng(1234)
    hellos = 150
    per_stream = 3000

    async def run() -> tuple[int, list[dict[str, int]], list[Any]]:
        refused = await refused_hellos(url, rng, hellos)
        sent = await asyncio.gather(*(noisy_stream(url, np.random.default_rng(s), per_stream, f"noise{s}")
                                      for s in range(3)))
        # A well-behaved client afterwards is served as usual.
        speech = speech_with_pauses(((0.3, 1.5),), tail_s=0.8)
        received = []
        async with IngestClient(url, "after", 16000) as client:
            await client.send(speech)
            await client.end()
            received = [event async for event in client.events()]
        return refused, list(sent), received

    refused, sent, received = asyncio.run(run())
    counters = server.handler.counters if server.handler else {}
    assert refused == hellos
    assert counters["bad_hello"] + counters["oversized_frames"] == hellos
    assert counters["oversized_frames"] == hellos // 5  # the huge hellos
    whole = sum(s["whole"] for s in sent)
    # The good client's frames come on top of the noise (its audio goes in frames of at most 8 KiB).
    assert counters["frames"] - whole >= 1
    assert counters["bad_frames"] == sum(s["partial"] for s in sent)
    assert counters["bad_messages"] == sum(s["text"] for s in sent)
    assert counters["ended"] == 4
    assert any(isinstance(e, EmotionEvent) for e in received)
    assert server.monitor is not None and server.monitor.health()["status"] == "ok"


def mutate(rng: np.random.Generator, packet: bytes) -> bytes:
    """A damaged copy: flipped bytes, a cut, an extension, or a rewritten header byte."""
    data = bytearray(packet)
    kind = int(rng.integers(0, 4))
    if kind == 0:
        for _ in range(int(rng.integers(1, 6))):
            data[int(rng.integers(0, len(data)))] = int(rng.integers(0, 256))
    elif kind == 1:
        data = data[: int(rng.integers(0, len(data)))]
    elif kind == 2:
        data += rng.bytes(int(rng.integers(1, 64)))
    else:
        data[0] = int(rng.integers(0, 256))
    return bytes(data)


def test_rtp_burst_of_random_datagrams_is_counted_and_streams_go_on(live_server_factory: Any) -> None:
    # No idle close during the test: on a busy machine the burst can outlast any short timeout, and
    # the valid call would rightly be closed as idle in the middle. The port is stopped at the end.
    server: LiveServer = live_server_factory(rtp=RtpSourceConfig(idle_timeout_s=600.0, max_streams=16))
    source = server.rtp
    assert source is not None and server.monitor is not None
    rng = np.random.default_rng(99)
    speech = speech_with_pauses(((0.3, 2.0),), tail_s=1.0, rate=8000)
    valid = [
        build_rtp(encode_ulaw(speech[i * 160:(i + 1) * 160]), payload_type=0, sequence=i, timestamp=i * 160,
                  ssrc=0x5EED)
        for i in range(speech.size // 160)
    ]
    template = build_rtp(bytes(160), payload_type=0, sequence=7, timestamp=0, ssrc=0xBAD)
    target = ("127.0.0.1", source.port)
    burst = 12_000
    # Built before sending, so the burst itself is short.
    junk = [rng.bytes(int(rng.integers(0, 400))) if i % 2 else mutate(rng, template) for i in range(burst)]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        half = len(valid) // 2
        for packet in valid[:half]:
            sock.sendto(packet, target)
            time.sleep(0.001)
        for i, datagram in enumerate(junk):
            sock.sendto(datagram, target)
            if i % 200 == 199:
                time.sleep(0.002)  # loopback is faster than any receiver: leave it a moment
        for packet in valid[half:]:
            sock.sendto(packet, target)
            time.sleep(0.001)
    total = len(valid) + burst

    def all_counted() -> bool:
        s = source.stats()
        return s["received"] + s["kernel_drops"] == total

    wait_until(all_counted, 20, "every datagram to be counted")
    stats = source.stats()
    assert stats["received"] == stats["accepted"] + sum(stats["rejects"].values())
    assert sum(stats["rejects"].values()) > burst // 2, stats["rejects"]
    stream_id = "rtp:00005eed"
    wait_until(lambda: bool(server.collector.of(stream_id, "emotion")), 20, "the valid stream's estimates")
    source.stop()
    wait_until(lambda: bool(server.collector.of(stream_id, "stream", state="closed")), 20, "the valid stream to close")
    assert [e["state"] for e in server.collector.of(stream_id, "stream")] == ["open", "closed"]
    totals = source.stats()["closed"][stream_id]
    # The valid stream lost nothing unless the kernel dropped some of its packets in the burst.
    assert totals["lost"] <= stats["kernel_drops"]
    assert totals["emitted"] + totals["lost"] == len(valid)
    # One error event per reject cause, however many datagrams had it.
    codes = [e["code"] for e in server.collector.of(source.label, "error")]
    assert len(codes) == len(set(codes)) and set(codes) <= set(stats["rejects"]) | {"stream_refused"}
    assert server.monitor.health()["status"] == "ok"


# -- the hello parser, 100,000 messages ------------------------------------------

N_HELLOS = 100_000
ODD_VALUES: list[Any] = [None, True, -1, 0, 8000, 2**70, 3.5, "", "x" * 300, "\u00e9" * 80, "s16le", "f32le",
                         "rtp:1", [1], {"a": 1}, [[[]]], "call\n17"]


def hello_candidate(rng: np.random.Generator, i: int) -> str | bytes:
    """A first message: a mutated good hello (most), random text, random bytes or deep nesting."""
    kind = i % 8
    if kind <= 2:  # one to three fields replaced by odd values, or removed
        hello: dict[str, Any] = {**GOOD_HELLO, "token": "t"}
        for _ in range(int(rng.integers(1, 4))):
            key = list(hello)[int(rng.integers(0, len(hello)))] if hello else "type"
            if rng.random() < 0.15:
                hello.pop(key, None)
            else:
                hello[key] = ODD_VALUES[int(rng.integers(0, len(ODD_VALUES)))]
        return json.dumps(hello, ensure_ascii=bool(rng.random() < 0.5))
    text = json.dumps({**GOOD_HELLO, "stream": f"s{i}", "channels": int(rng.integers(1, 9))})
    if kind == 3:  # left valid: must be accepted
        return text
    if kind == 4:  # a few characters overwritten
        chars = list(text)
        for _ in range(int(rng.integers(1, 4))):
            chars[int(rng.integers(0, len(chars)))] = chr(int(rng.integers(32, 0x3000)))
        return "".join(chars)
    if kind == 5:  # cut anywhere
        return text[: int(rng.integers(0, len(text)))]
    if kind == 6:
        if rng.random() < 0.7:
            return random_text(rng, int(rng.integers(0, 120)))
        return rng.bytes(int(rng.integers(0, 64)))
    return "[" * int(rng.integers(1, 5000)) + "]" * int(rng.integers(0, 3))


def test_hello_parser_takes_100k_random_and_mutated_messages() -> None:
    rng = np.random.default_rng(31_337)
    outcomes: dict[Any, int] = {}
    for i in range(N_HELLOS):
        message = hello_candidate(rng, i)
        try:
            hello = parse_hello(message)
        except HelloError as error:
            assert error.code in (1002, 1003), (message, error.code)
            assert len(error.reason.encode("utf-8")) <= MAX_CLOSE_REASON_BYTES, error.reason
            assert error.reason and "\n" not in error.reason, error.reason
            outcomes[error.code] = outcomes.get(error.code, 0) + 1
            continue
        # Anything else escaping (TypeError, RecursionError, ...) fails the test by itself.
        assert isinstance(hello, Hello)
        assert isinstance(hello.stream, str) and 1 <= len(hello.stream) <= 100 and "\n" not in hello.stream
        assert not hello.stream.startswith(("rtp:", "file:"))
        assert 1000 <= hello.sample_rate <= 384_000 and hello.format in FORMATS and 1 <= hello.channels <= 8
        outcomes["ok"] = outcomes.get("ok", 0) + 1
    assert sum(outcomes.values()) == N_HELLOS
    # Every path was taken: the untouched hellos (1 in 8) at least are accepted.
    assert outcomes["ok"] >= N_HELLOS // 8 and outcomes[1002] > 1000 and outcomes[1003] > 1000, outcomes
