"""The keeper of a driver-mode ``serstream cluster`` (serstream/cluster/keeper.py), without a Ray cluster.

The end-to-end case (a real head killed under the monitor) is tests/test_ray_head_loss.py; these check
the parts: which addresses get a keeper, how Ray's native log lines are told apart and dropped, how Ray's
reason is read from a driver log, and that the keeper passes the child's own exit and line through.
"""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import pytest

from serstream.cluster.keeper import (
    DRIVER_REPORT_ENV,
    exit_line,
    is_ray_native_line,
    needs_keeper,
    ray_exit_reason,
    reason_from_logs,
    relay_stderr,
)
from tests.conftest import serstream_command

# Lines as Ray 2.60's driver wrote them on this machine (tests/test_ray_head_loss.py's runs).
PUSH_FAILED = ("[2026-12-03 05:27:46,484 E 31090 31124] task_manager.cc:1545: Failed to push error to driver "
               "for task 08040b6271d07de0165660364197856235505e8e01000000")
PLASMA_GONE = ("[2026-12-03 05:33:14,322 W 1010 1146] connection.cc:216: The connection to the plasma store is "
               "failed. Terminate the process. Status: IOError: Broken pipe")
GCS_GONE = ("[2026-12-03 05:50:52,277 E 6211 6305] rpc_client.h:204: Failed to connect to GCS within 60 seconds. "
            "GCS may have been killed. It's either GCS is terminated by `ray stop` or is killed unexpectedly.")
INFO = ("[2026-12-03 05:50:52,023 I 6211 6242] task_manager.cc:1572: No retries left for task fba5a6, "
        "not going to resubmit.")


@pytest.mark.parametrize(("kind", "kept"), [("gcs", True), ("auto", True), ("client", False), ("local", False),
                                            ("invalid", False)])
def test_only_drivers_get_a_keeper(kind: str, kept: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DRIVER_REPORT_ENV, raising=False)
    assert needs_keeper(kind) is kept
    monkeypatch.setenv(DRIVER_REPORT_ENV, "/tmp/x")  # the kept child itself: no keeper of its own
    assert needs_keeper(kind) is False


def test_ray_native_lines_are_told_apart_from_ours() -> None:
    for line in (PUSH_FAILED, PLASMA_GONE, GCS_GONE, INFO, PUSH_FAILED + "\n"):
        assert is_ray_native_line(line), line
    for line in ("serstream: error: shard 0 did not start within 30 s",
                 "[file:s.wav] partial calm 0.43",
                 "[*] inference_error: no answer from the inference cluster in time",
                 "2026-12-03 05:24:58,593\tINFO scripts.py:1109 -- ray.init()"):
        assert not is_ray_native_line(line), line


def test_the_reason_is_the_last_line_that_says_why_cut_to_its_first_sentences() -> None:
    assert ray_exit_reason("\n".join([INFO, PLASMA_GONE])) == ("The connection to the plasma store is failed. "
                                                               "Terminate the process.")
    assert ray_exit_reason("\n".join([PUSH_FAILED, GCS_GONE, INFO])) == ("Failed to connect to GCS within 60 "
                                                                         "seconds. GCS may have been killed.")
    fatal = "[2026-12-03 06:00:00,000 F 1 2] core_worker.cc:10: Check failed: ok. More detail here. And more."
    assert ray_exit_reason("\n".join([GCS_GONE, fatal])) == "Check failed: ok. More detail here."
    assert ray_exit_reason("\n".join([PUSH_FAILED, INFO, "not a log line"])) is None
    assert ray_exit_reason("") is None


def test_the_line_names_the_cluster_and_ray_s_reason() -> None:
    assert exit_line("10.0.0.1:6379", "Failed to connect to GCS within 60 seconds. GCS may have been killed.") == (
        "Ray ended the monitor process: Failed to connect to GCS within 60 seconds. GCS may have been killed "
        "(the Ray head or this machine's Ray node went away: is the cluster at 10.0.0.1:6379 still up?)")
    # No reason in the driver log: exit 1 may be a traceback of serstream's own, so Ray is not blamed.
    assert exit_line("auto", None) == (
        "the monitor process ended with exit code 1 and Ray's driver log gives no reason (see the lines above; "
        "if the Ray head went away: is the cluster at auto still up?)")


def test_reason_from_logs_reads_this_pid_s_driver_log(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "python-core-driver-01000000ffff_4242.log").write_text(f"{INFO}\n{PLASMA_GONE}\n")
    (logs / "python-core-driver-02000000ffff_777.log").write_text(f"{GCS_GONE}\n")  # another driver
    report = tmp_path / "report"
    report.write_text(str(logs))
    assert reason_from_logs(report, 4242) == "The connection to the plasma store is failed. Terminate the process."
    assert reason_from_logs(report, 999) is None  # no log of that process
    assert reason_from_logs(tmp_path / "never-written", 4242) is None  # the child died before connecting


def test_the_relay_drops_ray_s_lines_unless_asked_for() -> None:
    child = "\n".join(["serstream: model 0.3.0 on cpu", PUSH_FAILED, "[file:a.wav] speech start at 0.00s",
                       PUSH_FAILED, "serstream: error: shard 0 did not start within 30 s", ""]).encode()
    quiet = io.StringIO()
    relay_stderr(io.BytesIO(child), quiet, keep_native=False)
    assert quiet.getvalue().splitlines() == ["serstream: model 0.3.0 on cpu", "[file:a.wav] speech start at 0.00s",
                                             "serstream: error: shard 0 did not start within 30 s"]
    everything = io.StringIO()
    relay_stderr(io.BytesIO(child), everything, keep_native=True)  # RAY_BACKEND_LOG_LEVEL set by the user
    assert everything.getvalue() == child.decode()


def test_the_keeper_passes_the_child_s_own_error_and_exit_code_through(tmp_path: Path) -> None:
    # A driver address, so the command runs kept; the child refuses the missing file before touching Ray.
    missing = tmp_path / "missing.wav"
    proc = subprocess.run([*serstream_command(), "cluster", "--address", "127.0.0.1:1", "--file", str(missing)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("serstream: error: ") and "missing.wav" in lines[0], lines
