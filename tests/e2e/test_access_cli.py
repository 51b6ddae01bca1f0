"""Access options through the real command: tokens from flag, file and environment, TLS, safe defaults.

Real ``serstream serve`` subprocesses with the factory model; clients are the
package's own Python client over real sockets; certificates come from the
openssl command.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from serstream.client import AccessDenied, IngestClient, StreamEvent, events
from tests.clients.helpers import start_monitor
from tests.test_cli import assert_one_line_error, run_cli
from tests.test_server_access import make_certificate

TOKEN = "cli-token-7f3a"


def _status(url: str, headers: dict[str, str] | None = None, context: Any = None) -> int:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_garbage_certificate_is_one_line_exit_2(tmp_path: Path, factory_model: Path) -> None:
    bad = tmp_path / "cert.pem"
    bad.write_text("this is not a certificate\n", encoding="utf-8")
    proc = run_cli("serve", "--model", str(factory_model), "--port", "0", "--tls-cert", str(bad),
                   "--tls-key", str(bad), "--duration", "1")
    assert_one_line_error(proc, str(bad), "PEM")
    proc = run_cli("serve", "--model", str(factory_model), "--port", "0", "--tls-cert", str(tmp_path / "none.pem"),
                   "--duration", "1")
    assert_one_line_error(proc, "none.pem", "no such file")
    proc = run_cli("serve", "--model", str(factory_model), "--port", "0", "--tls-key", str(bad), "--duration", "1")
    assert_one_line_error(proc, "--tls-key needs --tls-cert")


def test_token_file_errors_are_one_line(tmp_path: Path, factory_model: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n", encoding="utf-8")
    proc = run_cli("serve", "--model", str(factory_model), "--port", "0", "--token-file", str(empty))
    assert_one_line_error(proc, "is empty")
    proc = run_cli("serve", "--model", str(factory_model), "--port", "0", "--token-file", str(tmp_path / "nope"))
    assert_one_line_error(proc, "does not exist")
    proc = run_cli("serve", "--model", str(factory_model), "--port", "0", "--no-auth", "--token", "x")
    assert_one_line_error(proc, "--no-auth")
    proc = run_cli("serve", "--model", str(factory_model), "--port", "0", "--allow-origin", "app.example")
    assert_one_line_error(proc, "--allow-origin", "not an origin")


def _token_in(lines: list[str]) -> str:
    for line in lines:
        match = re.search(r"dashboard https?://\S+/#token=(\S+)", line)
        if match:
            return urllib.request.unquote(match.group(1))
    raise AssertionError("no dashboard URL with a token:\n" + "\n".join(lines))


@pytest.mark.parametrize("how", ["flag", "file", "env"])
def test_token_from_flag_file_or_environment(tmp_path: Path, factory_model: Path, free_port: int,
                                             how: str) -> None:
    args = ["serve", "--model", str(factory_model), "--port", str(free_port)]
    env = {k: v for k, v in os.environ.items() if k not in ("SERSTREAM_MODEL", "SERSTREAM_TOKEN")}
    if how == "flag":
        args += ["--token", TOKEN]
    elif how == "file":
        (tmp_path / "token").write_text(TOKEN + "\n", encoding="utf-8")
        args += ["--token-file", str(tmp_path / "token")]
    else:
        env["SERSTREAM_TOKEN"] = TOKEN
    monitor = start_monitor(args, env=env)
    try:
        assert _token_in(monitor.stderr) == TOKEN  # the printed dashboard URL is the one that works
        base = f"http://127.0.0.1:{free_port}"
        assert _status(f"{base}/metrics") == 401
        assert _status(f"{base}/metrics", {"Authorization": f"Bearer {TOKEN}"}) == 200
        assert _status(f"{base}/healthz") == 200
        # The refusal above is counted by cause in /metrics (and the stats event it renders).
        request = urllib.request.Request(f"{base}/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            metrics = response.read().decode()
        match = re.search(r'serstream_drops_total\{cause="refused_unauthorized"\} (\d+)', metrics)
        assert match and int(match.group(1)) >= 1, metrics

        async def check() -> None:
            with pytest.raises(AccessDenied):
                async for _ in events(f"ws://127.0.0.1:{free_port}/events"):
                    pass
            # The same token opens /ingest (the monitor gives it to the ingest handler too).
            async with IngestClient(f"ws://127.0.0.1:{free_port}/ingest", "t", 16000, token=TOKEN) as client:
                assert client.stream_id == "t"

        asyncio.run(asyncio.wait_for(check(), 60))
    finally:
        monitor.kill()


def _non_loopback_address() -> str | None:
    """A local address that is not loopback, if this machine has one (no packet is sent)."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))  # UDP connect picks a route; nothing is sent
        address = str(probe.getsockname()[0])
    except OSError:
        return None
    finally:
        probe.close()
    if address.startswith("127.") or address == "0.0.0.0":
        return None
    with socket.socket() as sock:
        try:
            sock.bind((address, 0))
        except OSError:
            return None
    return address


def test_non_loopback_without_token_generates_one(factory_model: Path, free_port: int) -> None:
    address = _non_loopback_address()
    if address is None:
        pytest.skip("no non-loopback local address to bind (tests/test_access.py covers the decision)")
    env = {k: v for k, v in os.environ.items() if k not in ("SERSTREAM_MODEL", "SERSTREAM_TOKEN")}
    monitor = start_monitor(["serve", "--model", str(factory_model), "--host", address, "--port", str(free_port),
                             "--quiet"], env=env)
    try:
        assert monitor.stderr_has("generated one for this run")
        token = _token_in(monitor.stderr)  # printed even with --quiet: without it nobody could connect
        assert len(token) >= 30
        base = f"http://{address}:{free_port}"
        assert _status(f"{base}/metrics") == 401
        assert _status(f"{base}/metrics", {"Authorization": f"Bearer {token}"}) == 200
    finally:
        monitor.kill()


def test_no_auth_off_loopback_warns(factory_model: Path, free_port: int) -> None:
    address = _non_loopback_address()
    if address is None:
        pytest.skip("no non-loopback local address to bind")
    monitor = start_monitor(["serve", "--model", str(factory_model), "--host", address, "--port", str(free_port),
                             "--no-auth"])
    try:
        assert monitor.stderr_has("WARNING: --no-auth")
        assert _status(f"http://{address}:{free_port}/metrics") == 200
    finally:
        monitor.kill()


def test_wss_ingest_and_events_through_the_command(tmp_path: Path, factory_model: Path, free_port: int,
                                                   speech_wav: Path) -> None:
    cert, key = make_certificate(tmp_path)
    monitor = start_monitor(["serve", "--model", str(factory_model), "--port", str(free_port), "--token", TOKEN,
                             "--tls-cert", str(cert), "--tls-key", str(key)], ready="dashboard https://")
    try:
        assert monitor.stderr_has(f"wss://127.0.0.1:{free_port}/events")

        async def check() -> list[Any]:
            seen: list[Any] = []

            async def watch() -> None:
                async for event in events(f"wss://127.0.0.1:{free_port}/events", token=TOKEN, ca_file=cert):
                    seen.append(event)
                    if isinstance(event, StreamEvent) and event.state == "closed":
                        return

            watcher = asyncio.create_task(watch())
            await asyncio.sleep(0.5)
            import soundfile as sf

            audio, rate = sf.read(str(speech_wav), dtype="float32")
            async with IngestClient(f"wss://127.0.0.1:{free_port}/ingest", "tls-call", rate, "f32le",
                                    token=TOKEN, ca_file=cert) as client:
                await client.send(audio)
                await client.end()
                async for _ in client.events():
                    pass
            await asyncio.wait_for(watcher, 60)
            return seen

        seen = asyncio.run(asyncio.wait_for(check(), 120))
        kinds = {e.type for e in seen if getattr(e, "stream", None) == "tls-call"}
        assert {"stream", "emotion"} <= kinds, kinds

        # serstream watch: a wrong token is one line and exit 2 (not retried for ever) ...
        url = f"wss://127.0.0.1:{free_port}"
        proc = run_cli("watch", url, "--ca-file", str(cert), "--token", "wrong", "--duration", "20")
        assert proc.returncode == 2 and "token" in proc.stderr and "Traceback" not in proc.stderr
        # ... no CA file: the certificate does not verify, said once ...
        proc = run_cli("watch", url, "--token", TOKEN, "--duration", "20")
        assert proc.returncode == 2 and "--ca-file" in proc.stderr and "Traceback" not in proc.stderr
        # ... and with both it prints the monitor's stats (every 5 s) from wss://.
        (tmp_path / "token").write_text(TOKEN, encoding="utf-8")
        proc = run_cli("watch", url, "--ca-file", str(cert), "--token-file", str(tmp_path / "token"), "--json",
                       "--stats", "--duration", "7")
        assert proc.returncode == 0, proc.stderr
        assert '"type":"stats"' in proc.stdout.replace(" ", "")
    finally:
        monitor.kill()
