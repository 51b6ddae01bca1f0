"""A live monitor with the telephony routes (/twilio, /fork), and clients written from the providers' specs.

:class:`CallServer` runs the real pieces (the factory ONNX model, the
monitor, the ``websockets`` server with the Twilio and mod_audio_fork
handlers on their paths) on a background event loop; tests drive real
sockets against it and read back every event the monitor published.

:class:`TwilioCall` writes the messages of Twilio's published Media Streams
format (``connected``, ``start``, ``media`` with string ``sequenceNumber``,
``chunk`` and ``timestamp``, base64 u-law payloads, ``dtmf``, ``mark``,
``stop``); :func:`ulaw_encode` is G.711's u-law encoder, written here from
the standard so the test's client does not borrow the server's decoder.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pytest

from serstream.core.vad import VadConfig
from serstream.inference.session import EmotionModel
from serstream.monitor import Monitor, MonitorConfig
from serstream.server import EventBus, MonitorServer, prometheus_text
from serstream.sources.fork import ForkHandler, make_fork_handler
from serstream.sources.fork_session import ForkConfig
from serstream.sources.twilio import TwilioHandler, make_twilio_handler
from serstream.sources.twilio_session import TwilioConfig
from tests.net.conftest import Collector, wait_until

__all__ = ["CallServer", "TwilioCall", "ulaw_encode", "call_model", "call_server_factory", "wait_until"]


def ulaw_encode(samples: np.ndarray) -> bytes:
    """float samples in [-1, 1] -> G.711 u-law bytes (bias 0x84, clip 32635, 8 segments, bits inverted)."""
    pcm = np.clip(np.round(np.asarray(samples, dtype=np.float64) * 32768.0), -32768, 32767).astype(np.int32)
    sign = np.where(pcm < 0, 0x80, 0x00)
    magnitude = np.minimum(np.abs(pcm), 32635) + 0x84
    exponent = np.clip(np.floor(np.log2(magnitude)).astype(np.int32) - 7, 0, 7)
    mantissa = (magnitude >> (exponent + 3)) & 0x0F
    code = ~(sign | (exponent << 4) | mantissa) & 0xFF
    return code.astype(np.uint8).tobytes()


class TwilioCall:
    """The messages Twilio sends for one Media Stream (https://www.twilio.com/docs/voice/media-streams/websocket-messages)."""

    def __init__(self, call_sid: str, tracks: Sequence[str] = ("inbound", "outbound"),
                 custom: dict[str, str] | None = None, stream_sid: str = "MZ0000000000000000000000000000000a",
                 encoding: str = "audio/x-mulaw") -> None:
        self.call_sid = call_sid
        self.stream_sid = stream_sid
        self.tracks = tuple(tracks)
        self.custom = dict(custom or {})
        self.encoding = encoding
        self._seq = 0
        self._chunks = dict.fromkeys(self.tracks, 0)

    def _next(self) -> str:
        self._seq += 1
        return str(self._seq)

    def connected(self) -> str:
        return json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"})

    def start(self) -> str:
        return json.dumps({
            "event": "start", "sequenceNumber": self._next(),
            "start": {
                "accountSid": "AC0000000000000000000000000000000a", "streamSid": self.stream_sid,
                "callSid": self.call_sid, "tracks": list(self.tracks),
                "mediaFormat": {"encoding": self.encoding, "sampleRate": 8000, "channels": 1},
                "customParameters": self.custom,
            },
            "streamSid": self.stream_sid,
        })

    def media(self, track: str, timestamp_ms: int, samples: np.ndarray) -> str:
        return self.media_bytes(track, timestamp_ms, ulaw_encode(samples))

    def media_bytes(self, track: str, timestamp_ms: int, payload: bytes) -> str:
        """A ``media`` message carrying ``payload`` (u-law bytes, base64 on the wire)."""
        self._chunks[track] = self._chunks.get(track, 0) + 1
        return json.dumps({
            "event": "media", "sequenceNumber": self._next(),
            "media": {"track": track, "chunk": str(self._chunks[track]), "timestamp": str(timestamp_ms),
                      "payload": base64.b64encode(payload).decode("ascii")},
            "streamSid": self.stream_sid,
        })

    def dtmf(self, digit: str) -> str:
        return json.dumps({"event": "dtmf", "streamSid": self.stream_sid, "sequenceNumber": self._next(),
                           "dtmf": {"track": "inbound_track", "digit": digit}})

    def mark(self, name: str) -> str:
        return json.dumps({"event": "mark", "sequenceNumber": self._next(), "streamSid": self.stream_sid,
                           "mark": {"name": name}})

    def stop(self) -> str:
        return json.dumps({"event": "stop", "sequenceNumber": self._next(), "streamSid": self.stream_sid,
                           "stop": {"accountSid": "AC0000000000000000000000000000000a", "callSid": self.call_sid}})

    def track_media(self, track: str, audio: np.ndarray, chunk_ms: int = 20, start_ms: int = 0,
                    skip: Sequence[tuple[int, int]] = ()) -> list[tuple[int, str]]:
        """(timestamp, message) for ``audio`` (8 kHz) cut into ``chunk_ms`` chunks; chunks in ``skip`` ranges unsent."""
        step = 8 * chunk_ms
        encoded = ulaw_encode(audio)  # one byte per sample: chunks are slices
        out: list[tuple[int, str]] = []
        for i in range(0, audio.shape[0], step):
            stamp = start_ms + i // 8
            if any(lo <= stamp < hi for lo, hi in skip):
                continue
            out.append((stamp, self.media_bytes(track, stamp, encoded[i:i + step])))
        return out


class CallServer:
    """Monitor + EventBus + MonitorServer with /twilio and /fork (and /ingest) on a background loop."""

    def __init__(self, model: EmotionModel, *, token: str | None = None, twilio: TwilioConfig | None = None,
                 fork: ForkConfig | None = None, monitor_config: MonitorConfig | None = None) -> None:
        self.model = model
        self.collector = Collector()
        self.token = token
        self.twilio_config = twilio or TwilioConfig(max_speed=None)
        self.fork_config = fork or ForkConfig(max_speed=None)
        self.monitor_config = monitor_config or MonitorConfig(vad=VadConfig(aggressiveness=2), stats_interval_s=0.5)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.monitor: Monitor | None = None
        self.server: MonitorServer | None = None
        self.twilio: TwilioHandler | None = None
        self.fork: ForkHandler | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="call-server", daemon=True)

    def url(self, path: str) -> str:
        assert self.server is not None
        return f"ws://127.0.0.1:{self.server.port}{path}"

    def start(self) -> CallServer:
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error
        assert self._ready.is_set(), "the call server did not start"
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

        monitor = Monitor(self.model, self.monitor_config, sink)
        self.monitor = monitor
        self.twilio = make_twilio_handler(monitor, self.twilio_config, token=self.token)
        self.fork = make_fork_handler(monitor, self.fork_config)
        self.server = MonitorServer(
            bus, "127.0.0.1", 0, health=monitor.health, metrics=lambda: prometheus_text(monitor.stats()),
            token=self.token, audio_routes={"/twilio": self.twilio, "/fork": self.fork},
        )
        await self.server.start()
        monitor.start()
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await asyncio.to_thread(monitor.stop, True)
            await self.server.close()

    def closed_streams(self) -> set[str]:
        return {e["stream"] for e in self.collector.of(type_="stream", state="closed")}


@pytest.fixture(scope="module")
def call_model(factory_model: Path) -> EmotionModel:
    return EmotionModel.load(factory_model, device="cpu", threads=1)


@pytest.fixture()
def call_server_factory(call_model: EmotionModel) -> Iterator[Any]:
    """Start CallServers with the given options; all are stopped after the test."""
    started: list[CallServer] = []

    def make(**options: Any) -> CallServer:
        server = CallServer(call_model, **options).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()
