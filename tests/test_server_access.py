"""Access rules of MonitorServer against a real server on real sockets.

Token on every endpoint but /healthz, the dashboard's cookie and subprotocol,
origin checks, caps overall and per address (clients bound to 127.0.0.2 and
127.0.0.3 stand in for other machines: every 127/8 address is loopback on
Linux), half-open connection floods, and TLS with an openssl-made certificate.
"""

from __future__ import annotations

import asyncio
import http.client
import shutil
import socket
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidMessage, InvalidStatus

from serstream import events
from serstream.access import LimitsConfig, bearer_subprotocol, dashboard_cookie_value
from serstream.client import AccessDenied, EmotionEvent, TLSFailed
from serstream.client import events as event_stream
from tests.test_server import TS, recv_json, run, running_server, wait_until

TOKEN = "correct horse/battery+staple"
BEARER = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture()
def site(tmp_path: Path) -> Path:
    root = tmp_path / "site"
    root.mkdir()
    (root / "index.html").write_text("<h1>dashboard</h1>", encoding="utf-8")
    (root / "app.js").write_text("// app", encoding="utf-8")
    return root


def http_get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


async def aget(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    return await asyncio.to_thread(http_get, port, path, headers)


async def refused_status(url: str, **kwargs: Any) -> int:
    with pytest.raises(InvalidStatus) as info:
        async with connect(url, proxy=None, open_timeout=10, **kwargs):
            pass
    return info.value.response.status_code


def emotion(stream: str = "a") -> dict[str, Any]:
    probs = {"neutral": 0.3, "calm": 0.1, "happy": 0.1, "sad": 0.1, "angry": 0.1, "fearful": 0.1,
             "disgust": 0.1, "surprised": 0.1}
    mood = {"label": "neutral", "confidence": 0.3, "probs": probs, "arousal": 0.0, "valence": 0.0,
            "dominance": 0.0}
    return events.emotion_event(stream, seq=0, kind="final", utterance=0, t0=0.0, t1=1.0, labels=list(probs),
                                probs=probs, avd=(0.0, 0.0, 0.0), smoothed=mood, latency_ms=5.0, ts=TS)


# ------------------------------------------------------------------ token


def test_token_is_required_on_every_endpoint_but_healthz(site: Path) -> None:
    reached: list[str] = []

    async def ingest(conn: Any, request: Any) -> None:
        reached.append(request.headers.get("Authorization") or "no header")
        await conn.send("hello from ingest")

    async def main() -> None:
        async with running_server(token=TOKEN, dashboard_dir=site, ingest_handler=ingest,
                                  health=lambda: {"status": "ok", "streams": 3, "model": "m"}) as server:
            port = server.port
            base = f"ws://127.0.0.1:{port}"
            # /events: no token, a wrong one, a wrong scheme, a wrong cookie: 401 at the handshake.
            assert await refused_status(f"{base}/events") == 401
            assert await refused_status(f"{base}/events", additional_headers={"Authorization": "Bearer nope"}) == 401
            assert await refused_status(f"{base}/events", additional_headers={"Authorization": "Basic eDp5"}) == 401
            assert await refused_status(f"{base}/events",
                                        additional_headers={"Cookie": f"serstream_session_{port}=x"}) == 401
            assert await refused_status(f"{base}/events", subprotocols=["serstream", bearer_subprotocol("no")]) == 401
            # /ingest: a wrong token is refused at the handshake too (none at all goes on to the hello).
            assert await refused_status(f"{base}/ingest", additional_headers={"Authorization": "Bearer no"}) == 401
            # Plain HTTP routes.
            for path in ("/metrics", "/", "/index.html", "/app.js", "/auth"):
                status, headers, body = await aget(port, path)
                assert status == 401, path
                assert headers["www-authenticate"].startswith("Bearer")
                assert b"dashboard" not in body or path in ("/", "/index.html")  # the token page, not the file
                status, _, _ = await aget(port, path, {"Authorization": "Bearer wrong"})
                assert status == 401, path
            status, headers, body = await aget(port, "/")
            assert headers["content-type"].startswith("text/html")
            assert b"needs its token" in body and b"<h1>dashboard</h1>" not in body
            # Two Authorization headers (one right): ambiguous, refused, and no 500.
            two = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            two.putrequest("GET", "/metrics")
            two.putheader("Authorization", f"Bearer {TOKEN}")
            two.putheader("Authorization", "Bearer other")
            two.endheaders()
            assert (await asyncio.to_thread(two.getresponse)).status == 401
            two.close()
            assert server.refusals["unauthorized"] == 6 + 10 + 1 + 1
            assert server.refusal_counters()["refused_unauthorized"] == 18

            # /healthz is open and says nothing about streams.
            status, _, body = await aget(port, "/healthz")
            assert status == 200 and b"streams" not in body and b'"status":"ok"' in body

            # The right token opens everything.
            assert (await aget(port, "/metrics", BEARER))[0] == 200
            assert (await aget(port, "/app.js", BEARER))[0] == 200
            async with connect(f"{base}/events", proxy=None, additional_headers=BEARER) as ws:
                await wait_until(lambda: server.bus.subscribers == 1)
                server.bus.publish(emotion())
                assert (await recv_json(ws))["type"] == "emotion"
            async with connect(f"{base}/ingest", proxy=None, additional_headers=BEARER) as ws:
                assert await ws.recv() == "hello from ingest"
            async with connect(f"{base}/ingest", proxy=None) as ws:  # token to come in the hello
                assert await ws.recv() == "hello from ingest"
            assert reached == [f"Bearer {TOKEN}", "no header"]

            # The browser way: /auth trades the bearer token for an HttpOnly SameSite=Strict cookie ...
            status, headers, _ = await aget(port, "/auth", BEARER)
            assert status == 204
            cookie = headers["set-cookie"]
            assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and TOKEN not in cookie
            value = cookie.split(";")[0]
            # Named by port: two monitors on one host do not overwrite each other's cookie.
            assert value == f"serstream_session_{port}={dashboard_cookie_value(TOKEN)}"
            status, _, body = await aget(port, "/", {"Cookie": value})
            assert status == 200 and body == b"<h1>dashboard</h1>"
            async with connect(f"{base}/events", proxy=None, additional_headers={"Cookie": value}) as ws:
                await wait_until(lambda: server.bus.subscribers == 1)
            # ... and the dashboard's WebSocket may carry the token as a subprotocol entry instead.
            async with connect(f"{base}/events", proxy=None,
                               subprotocols=["serstream", bearer_subprotocol(TOKEN)]) as ws:  # type: ignore[list-item]
                assert ws.subprotocol == "serstream"

    run(main())


def test_python_client_sends_the_token_and_reports_a_wrong_one() -> None:
    async def main() -> None:
        async with running_server(token=TOKEN) as server:
            url = f"ws://127.0.0.1:{server.port}/events"
            with pytest.raises(AccessDenied, match="token") as info:
                async for _ in event_stream(url, token="wrong"):  # reconnect on: still raised at once
                    pass
            assert info.value.status == 401

            async def first() -> Any:
                async for event in event_stream(url, token=TOKEN):
                    return event

            task = asyncio.create_task(first())
            await wait_until(lambda: server.bus.subscribers == 1)
            server.bus.publish(emotion())
            assert isinstance(await task, EmotionEvent)

    run(main())


# ------------------------------------------------------------------ origin


def test_foreign_origin_is_refused_and_counted() -> None:
    async def main() -> None:
        async with running_server(allow_origins=["https://app.example"]) as server:
            port = server.port
            url = f"ws://127.0.0.1:{port}/events"
            # Cross-site WebSocket hijacking: any page the user visits could try this.
            assert await refused_status(url, origin="https://evil.example") == 403  # type: ignore[arg-type]
            assert await refused_status(url, origin="null") == 403  # type: ignore[arg-type]
            # DNS rebinding: the page's host name now points at 127.0.0.1 (Host and Origin agree).
            rebound = {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}",
                       "Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
                       "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
            assert (await aget(port, "/events", rebound))[0] == 403
            status, _, _ = await aget(port, "/metrics", {"Origin": "https://evil.example"})
            assert status == 403
            # Two Origin headers: which one would a browser have meant? Refused.
            two = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            two.putrequest("GET", "/metrics")
            two.putheader("Origin", f"http://127.0.0.1:{port}")
            two.putheader("Origin", "https://evil.example")
            two.endheaders()
            assert (await asyncio.to_thread(two.getresponse)).status == 403
            two.close()
            assert server.refusals["forbidden_origin"] == 5
            assert server.refusal_counters()["refused_forbidden_origin"] == 5
            # The server's own origin (http or https of the Host it was reached at) and the allowlist pass.
            for origin in (f"http://127.0.0.1:{port}", f"https://127.0.0.1:{port}", "https://app.example"):
                async with connect(url, proxy=None, origin=origin) as ws:  # type: ignore[arg-type]
                    await wait_until(lambda: server.bus.subscribers == 1)
                    server.bus.publish(emotion())
                    assert (await recv_json(ws))["type"] == "emotion"
                await wait_until(lambda: server.bus.subscribers == 0)
            # A program without Origin follows the token rule (no token here: open).
            async with connect(url, proxy=None):
                pass
            assert server.refusals["forbidden_origin"] == 5

    run(main())


# ------------------------------------------------------------------ caps


async def subscriber(port: int, source: str) -> Any:
    return await connect(f"ws://127.0.0.1:{port}/events", proxy=None, local_addr=(source, 0), open_timeout=10)


def test_subscriber_caps_refuse_the_next_client_and_the_others_keep_streaming() -> None:
    async def main() -> None:
        limits = LimitsConfig(max_subscribers=3, max_subscribers_per_address=2)
        async with running_server(limits=limits) as server:
            port = server.port
            a1 = await subscriber(port, "127.0.0.1")
            a2 = await subscriber(port, "127.0.0.1")
            with pytest.raises(InvalidStatus) as info:
                await subscriber(port, "127.0.0.1")
            assert info.value.response.status_code == 503
            b1 = await subscriber(port, "127.0.0.2")
            with pytest.raises(InvalidStatus):
                await subscriber(port, "127.0.0.3")  # a fresh address, but the server is full
            assert server.refusals["too_many_subscribers_per_address"] == 1
            assert server.refusals["too_many_subscribers"] == 1
            await wait_until(lambda: server.bus.subscribers == 3)
            server.bus.publish(emotion())
            for ws in (a1, a2, b1):
                assert (await recv_json(ws))["type"] == "emotion"
            # A slot freed is a slot taken again.
            await a1.close()
            await wait_until(lambda: server.bus.subscribers == 2)
            c1 = await subscriber(port, "127.0.0.3")
            for ws in (a2, b1, c1):
                await ws.close()

    run(main())


def test_ingest_caps_per_address_and_overall() -> None:
    release = asyncio.Event()

    async def ingest(conn: Any, request: Any) -> None:
        await conn.send("in")
        await release.wait()

    async def main() -> None:
        limits = LimitsConfig(max_ingest=2, max_ingest_per_address=1)
        async with running_server(limits=limits, ingest_handler=ingest) as server:
            url = f"ws://127.0.0.1:{server.port}/ingest"
            first = await connect(url, proxy=None, local_addr=("127.0.0.1", 0))
            assert await first.recv() == "in"
            with pytest.raises(InvalidStatus):
                await connect(url, proxy=None, local_addr=("127.0.0.1", 0))
            second = await connect(url, proxy=None, local_addr=("127.0.0.2", 0))
            assert await second.recv() == "in"
            with pytest.raises(InvalidStatus):
                await connect(url, proxy=None, local_addr=("127.0.0.3", 0))
            assert server.refusals["too_many_ingest_per_address"] == 1
            assert server.refusals["too_many_ingest"] == 1
            # Subscribers are counted apart: /events still serves.
            async with connect(f"ws://127.0.0.1:{server.port}/events", proxy=None):
                pass
            release.set()
            await first.close()
            await second.close()

    run(main())


def test_half_open_flood_does_not_stop_other_clients() -> None:
    async def main() -> None:
        limits = LimitsConfig(max_handshakes_per_address=20)
        async with running_server(limits=limits, open_timeout=1.0) as server:
            port = server.port
            flood: list[socket.socket] = []
            for _ in range(60):  # connect, then say nothing: each would hold a handshake open
                sock = socket.socket()
                sock.bind(("127.0.0.1", 0))
                sock.setblocking(False)
                try:
                    sock.connect(("127.0.0.1", port))
                except BlockingIOError:
                    pass
                flood.append(sock)
            try:
                await wait_until(lambda: server.refusals["too_many_handshakes_per_address"] >= 40)
                # Meanwhile another client connects and streams.
                ws = await subscriber(port, "127.0.0.2")
                await wait_until(lambda: server.bus.subscribers == 1)
                server.bus.publish(emotion())
                assert (await recv_json(ws))["type"] == "emotion"
                # The half-open ones are dropped after open_timeout and counted.
                await wait_until(lambda: server.refusals["handshake_timeout"] >= 20)
                assert server.limits.count("handshake", "127.0.0.1") == 0
                # The flooding address can connect again once its handshakes are gone.
                again = await subscriber(port, "127.0.0.1")
                await again.close()
                await ws.close()
            finally:
                for sock in flood:
                    sock.close()

    run(main())


# ------------------------------------------------------------------ TLS


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost, made by the openssl command."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a test certificate")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "2", "-subj", "/CN=serstream test", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True, timeout=60,
    )
    return cert, key


def test_wss_end_to_end_with_the_python_client(tmp_path: Path) -> None:
    cert, key = make_certificate(tmp_path)

    async def main() -> None:
        async with running_server(token=TOKEN, tls_cert=cert, tls_key=key) as server:
            assert server.url.startswith("https://")
            url = f"wss://127.0.0.1:{server.port}/events"
            # Without the CA the certificate does not verify: one clear error, not retried.
            with pytest.raises(TLSFailed, match="ca-file|ca_file"):
                async for _ in event_stream(url, token=TOKEN):
                    pass
            # A plain ws:// client gets no WebSocket from a TLS port.
            with pytest.raises((OSError, InvalidMessage, asyncio.TimeoutError)):
                async with connect(f"ws://127.0.0.1:{server.port}/events", proxy=None, open_timeout=3):
                    pass

            async def first() -> Any:
                async for event in event_stream(url, token=TOKEN, ca_file=cert):
                    return event

            task = asyncio.create_task(first())
            await wait_until(lambda: server.bus.subscribers == 1)
            server.bus.publish(emotion("tls"))
            event = await asyncio.wait_for(task, 10)
            assert isinstance(event, EmotionEvent) and event.stream == "tls"
            # https:// serves the plain routes on the same port, token rule included.
            status, _, _ = await asyncio.to_thread(_https_get, server.port, cert, "/metrics", {})
            assert status == 401
            status, _, _ = await asyncio.to_thread(_https_get, server.port, cert, "/auth", BEARER)
            assert status == 204

    run(main())


def _https_get(port: int, ca: Path, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    context = ssl.create_default_context(cafile=str(ca))
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
    try:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def test_auth_cookie_is_secure_under_tls(tmp_path: Path) -> None:
    cert, key = make_certificate(tmp_path)

    async def main() -> None:
        async with running_server(token=TOKEN, tls_cert=cert, tls_key=key) as server:
            status, headers, _ = await asyncio.to_thread(_https_get, server.port, cert, "/auth", BEARER)
            assert status == 204 and "Secure" in headers["set-cookie"]

    run(main())


# ------------------------------------------------------------------ timeouts, compression, logging


def test_compression_is_never_negotiated() -> None:
    """A client offering permessage-deflate gets a connection without it: no compressed message can inflate."""

    async def main() -> None:
        async with running_server() as server:
            async with connect(f"ws://127.0.0.1:{server.port}/events", proxy=None, compression="deflate") as ws:
                assert ws.response is not None
                assert "Sec-WebSocket-Extensions" not in ws.response.headers
                assert ws.protocol.extensions == []

    run(main())


def test_a_client_that_never_answers_pings_is_dropped() -> None:
    """Keepalive: a peer that completes the handshake and then goes silent is closed and unsubscribed."""

    async def main() -> None:
        async with running_server(keepalive=0.3) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write((
                f"GET /events HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode())
            await writer.drain()
            assert (await reader.readline()).startswith(b"HTTP/1.1 101")
            await wait_until(lambda: server.bus.subscribers == 1)
            # Never read again, never pong: the server closes after ping interval + timeout.
            await wait_until(lambda: server.bus.subscribers == 0)
            writer.close()

    run(main())


def test_refusals_are_logged_once_per_cause(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with running_server(token=TOKEN) as server:
            for _ in range(5):
                assert (await aget(server.port, "/metrics"))[0] == 401
                assert (await aget(server.port, "/metrics", {"Origin": "https://evil.example"}))[0] == 403
            assert server.refusals["unauthorized"] == 5 and server.refusals["forbidden_origin"] == 5

    with caplog.at_level("WARNING", logger="serstream.server"):
        run(main())
    lines = [r.getMessage() for r in caplog.records if r.name == "serstream.server"]
    assert len([m for m in lines if "unauthorized" in m]) == 1, lines
    assert len([m for m in lines if "forbidden origin" in m]) == 1, lines
    assert all("counted" in m for m in lines)


def test_a_compressed_frame_is_refused_without_inflating_and_others_keep_streaming() -> None:
    """A deflate 'bomb' (a frame flagged compressed, RSV1) on a connection that negotiated no compression."""
    import os
    import struct
    import zlib

    async def main() -> None:
        async with running_server() as server:
            other = await connect(f"ws://127.0.0.1:{server.port}/events", proxy=None)
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write((
                f"GET /events HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n"
            ).encode())
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101") and b"permessage-deflate" not in head.lower()
            await wait_until(lambda: server.bus.subscribers == 2)
            # 64 MiB of zeros deflate to about 64 KiB: sent as one compressed text frame.
            bomb = zlib.compressobj(9, zlib.DEFLATED, -15)
            payload = bomb.compress(b"\0" * (64 << 20)) + bomb.flush(zlib.Z_SYNC_FLUSH)[:-4]
            mask = os.urandom(4)
            masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            writer.write(bytes([0xC1, 0xFF]) + struct.pack("!Q", len(payload)) + mask + masked)
            await writer.drain()
            # The server fails that connection (protocol error: RSV1 without the extension) ...
            closing = await asyncio.wait_for(reader.read(4), 10)
            assert closing[:1] == b"\x88" and struct.unpack("!H", closing[2:4])[0] == 1002
            writer.close()
            await wait_until(lambda: server.bus.subscribers == 1)
            # ... and the other client keeps its stream.
            server.bus.publish(emotion())
            assert (await recv_json(other))["type"] == "emotion"
            await other.close()

    run(main())
