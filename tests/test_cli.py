"""The command line as a user meets it: real subprocesses, real files, real sockets.

Every error a user can cause must end with exit code 2 and exactly one line
on stderr starting with ``serstream: error:`` (never a traceback).
"""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

from tests.conftest import serstream_command
from tests.modelfactory import build_broken_model

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    if env is None:
        # Hermetic: a model named in the caller's environment must not leak in.
        env = {k: v for k, v in os.environ.items() if k != "SERSTREAM_MODEL"}
    return subprocess.run(
        [*serstream_command(), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *fragments: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith("serstream: error: "), line
    for fragment in fragments:
        assert fragment in line, line
    return line


def test_missing_model_file(synthetic_wav: Path) -> None:
    proc = run_cli("listen", "--model", "/nonexistent/model.onnx", "--file", str(synthetic_wav))
    assert_one_line_error(proc, "/nonexistent/model.onnx", "--model")


def test_model_from_environment_that_does_not_exist(synthetic_wav: Path) -> None:
    env = dict(os.environ, SERSTREAM_MODEL="/nonexistent/env-model.onnx")
    proc = run_cli("analyze", str(synthetic_wav), env=env)
    assert_one_line_error(proc, "/nonexistent/env-model.onnx", "SERSTREAM_MODEL")


@pytest.mark.parametrize("problem", ["missing_output", "wrong_labels", "unknown_input"])
def test_model_breaking_the_contract(tmp_path: Path, synthetic_wav: Path, problem: str) -> None:
    model = build_broken_model(tmp_path / f"{problem}.onnx", problem)
    proc = run_cli("listen", "--model", str(model), "--file", str(synthetic_wav), "--exit-when-done")
    assert_one_line_error(proc, str(model))


def test_model_that_is_not_onnx(tmp_path: Path, synthetic_wav: Path) -> None:
    model = tmp_path / "junk.onnx"
    model.write_text("this is not a model\n" * 10)
    proc = run_cli("analyze", "--model", str(model), str(synthetic_wav))
    assert_one_line_error(proc, "junk.onnx")


def test_missing_audio_file(factory_model: Path) -> None:
    proc = run_cli("listen", "--model", str(factory_model), "--file", "/nonexistent/speech.wav")
    assert_one_line_error(proc, "not found", "/nonexistent/speech.wav")


def test_corrupt_audio_file(factory_model: Path, corrupt_wav: Path) -> None:
    proc = run_cli("listen", "--model", str(factory_model), "--file", str(corrupt_wav), "--exit-when-done")
    assert_one_line_error(proc, "cannot read audio file", str(corrupt_wav))


def test_port_in_use(factory_model: Path, synthetic_wav: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = run_cli("listen", "--model", str(factory_model), "--file", str(synthetic_wav),
                       "--port", str(port), "--exit-when-done")
    assert_one_line_error(proc, f"port {port}", "in use")


def test_bad_arguments_are_one_line(factory_model: Path) -> None:
    assert_one_line_error(run_cli("listen", "--no-such-option"), "--no-such-option")
    assert_one_line_error(run_cli("listen", "--vad-aggressiveness", "7"), "aggressiveness")
    # 0 used to mean "the device's default rate" without a word
    assert_one_line_error(run_cli("listen", "--sample-rate", "0"), "--sample-rate", "positive integer")
    assert_one_line_error(run_cli("listen", "--channels", "two"), "--channels", "'two'")
    assert_one_line_error(run_cli("analyze", "--model", str(factory_model)), "FILE")
    assert_one_line_error(run_cli("analyze", "--csv", "/nonexistent/list.csv"), "list.csv")


def test_rtp_option_reaches_the_rtp_source(factory_model: Path) -> None:
    """--rtp is handed to serstream/sources/rtp.py when it is there, else explained in one line."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        udp_port = probe.getsockname()[1]
    args = ["listen", "--model", str(factory_model), "--rtp", f"127.0.0.1:{udp_port}", "--duration", "0.5",
            "--port", "0"]
    proc = run_cli(*args)
    if not (REPO / "serstream" / "sources" / "rtp.py").exists():
        assert_one_line_error(proc, "issue 3")
        return
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    # A UDP port already taken is the RTP source's one-line error, through the CLI.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        busy = taken.getsockname()[1]
        proc = run_cli("listen", "--model", str(factory_model), "--rtp", f"127.0.0.1:{busy}", "--no-rtcp",
                       "--duration", "0.5", "--port", "0")
    assert_one_line_error(proc, str(busy))


def test_devices_and_bad_device_with_pulseaudio(pulse_null_sink: dict[str, str], factory_model: Path) -> None:
    proc = run_cli("devices", env=pulse_null_sink)
    assert proc.returncode == 0, proc.stderr
    assert "pulse" in proc.stdout
    assert "default rate" in proc.stdout
    bad = run_cli("listen", "--model", str(factory_model), "--device", "no-such-microphone", "--duration", "1",
                  env=pulse_null_sink)
    line = assert_one_line_error(bad, "no-such-microphone", "input devices:")
    assert "pulse" in line
    bad_index = run_cli("listen", "--model", str(factory_model), "--device", "99", "--duration", "1",
                        env=pulse_null_sink)
    assert_one_line_error(bad_index, "index 99", "pulse")


def test_no_audio_device_at_all(factory_model: Path, tmp_path: Path) -> None:
    """No sound server and no sound card: one line that says so."""
    env = dict(os.environ)
    # An empty runtime dir and no ALSA card: PortAudio finds no input device.
    env.update(XDG_RUNTIME_DIR=str(tmp_path), PULSE_RUNTIME_PATH=str(tmp_path / "none"), HOME=str(tmp_path),
               PULSE_SERVER="unix:" + str(tmp_path / "no-such-socket"))
    if Path("/dev/snd").exists():
        pytest.skip("this machine has sound hardware; the no-device case cannot be produced")
    proc = run_cli("listen", "--model", str(factory_model), "--duration", "1", env=env)
    assert_one_line_error(proc, "no audio input device")
