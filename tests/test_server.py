"""MonitorServer and EventBus over real sockets with real ``websockets`` clients."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import threading
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, ConnectionClosedError, InvalidStatus

from serstream import events
from serstream.server import (
    EventBus,
    MonitorServer,
    ServerError,
    default_dashboard_dir,
    prometheus_text,
)

DEADLINE_S = 20.0  # how long to wait for something that should happen; not a speed check
TS = 1_732_250_000.0

STATS = events.stats_event(
    uptime_s=5.0, streams=2, windows_per_s=3.5,
    batches={"count": 7, "mean_size": 1.5, "max_size": 3},
    queues={"inference": 1}, drops={"events": 4, "audio_samples": 0},
    latency_ms={"p50": 10.0, "p95": 20.0, "p99": 30.0, "count": 9},
    device="cpu", ts=TS,
)


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


async def wait_until(condition: Callable[[], bool]) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_S
    while not condition():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


@asynccontextmanager
async def running_server(**kwargs: Any) -> AsyncIterator[MonitorServer]:
    bus = kwargs.pop("bus", None) or EventBus()
    kwargs.setdefault("health", lambda: {"status": "ok", "streams": 2})
    kwargs.setdefault("metrics", lambda: prometheus_text(STATS))
    server = MonitorServer(bus, "127.0.0.1", 0, **kwargs)
    await server.start()
    try:
        yield server
    finally:
        await server.close()


def ws_url(server: MonitorServer, path: str) -> str:
    return f"ws://127.0.0.1:{server.port}{path}"


async def client(server: MonitorServer, path: str = "/events", **kwargs: Any) -> ClientConnection:
    before = server.bus.subscribers
    conn = await connect(ws_url(server, path), proxy=None, **kwargs)
    if path.startswith("/events"):
        # The handshake completes before the handler subscribes; events published
        # in between would be missed, so wait for the subscription.
        await wait_until(lambda: server.bus.subscribers > before)
    return conn


def http_request(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE_S)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


async def http_get(server: MonitorServer, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    return await asyncio.to_thread(http_request, server.port, path, method)


def speech(stream: str, t: float) -> dict[str, Any]:
    return events.speech_start(stream, t=t, ts=TS)


async def recv_json(conn: ClientConnection) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(conn.recv(), DEADLINE_S))


# ------------------------------------------------------------------ event flow


def test_events_flow_filtered_and_stats_reach_everyone() -> None:
    async def main() -> None:
        async with running_server() as server:
            everything = await client(server)
            only_a = await client(server, "/events?stream=a")
            only_b = await client(server, "/events?stream=b")
            bus = server.bus
            bus.publish(speech("a", 1.0))
            bus.publish(speech("b", 2.0))
            bus.publish(STATS)
            bus.publish(speech("a", 3.0))
            got_all = [await recv_json(everything) for _ in range(4)]
            got_a = [await recv_json(only_a) for _ in range(3)]
            got_b = [await recv_json(only_b) for _ in range(2)]
            assert [(e["stream"], e.get("t")) for e in got_all] == [
                ("a", 1.0), ("b", 2.0), ("*", None), ("a", 3.0)
            ]
            assert [(e["stream"], e.get("t")) for e in got_a] == [("a", 1.0), ("*", None), ("a", 3.0)]
            assert [(e["stream"], e.get("t")) for e in got_b] == [("b", 2.0), ("*", None)]
            # Every event carries its bus-wide id; filtered clients see the same ids.
            assert [e["id"] for e in got_all] == [1, 2, 3, 4]
            assert [e["id"] for e in got_a] == [1, 3, 4] and [e["id"] for e in got_b] == [2, 3]
            assert {k: v for k, v in got_all[2].items() if k != "id"} == STATS
            # Nothing else is queued for b: the next message is the next matching event.
            bus.publish(speech("a", 4.0))
            bus.publish(speech("b", 5.0))
            assert (await recv_json(only_b))["t"] == 5.0
            assert server.event_clients == 3
            for conn in (everything, only_a, only_b):
                await conn.close()
            await wait_until(lambda: bus.subscribers == 0 and server.event_clients == 0)

    run(main())


def test_messages_are_text_frames_of_compact_json() -> None:
    async def main() -> None:
        async with running_server() as server:
            conn = await client(server)
            event = speech("a", 1.5)
            server.bus.publish(event)
            message = await asyncio.wait_for(conn.recv(), DEADLINE_S)
            assert isinstance(message, str)
            assert message == events.dumps({**event, "id": 1})
            await conn.close()

    run(main())


def test_slow_client_loses_oldest_events_and_fast_client_gets_all() -> None:
    total, rounds = 2000, 40
    per_round = total // rounds
    pad = "x" * 10_000  # 2000 x 10 kB = 20 MB: far more than the socket buffers hold

    async def main() -> None:
        async with running_server(client_buffer=100) as server:
            bus = server.bus
            fast = await client(server)
            (fast_sub,) = bus.subscriptions()
            # A small receive buffer and a one-message client queue: this client stops
            # reading almost at once, and the server's sends to it block.
            raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            raw.connect(("127.0.0.1", server.port))
            raw.setblocking(False)
            slow = await client(server, sock=raw, max_queue=1, max_size=None)
            (slow_sub,) = [s for s in bus.subscriptions() if s is not fast_sub]

            received_fast: list[int] = []
            seq = 0
            for _ in range(rounds):
                for _ in range(per_round):
                    bus.publish({"type": "speech", "v": 1, "stream": "a", "ts": TS, "seq": seq, "pad": pad})
                    seq += 1
                for _ in range(per_round):
                    received_fast.append((await recv_json(fast))["seq"])
            assert received_fast == list(range(total))
            assert fast_sub.dropped == 0
            assert slow_sub.dropped > 0
            assert bus.events_dropped == slow_sub.dropped

            # The slow client now reads: it gets the newest events, in order, and
            # what it got plus what was dropped for it is everything published.
            # Each loss is announced by a `gap` event whose counts match the ids skipped.
            received_slow: list[int] = []
            gaps: list[dict[str, Any]] = []
            last_id = 0
            while not received_slow or received_slow[-1] != total - 1:
                message = await recv_json(slow)
                if message["type"] == "gap":
                    assert message["reason"] == "overflow" and message["since"] == last_id
                    gaps.append(message)
                    continue
                if gaps and gaps[-1].get("checked") is None:
                    assert message["id"] == gaps[-1]["resume_from"] == last_id + gaps[-1]["lost"] + 1
                    gaps[-1]["checked"] = True
                else:
                    assert message["id"] == last_id + 1
                last_id = message["id"]
                received_slow.append(message["seq"])
            assert received_slow == sorted(received_slow)
            assert len(received_slow) + slow_sub.dropped == total
            assert len(received_slow) < total
            assert gaps and sum(g["lost"] for g in gaps) == slow_sub.dropped
            assert slow_sub.gaps == len(gaps)
            await fast.close()
            await slow.close()

    run(main())


def test_bus_drops_oldest_and_serialises_once() -> None:
    bus = EventBus()
    small = bus.subscribe(maxlen=3)
    large = bus.subscribe(maxlen=10)
    filtered = bus.subscribe("b", maxlen=10)
    for i in range(5):
        bus.publish(speech("a", float(i)))
    bus.publish(STATS)
    gap = json.loads(small.get_nowait() or b"")
    assert (gap["type"], gap["reason"], gap["lost"], gap["since"], gap["resume_from"]) == (
        "gap", "overflow", 3, 0, 4
    )
    got_small = [small.get_nowait() for _ in range(3)]
    assert small.get_nowait() is None
    assert [json.loads(p)["t"] if p and b'"t"' in p else "stats" for p in got_small] == [
        3.0, 4.0, "stats"
    ]
    assert [json.loads(p or b"")["id"] for p in got_small] == [4, 5, 6]
    assert small.dropped == 3 and large.dropped == 0 and bus.events_dropped == 3
    assert filtered.pending == 1 and json.loads(filtered.get_nowait() or b"")["type"] == "stats"
    # The same bytes object went to every subscriber.
    last_large = [large.get_nowait() for _ in range(6)][-1]
    assert last_large is got_small[-1]
    assert bus.events_published == 6
    small.close()
    assert bus.subscribers == 2
    bus.publish(STATS)
    assert small.pending == 0


def test_publish_threadsafe_delivers_on_the_loop() -> None:
    async def main() -> None:
        bus = EventBus()
        sub = bus.subscribe()
        loop = asyncio.get_running_loop()
        thread = threading.Thread(
            target=lambda: [bus.publish_threadsafe(loop, speech("a", float(i))) for i in range(3)]
        )
        thread.start()
        got = [json.loads(await asyncio.wait_for(sub.get(), DEADLINE_S))["t"] for _ in range(3)]
        thread.join()
        assert got == [0.0, 1.0, 2.0]
        sub.close()
        assert await sub.get() is None

    run(main())
    closed_loop = asyncio.new_event_loop()
    closed_loop.close()
    bus = EventBus()
    assert bus.publish_threadsafe(closed_loop, STATS) is False
    assert bus.events_dropped == 1


def test_threadsafe_handoff_is_bounded_while_the_loop_is_stalled() -> None:
    """A loop that does not run its callbacks gets at most MAX_PENDING_HANDOFF events; the rest are counted."""

    async def main() -> None:
        bus = EventBus()
        bus.MAX_PENDING_HANDOFF = 5
        sub = bus.subscribe()
        loop = asyncio.get_running_loop()
        # The loop is busy in this coroutine (no await) while the thread publishes: a stalled loop.
        def publish() -> None:
            for i in range(8):
                bus.publish_threadsafe(loop, speech("a", float(i)))

        thread = threading.Thread(target=publish)
        thread.start()
        thread.join()
        assert bus.handoff_dropped == 3 and bus.events_dropped == 3
        got = [json.loads(await asyncio.wait_for(sub.get(), DEADLINE_S))["t"] for _ in range(5)]
        assert got == [0.0, 1.0, 2.0, 3.0, 4.0]  # the oldest five, in order
        # Delivered: the handoff has room again.
        assert bus.publish_threadsafe(loop, speech("a", 9.0)) is True
        assert json.loads(await asyncio.wait_for(sub.get(), DEADLINE_S))["t"] == 9.0
        sub.close()

    run(main())


# ------------------------------------------------------------------ HTTP routes


def test_healthz_and_metrics() -> None:
    async def main() -> None:
        async with running_server() as server:
            status, headers, body = await http_get(server, "/healthz")
            assert status == 200
            assert headers["content-type"] == "application/json"
            # Open even with a token, so it says nothing about streams (the stream count is left out).
            assert json.loads(body) == {"status": "ok"}

            status, headers, body = await http_get(server, "/metrics")
            assert status == 200
            assert headers["content-type"].startswith("text/plain; version=0.0.4")
            text = body.decode()
            assert "serstream_streams 2.0\n" in text
            assert 'serstream_drops_total{cause="events"} 4.0\n' in text

    run(main())


def test_failing_health_is_500_not_a_crash() -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("nope")

    async def main() -> None:
        async with running_server(health=broken) as server:
            status, _, body = await http_get(server, "/healthz")
            assert status == 500 and b"RuntimeError" in body
            status, _, _ = await http_get(server, "/metrics")
            assert status == 200  # the server still serves

    run(main())


@pytest.fixture()
def site(tmp_path: Path) -> Path:
    root = tmp_path / "dashboard"
    (root / "sub").mkdir(parents=True)
    (root / "index.html").write_text("<h1>dash</h1>")
    (root / "app.js").write_text("console.log(1)")
    (root / "sub" / "index.html").write_text("sub page")
    (root / "big.bin").write_bytes(bytes(range(256)) * 1200)  # 300 kB
    (root / ".hidden").write_text("hidden")
    (tmp_path / "secret.txt").write_text("TOP SECRET")
    (root / "link.txt").symlink_to(tmp_path / "secret.txt")
    return root


def test_static_files(site: Path) -> None:
    async def main() -> None:
        async with running_server(dashboard_dir=site) as server:
            status, headers, body = await http_get(server, "/")
            assert (status, body) == (200, b"<h1>dash</h1>")
            assert headers["content-type"] == "text/html; charset=utf-8"
            status, headers, body = await http_get(server, "/app.js")
            assert (status, body) == (200, b"console.log(1)")
            assert headers["content-type"].startswith("text/javascript")
            assert (await http_get(server, "/sub/"))[2] == b"sub page"
            status, _, body = await http_get(server, "/big.bin")
            assert status == 200 and body == bytes(range(256)) * 1200

    run(main())


def test_not_found_forbidden_and_methods(site: Path) -> None:
    async def main() -> None:
        async with running_server(dashboard_dir=site) as server:
            assert (await http_get(server, "/nothing-here"))[0] == 404
            assert (await http_get(server, "/.hidden"))[0] == 404
            assert (await http_get(server, "/api/v2/whatever?x=1"))[0] == 404
            for path in ("/../secret.txt", "/sub/../../secret.txt", "/%2e%2e/secret.txt",
                         "/..%2fsecret.txt", "/link.txt", "/sub/..%5c..%5csecret.txt"):
                status, _, body = await http_get(server, path)
                assert status in (403, 404), path
                assert b"SECRET" not in body, path
            assert (await http_get(server, "/../secret.txt"))[0] == 403
            assert (await http_get(server, "/link.txt"))[0] == 403
            status, headers, _ = await http_get(server, "/", method="DELETE")
            assert status == 405 and headers["allow"] == "GET"
            assert (await http_get(server, "/healthz"))[0] == 200  # still serving

    run(main())


def test_no_dashboard_dir_means_404() -> None:
    async def main() -> None:
        async with running_server(dashboard_dir=None) as server:
            assert (await http_get(server, "/"))[0] == 404

    run(main())


def test_default_dashboard_is_served() -> None:
    async def main() -> None:
        async with running_server(dashboard_dir=default_dashboard_dir()) as server:
            status, _, body = await http_get(server, "/")
            assert status == 200 and b'<script src="app.js"></script>' in body
            status, headers, script = await http_get(server, "/app.js")
            assert status == 200 and b"/events" in script

    run(main())


def test_websocket_to_unknown_path_is_refused() -> None:
    async def main() -> None:
        async with running_server() as server:
            with pytest.raises(InvalidStatus) as info:
                await connect(ws_url(server, "/nope"), proxy=None)
            assert info.value.response.status_code == 404

    run(main())


# ------------------------------------------------------------------ limits and errors


def test_port_in_use_is_one_line_error() -> None:
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]

    async def main() -> None:
        server = MonitorServer(EventBus(), "127.0.0.1", port, health=dict, metrics=str)
        with pytest.raises(ServerError) as info:
            await server.start()
        assert str(info.value) == (
            f"port {port} on 127.0.0.1 is already in use; pick another with --port"
        )

    try:
        run(main())
    finally:
        holder.close()


def test_oversized_message_closes_with_1009() -> None:
    async def main() -> None:
        async with running_server(max_message_bytes=1024) as server:
            conn = await client(server)
            other = await client(server)
            await conn.send("x" * 2048)
            with pytest.raises(ConnectionClosedError) as info:
                await asyncio.wait_for(conn.recv(), DEADLINE_S)
            assert info.value.rcvd is not None and info.value.rcvd.code == 1009
            # Small messages are fine (and ignored), and the other client is unaffected.
            await other.send("hello")
            server.bus.publish(speech("a", 1.0))
            assert (await recv_json(other))["t"] == 1.0
            await wait_until(lambda: server.ignored_messages == 1)
            await other.close()

    run(main())


def test_ingest_without_handler_closes_1008() -> None:
    async def main() -> None:
        async with running_server() as server:
            conn = await client(server, "/ingest")
            with pytest.raises(ConnectionClosed) as info:
                await asyncio.wait_for(conn.recv(), DEADLINE_S)
            assert info.value.rcvd is not None
            assert info.value.rcvd.code == 1008
            assert info.value.rcvd.reason == "ingest not enabled"

    run(main())


def test_ingest_is_delegated() -> None:
    seen: list[str] = []

    async def ingest(conn: Any, request: Any) -> None:
        seen.append(request.path)
        async for message in conn:
            await conn.send(f"got {len(message)} bytes")

    async def main() -> None:
        async with running_server(ingest_handler=ingest) as server:
            conn = await client(server, "/ingest?codec=pcm_s16le&rate=8000")
            await conn.send(b"\x00" * 320)
            assert await asyncio.wait_for(conn.recv(), DEADLINE_S) == "got 320 bytes"
            await conn.close()
            await wait_until(lambda: server.ingest_clients == 0)
        assert seen == ["/ingest?codec=pcm_s16le&rate=8000"]

    run(main())


def test_close_disconnects_clients() -> None:
    async def main() -> None:
        server_cm = running_server()
        server = await server_cm.__aenter__()
        conn = await client(server)
        await server_cm.__aexit__(None, None, None)
        with pytest.raises(ConnectionClosed) as info:
            await asyncio.wait_for(conn.recv(), DEADLINE_S)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1001
        assert server.bus.subscribers == 0

    run(main())


# prometheus_text itself is tested in tests/test_metrics.py.


# ------------------------------------------------------------------ reconnect with ?since=


async def recv_until_id(conn: ClientConnection, last: int) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    while not got or got[-1].get("id") != last:
        got.append(await recv_json(conn))
    return got


def test_reconnecting_client_gets_exactly_what_it_missed_then_live() -> None:
    async def main() -> None:
        async with running_server() as server:
            bus = server.bus
            first = await client(server)
            for i in range(5):
                bus.publish(speech("a" if i % 2 else "b", float(i)))
            seen = await recv_until_id(first, 5)
            assert [e["id"] for e in seen] == [1, 2, 3, 4, 5]
            await first.close()
            await wait_until(lambda: bus.subscribers == 0)
            for i in range(5, 12):  # published while nobody listens
                bus.publish(speech("a" if i % 2 else "b", float(i)))
            again = await client(server, "/events?since=5")
            bus.publish(speech("a", 99.0))  # live, right after the replay
            got = await recv_until_id(again, 13)
            assert [e["id"] for e in got] == list(range(6, 14))  # contiguous: no gap, no duplicate
            assert [e["t"] for e in got] == [float(i) for i in range(5, 12)] + [99.0]
            assert all(e["type"] == "speech" for e in got)
            # The filtered form: only b's missed events (and stats), from the same history.
            only_b = await client(server, "/events?stream=b&since=5")
            bus.publish(STATS)
            got_b = await recv_until_id(only_b, 14)
            assert [e["id"] for e in got_b] == [7, 9, 11, 14]
            assert [e["stream"] for e in got_b] == ["b", "b", "b", "*"]
            await again.close()
            await only_b.close()

    run(main())


def test_events_older_than_the_history_become_one_gap_event() -> None:
    now = [0.0]
    bus = EventBus(history_s=10.0, clock=lambda: now[0])

    async def main() -> None:
        async with running_server(bus=bus) as server:
            for i in range(10):
                now[0] = float(i * 2)  # ids 1..10 at t = 0, 2, ..., 18
                bus.publish(speech("a", float(i)))
            conn = await client(server, "/events?since=2")  # ids 1..4 (t < 18 - 10) have left: 3 and 4 are lost
            got = await recv_until_id(conn, 10)
            gap, rest = got[0], got[1:]
            assert gap["type"] == "gap" and "id" not in gap
            assert (gap["reason"], gap["lost"], gap["since"], gap["resume_from"]) == ("history", 2, 2, 5)
            assert [e["id"] for e in rest] == list(range(5, 11))
            assert bus.gaps_sent == 1
            await conn.close()

    run(main())


def test_since_from_the_future_replays_the_history_after_a_future_gap() -> None:
    async def main() -> None:
        async with running_server() as server:
            server.bus.publish(speech("a", 1.0))
            server.bus.publish(speech("a", 2.0))
            conn = await client(server, "/events?since=900")  # e.g. the server restarted
            got = await recv_until_id(conn, 2)
            assert got[0]["type"] == "gap" and got[0]["reason"] == "future"
            assert (got[0]["lost"], got[0]["since"], got[0]["resume_from"]) == (0, 900, 1)
            assert [e["id"] for e in got[1:]] == [1, 2]
            await conn.close()

    run(main())


def test_since_from_an_earlier_run_gets_a_restart_gap_and_this_runs_events() -> None:
    async def main() -> None:
        async with running_server(bus=EventBus(first_id=2_000_001)) as server:
            server.bus.publish(speech("a", 1.0))
            server.bus.publish(speech("a", 2.0))
            conn = await client(server, "/events?since=1000057")  # seen from the previous run
            got = await recv_until_id(conn, 2_000_002)
            assert (got[0]["type"], got[0]["reason"], got[0]["lost"], got[0]["resume_from"]) == (
                "gap", "restart", 0, 2_000_001
            )
            assert [e["id"] for e in got[1:]] == [2_000_001, 2_000_002]
            await conn.close()

    run(main())


@pytest.mark.parametrize("query", ["since=abc", "since=-3", "since=", "since=1.5", "since=" + "9" * 30])
def test_garbage_since_is_refused_with_a_reason_and_counted(query: str) -> None:
    async def main() -> None:
        async with running_server() as server:
            other = await client(server)
            conn = await connect(ws_url(server, f"/events?{query}"), proxy=None)
            with pytest.raises(ConnectionClosed) as info:
                await asyncio.wait_for(conn.recv(), DEADLINE_S)
            assert info.value.rcvd is not None and info.value.rcvd.code == 1008
            assert info.value.rcvd.reason.startswith("bad since: ")
            assert server.refused_since == 1
            # The other client keeps its stream.
            server.bus.publish(speech("a", 1.0))
            assert (await recv_json(other))["t"] == 1.0
            await other.close()

    run(main())
