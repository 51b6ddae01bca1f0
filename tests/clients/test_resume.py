"""The Python client and ``serstream watch`` resume with ``?since=`` after a lost connection.

A real :class:`MonitorServer` in this process publishes numbered events; the
client's connection is cut from the server side (the TCP transport aborted, as
a network drop would) while events keep coming, and the client must yield
every id exactly once, in order, after it reconnects.
"""

from __future__ import annotations

import asyncio
from typing import Any

from serstream import client, events
from serstream.client import GapEvent, SpeechEvent
from serstream.server import EventBus, MonitorServer
from serstream.watch import WatchOptions, format_event

TS = 1_732_250_000.0


def speech(stream: str, t: float) -> dict[str, Any]:
    return events.speech_start(stream, t=t, ts=TS)


async def wait_until(condition: Any, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


def cut_every_connection(server: MonitorServer) -> int:
    assert server._server is not None
    conns = list(server._server.connections)
    for conn in conns:
        conn.transport.abort()
    return len(conns)


def test_client_resumes_after_a_dropped_connection_without_loss_or_duplicates() -> None:
    async def main() -> list[Any]:
        bus = EventBus()
        server = MonitorServer(bus, "127.0.0.1", 0, health=dict, metrics=str)
        await server.start()
        got: list[Any] = []
        try:
            async def read() -> None:
                async for event in client.events(f"ws://127.0.0.1:{server.port}/events", max_backoff_s=0.5):
                    got.append(event)
                    if event.id == 30:
                        return

            reader = asyncio.create_task(read())
            await wait_until(lambda: bus.subscribers == 1)
            for i in range(10):
                bus.publish(speech("a", float(i)))
            await wait_until(lambda: len(got) >= 10)
            (old,) = bus.subscriptions()
            assert cut_every_connection(server) == 1
            # Published in the same loop step as the cut: the dead connection's
            # buffer takes them and they are lost with it, unless the client resumes.
            for i in range(10, 20):
                bus.publish(speech("a", float(i)))
            await wait_until(lambda: bus.subscribers == 1 and old not in bus.subscriptions())
            for i in range(20, 30):
                bus.publish(speech("a", float(i)))
            await asyncio.wait_for(reader, 20)
        finally:
            await server.close()
        return got

    got = asyncio.run(main())
    assert [e.id for e in got] == list(range(1, 31))
    assert all(isinstance(e, SpeechEvent) for e in got)
    assert [e.t for e in got] == [float(i) for i in range(30)]


def test_client_reports_a_gap_when_the_history_no_longer_holds_the_outage() -> None:
    async def main() -> list[Any]:
        bus = EventBus(history_max=5)  # a tiny history: most of the outage is gone
        server = MonitorServer(bus, "127.0.0.1", 0, health=dict, metrics=str)
        await server.start()
        got: list[Any] = []
        try:
            async def read() -> None:
                async for event in client.events(f"ws://127.0.0.1:{server.port}/events", stream="a",
                                                 max_backoff_s=0.5):
                    got.append(event)
                    if event.id == 23:
                        return

            reader = asyncio.create_task(read())
            await wait_until(lambda: bus.subscribers == 1)
            bus.publish(speech("a", 0.0))
            bus.publish(speech("a", 1.0))
            await wait_until(lambda: len(got) >= 2)
            (old,) = bus.subscriptions()
            cut_every_connection(server)
            for i in range(2, 22):
                bus.publish(speech("a" if i % 2 else "b", float(i)))  # ids 3..22; 18..22 held
            await wait_until(lambda: bus.subscribers == 1 and old not in bus.subscriptions())
            bus.publish(speech("a", 99.0))  # id 23
            await asyncio.wait_for(reader, 20)
        finally:
            await server.close()
        return got

    got = asyncio.run(main())
    assert [e.id for e in got[:2]] == [1, 2]
    gap = got[2]
    assert isinstance(gap, GapEvent) and gap.id is None
    assert (gap.reason, gap.lost, gap.since, gap.resume_from) == ("history", 15, 2, 18)
    # Only stream a's held events follow (id k holds t = k - 1; a at odd t), then the live one.
    assert [(e.id, e.t) for e in got[3:]] == [(18, 17.0), (20, 19.0), (22, 21.0), (23, 99.0)]


def test_watch_prints_a_gap_as_one_line() -> None:
    gap = events.gap_event("*", reason="history", lost=15, since=2, resume_from=18, ts=TS)
    line = format_event(gap, WatchOptions())
    assert line is not None and "gap: 15 events lost after id 2" in line and "resuming at id 18" in line
    restart = format_event({**gap, "reason": "restart", "lost": 0}, WatchOptions())
    assert restart is not None and "restarted" in restart
