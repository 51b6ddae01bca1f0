"""The Ray head going away under ``serstream cluster``: one line, exit 2, no Ray noise.

A real head started with ``ray start --head`` (its own temp dir and process
group, CPU only), the monitor connected as a driver (``HOST:PORT``), one
file stream of espeak-ng speech, with and without a pipeline shard. After the
first final the whole head's process group is killed (GCS, raylet, the shard
and replica workers: the head machine gone). Ray's core worker may end the
monitor process itself (a driver whose node went away); the keeper process
(``serstream/cluster/keeper.py``) then says so with Ray's reason. Or, with a
shard, the monitor's own handling gets there first: the lost stream
reported, the shard not restartable within 30 s. Either way: exit code 2 and
one ``serstream: error:`` line, without Ray's C++ logger lines
(``task_manager.cc ... Failed to push error to driver``, twice a second
before) or a traceback. About 70 s a case on the 2-core machine.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("ray", reason='needs Ray (pip install "serstream[ray]"; the test extra brings it)')

from tests.conftest import serstream_command  # noqa: E402

pytestmark = pytest.mark.slow

RAY_NATIVE_LOG = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIWEF] \d+ \d+\]")


@pytest.mark.parametrize("shards", [0, 1])
def test_the_head_going_away_is_one_line_and_exit_2(speech_wav: Path, shards: int) -> None:
    gcs_port, client_port, http_port = _free_ports(3)
    # Short: Ray's unix socket paths live under it and must stay under 108 bytes.
    temp_dir = tempfile.mkdtemp(prefix="rhl", dir="/tmp")
    # The head and the monitor share a token of their own: `ray start` turns token authentication on only
    # where a token already exists (~/.ray/auth_token, left by any earlier local Ray), so without this the
    # test depended on what had run on the machine before it.
    auth = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    head = subprocess.run(
        [_ray_cli(), "start", "--head", "--port", str(gcs_port), "--num-cpus", "3", "--include-dashboard=false",
         "--ray-client-server-port", str(client_port), "--temp-dir", temp_dir, "--disable-usage-stats"],
        capture_output=True, text=True, timeout=180, start_new_session=True, env=auth,
    )
    # `ray start` leads its own session; the head's daemons stay in its process group after it returns.
    head_group = _group_of(temp_dir)
    monitor: subprocess.Popen[str] | None = None
    try:
        assert head.returncode == 0, head.stdout + head.stderr
        assert head_group is not None, "no process of the head found"
        env = dict(auth)
        env.pop("RAY_BACKEND_LOG_LEVEL", None)
        monitor = subprocess.Popen(
            [*serstream_command(), "cluster", "--address", f"127.0.0.1:{gcs_port}", "--replicas", "1",
             "--shards", str(shards), "--file", str(speech_wav), "--loop", "--json", "--port", str(http_port),
             "--request-timeout", "5"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        events: list[dict[str, Any]] = []
        stderr_lines: list[str] = []
        first_final = threading.Event()

        def read_events() -> None:
            assert monitor is not None and monitor.stdout is not None
            for line in monitor.stdout:
                event = json.loads(line)
                events.append(event)
                if event.get("type") == "emotion" and event.get("kind") == "final":
                    first_final.set()

        def read_stderr() -> None:
            assert monitor is not None and monitor.stderr is not None
            stderr_lines.extend(line.rstrip("\n") for line in monitor.stderr)

        readers = [threading.Thread(target=read_events, daemon=True), threading.Thread(target=read_stderr, daemon=True)]
        for reader in readers:
            reader.start()
        assert first_final.wait(150), f"no final before the head was stopped: {stderr_lines[-5:]}"

        os.killpg(head_group, signal.SIGKILL)
        killed = time.monotonic()
        rc = monitor.wait(timeout=150)
        took = time.monotonic() - killed
        for reader in readers:
            reader.join(10)

        assert rc == 2, stderr_lines
        ours = [line for line in stderr_lines if not line.startswith("[file:")]  # the console's event lines
        assert not [line for line in ours if RAY_NATIVE_LOG.match(line)], ours
        assert not [line for line in ours if "Traceback" in line], ours
        assert sum(line.startswith("serstream: error:") for line in ours) == 1, ours
        last = ours[-1]
        if last.startswith("serstream: error: Ray ended the monitor process: "):
            assert f"is the cluster at 127.0.0.1:{gcs_port} still up?" in last, last
            # Ray's own words, from its driver log: killed outright, the GCS is missed for 60 s first.
            assert "Failed to connect to GCS within 60 seconds" in last or "plasma store" in last, last
        else:
            assert shards and last.startswith("serstream: error: shard 0 "), ours
            lost = [e for e in events if e.get("type") == "error" and e.get("code") == "worker_lost"]
            assert lost and lost[0]["stream"] == f"file:{speech_wav.name}", events[-5:]
        assert took < 100, took
    finally:
        if monitor is not None and monitor.poll() is None:
            monitor.kill()
            monitor.wait(10)
        if head_group is not None:
            try:
                os.killpg(head_group, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)


def _ray_cli() -> str:
    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.exists() else (shutil.which("ray") or "ray")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def _group_of(temp_dir: str) -> int | None:
    """The process group of the head's GCS server (the one whose command line names our temp dir)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "gcs_server" in cmdline and temp_dir in cmdline:
            return os.getpgid(int(entry.name))
    return None
