"""Fixtures of the network tests: a live monitor + WebSocket server on a thread of its own.

:class:`LiveServer` runs the real pieces (the factory ONNX model in ONNX
Runtime, the monitor, the ``websockets`` server with the ingest handler, and
optionally an :class:`~serstream.sources.rtp.RtpSource`) on a background event
loop, so a test can drive real clients and real sockets against it and read
back every event the monitor published.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from serstream.core.vad import VadConfig
from serstream.inference.session import EmotionModel
from serstream.monitor import Monitor, MonitorConfig
from serstream.server import EventBus, MonitorServer, prometheus_text
from serstream.sources.ingest import IngestHandler, make_ingest_handler
from serstream.sources.rtp import RtpSource, RtpSourceConfig


class Collector:
    """A thread-safe sink that keeps every event the monitor published."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def __call__(self, event: dict[str, Any]) -> None:
        with self._lock:
            self.events.append(event)

    def of(self, stream: str | None = None, type_: str | None = None, **fields: Any) -> list[dict[str, Any]]:
        with self._lock:
            return [
                e for e in self.events
                if (stream is None or e["stream"] == stream) and (type_ is None or e["type"] == type_)
                and all(e.get(k) == v for k, v in fields.items())
            ]


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` until true; fail the test with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


class LiveServer:
    """Monitor + EventBus + MonitorServer (+ ingest handler, + RTP source) on a background loop."""

    def __init__(
        self,
        model: EmotionModel,
        *,
        token: str | None = None,
        max_frame_bytes: int = 1 << 20,
        max_streams: int = 64,
        max_speed: float | None = 8.0,
        rtp: RtpSourceConfig | None = None,
        rtp_map: dict[int, Any] | None = None,
        monitor_config: MonitorConfig | None = None,
    ) -> None:
        self.model = model
        self.collector = Collector()
        self._token = token
        self._max_frame_bytes = max_frame_bytes
        self._max_streams = max_streams
        self._max_speed = max_speed
        self._rtp_config = rtp
        self._rtp_map = rtp_map
        self._monitor_config = monitor_config or MonitorConfig(vad=VadConfig(aggressiveness=2), stats_interval_s=0.5)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.monitor: Monitor | None = None
        self.server: MonitorServer | None = None
        self.handler: IngestHandler | None = None
        self.rtp: RtpSource | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="live-server", daemon=True)

    def url(self, path: str) -> str:
        assert self.server is not None
        return f"ws://127.0.0.1:{self.server.port}{path}"

    def start(self) -> LiveServer:
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error
        assert self._ready.is_set(), "the live server did not start"
        return self

    def stop(self) -> None:
        if self.loop is not None and self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        self.loop = loop
        self._stop = asyncio.Event()
        bus = EventBus()
        collector = self.collector

        def sink(event: dict[str, Any]) -> None:
            collector(event)
            bus.publish_threadsafe(loop, event)

        monitor = Monitor(self.model, self._monitor_config, sink)
        self.monitor = monitor
        self.handler = make_ingest_handler(
            monitor, bus=bus, token=self._token, max_frame_bytes=self._max_frame_bytes,
            max_streams=self._max_streams, max_speed=self._max_speed,
        )
        self.server = MonitorServer(
            bus, "127.0.0.1", 0, health=monitor.health, metrics=lambda: prometheus_text(monitor.stats()),
            max_message_bytes=self._max_frame_bytes, ingest_handler=self.handler,
        )
        await self.server.start()
        monitor.start()
        if self._rtp_config is not None:
            self.rtp = RtpSource(monitor, "127.0.0.1", 0, self._rtp_map, self._rtp_config)
            self.rtp.start()
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            if self.rtp is not None:
                await asyncio.to_thread(self.rtp.stop)
            await asyncio.to_thread(monitor.stop, True)
            await self.server.close()


@pytest.fixture(scope="module")
def model(factory_model: Path) -> EmotionModel:
    return EmotionModel.load(factory_model, device="cpu", threads=1)


@pytest.fixture()
def live_server_factory(model: EmotionModel) -> Iterator[Callable[..., LiveServer]]:
    """Start LiveServers with the given options; all are stopped after the test."""
    started: list[LiveServer] = []

    def make(**options: Any) -> LiveServer:
        server = LiveServer(model, **options).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()
