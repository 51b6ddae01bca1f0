"""A keeper process for a monitor that joins a Ray cluster as a driver: Ray's noise out, Ray's exit said.

A monitor started with ``--address HOST:PORT`` or ``--address auto`` is a Ray
*driver*: Ray's C++ core worker runs inside its process, tied to the Ray node
on this machine, and its logger writes to file descriptor 2, past Python's
logging. Two things follow, both seen on this machine with the head stopped
under a running monitor:

- the core worker prints ``task_manager.cc ... Failed to push error to
  driver`` twice a second until the monitor gives up, burying the one line
  that says what happened;
- when the node this driver runs on goes away, the core worker ends the
  process (``_Exit(1)``): "The connection to the plasma store is failed.
  Terminate the process." within 8 s of ``ray stop`` on a one-machine
  cluster, "Failed to connect to GCS within 60 seconds" 60 s after the head
  was killed outright. No Python code runs, and the reason is written only
  to Ray's driver log (``python-core-driver-*_<pid>.log``).

So for those addresses ``serstream cluster`` runs the monitor in a child
process. The keeper passes the child's stderr on, less the lines in Ray's
native log format (unless the user set ``RAY_BACKEND_LOG_LEVEL``: then they
asked for them). The child tells the keeper where Ray's logs are (the file
named in ``SERSTREAM_DRIVER_REPORT``) once connected. Exit 1 is not one of
serstream's own codes (0 done, 2 error): Ray ended the monitor, or a bug did
(an uncaught exception). The keeper prints one ``serstream: error:`` line
with Ray's reason from the driver log (no reason found: it says so, and
blames nobody) and exits 2. Any other code passes through. Ray Client addresses
(``ray://``) and ``local`` need no keeper: the core worker is not in the
monitor's process, or Ray's node is the monitor's own. SIGTERM and SIGHUP
sent to the keeper are passed on; a Ctrl-C reaches both (one process group)
and only the child acts on it. The keeper costs one small Python process.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import IO

#: The child writes Ray's logs folder to the file this names (set by the keeper only).
DRIVER_REPORT_ENV = "SERSTREAM_DRIVER_REPORT"

#: The exit code Ray's core worker ends a driver with; serstream's own are 0 and 2.
RAY_EXIT_CODE = 1

# "[2026-12-03 05:33:14,322 W 1010 1146] connection.cc:216: The connection to ... Terminate the process."
_NATIVE_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ ([DIWEF]) \d+ \d+\] [\w./-]+:\d+: (?P<message>.*)$")


def needs_keeper(address_kind: str) -> bool:
    """True for the address kinds whose process runs Ray's core worker (a driver), unless already kept."""
    return address_kind in ("gcs", "auto") and DRIVER_REPORT_ENV not in os.environ


def is_ray_native_line(line: str) -> bool:
    """A line of Ray's C++ logger (``[date time level pid tid] file.cc:line: message``)."""
    return _NATIVE_LINE.match(line.strip()) is not None


def ray_exit_reason(driver_log: str) -> str | None:
    """Why Ray's core worker ended the driver, from its log's text: the last line that says so, else None."""
    reason = None
    for line in driver_log.splitlines():
        match = _NATIVE_LINE.match(line.strip())
        if match is None:
            continue
        message = match.group("message").strip()
        if match.group(1) == "F" or any(cue in message for cue in _EXIT_CUES):
            reason = _first_sentences(message)
    return reason


#: What Ray's driver log says before the core worker ends the process (Ray 2.60): its node's plasma store
#: gone (``ray stop``), or the GCS unreachable for 60 s (the head killed outright).
_EXIT_CUES = ("Terminate the process", "Failed to connect to GCS")


def _first_sentences(message: str, count: int = 2) -> str:
    """Ray's reasons run on ("... Status: IOError ...", a paragraph of advice): the first sentences say it."""
    parts = re.split(r"(?<=\.)\s+", message)
    return " ".join(parts[:count])


def exit_line(address: str, reason: str | None) -> str:
    """The one line the keeper prints when the monitor ended with exit code 1.

    With a reason from Ray's driver log, Ray ended it. Without one, it may as
    well have been an error of serstream's own (Python also exits 1 on an
    uncaught exception, whose traceback is then on stderr above): say so
    rather than blame Ray.
    """
    if reason:
        return (f"Ray ended the monitor process: {reason.rstrip('.')} (the Ray head or this machine's Ray "
                f"node went away: is the cluster at {address} still up?)")
    return (f"the monitor process ended with exit code 1 and Ray's driver log gives no reason (see the lines "
            f"above; if the Ray head went away: is the cluster at {address} still up?)")


def report_logs_dir() -> None:
    """In the child: write Ray's logs folder where the keeper will look for it (best effort)."""
    report = os.environ.get(DRIVER_REPORT_ENV)
    if not report:
        return
    try:
        from ray._private import worker  # private, but the only place that names the driver's node

        node = worker._global_node
        if node is not None:
            Path(report).write_text(str(node.get_logs_dir_path()), encoding="utf-8")
    except Exception:  # noqa: BLE001 - without it the keeper's line only lacks Ray's reason
        pass


def run_kept(argv: Sequence[str], address: str) -> int:
    """Run ``serstream *argv`` as a child and wait; one line and exit 2 when Ray ends it."""
    keep_native = "RAY_BACKEND_LOG_LEVEL" in os.environ
    with tempfile.TemporaryDirectory(prefix="serstream-keeper-") as folder:
        report = Path(folder) / "ray-logs-dir"
        env = {**os.environ, DRIVER_REPORT_ENV: str(report)}
        child = subprocess.Popen([sys.executable, "-m", "serstream", *argv], env=env, stderr=subprocess.PIPE)
        assert child.stderr is not None
        relay = threading.Thread(target=relay_stderr, args=(child.stderr, sys.stderr, keep_native),
                                 name="serstream-keeper-stderr", daemon=True)
        relay.start()

        def pass_on(signum: int, _frame: FrameType | None) -> None:
            if child.poll() is None:
                child.send_signal(signum)

        previous = {sig: signal.signal(sig, pass_on) for sig in (signal.SIGTERM, signal.SIGHUP)}
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)  # the child has it too
        try:
            code = child.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        relay.join(5)
        if code < 0:
            return 128 - code  # killed by a signal: the shell's convention
        if code != RAY_EXIT_CODE:
            return code
        print(f"serstream: error: {exit_line(address, reason_from_logs(report, child.pid))}", file=sys.stderr,
              flush=True)
        return 2


def relay_stderr(source: IO[bytes], sink: IO[str], keep_native: bool) -> None:
    """The child's stderr to ours, line by line, without Ray's native log lines."""
    out = getattr(sink, "buffer", None)
    for raw in iter(source.readline, b""):
        if not keep_native and is_ray_native_line(raw.decode("utf-8", errors="replace")):
            continue
        if out is not None:
            out.write(raw)
        else:
            sink.write(raw.decode("utf-8", errors="replace"))
        sink.flush()


def reason_from_logs(report: Path, pid: int) -> str | None:
    """Ray's reason from the driver log of process ``pid``, in the logs folder named in ``report``."""
    try:
        logs = Path(report.read_text(encoding="utf-8").strip())
        log_file = next(iter(sorted(logs.glob(f"python-core-driver-*_{pid}.log"))), None)
        if log_file is None:
            return None
        with log_file.open("rb") as f:
            f.seek(max(0, log_file.stat().st_size - 64 * 1024))  # the end says why; the log can be long
            return ray_exit_reason(f.read().decode("utf-8", errors="replace"))
    except OSError:
        return None
