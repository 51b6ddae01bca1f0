"""Shared fixtures: the factory model, speech WAVs, a free port, a PulseAudio microphone stand-in.

Every fixture makes real things (an ONNX file, espeak-ng speech, a running
PulseAudio daemon); a test that needs a tool the machine lacks is skipped with
the tool's name, never faked.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.audio import espeak_sentences, have_tools, speech_with_pauses, write_wav
from tests.modelfactory import build_test_model

#: Sentences for the end-to-end tests: each becomes one utterance, pauses between them.
SENTENCES = (
    "Good morning, I would like to check on my order please.",
    "This is the third time I have called today and nobody has helped me!",
    "Thank you, that is all.",
)

REPO = Path(__file__).resolve().parent.parent


def serstream_command() -> list[str]:
    """How tests run the CLI: the venv's interpreter with ``-m serstream``."""
    return [sys.executable, "-m", "serstream"]


def require_tools(*names: str) -> None:
    """Skip the calling test when any of the named executables is missing."""
    missing = have_tools(*names)
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (install with scripts/install-system-deps.sh --test)")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def factory_model(model_dir: Path) -> Path:
    """A small contract-conforming ONNX model without state inputs."""
    return build_test_model(model_dir / "factory.onnx")


@pytest.fixture(scope="session")
def state_model(model_dir: Path) -> Path:
    """The factory model with a ``speaker_stats`` state input and ``frame_stats`` update output."""
    return build_test_model(model_dir / "factory-state.onnx", with_state=True)


@pytest.fixture(scope="session")
def audio_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("audio")


@pytest.fixture(scope="session")
def speech_wav(audio_dir: Path) -> Path:
    """espeak-ng speech: three sentences with one-second pauses, 16 kHz mono."""
    require_tools("espeak-ng", "sox")
    return espeak_sentences(audio_dir / "speech.wav", SENTENCES)


@pytest.fixture(scope="session")
def speech_wav_44k_stereo(audio_dir: Path) -> Path:
    """The same kind of speech at 44.1 kHz stereo (exercises resampling and down-mixing)."""
    require_tools("espeak-ng", "sox")
    return espeak_sentences(audio_dir / "speech-44k.wav", SENTENCES[:2], rate=44100, channels=2)


@pytest.fixture(scope="session")
def synthetic_wav(audio_dir: Path) -> Path:
    """Speech-like synthetic audio with two utterances (no external tool needed)."""
    return write_wav(audio_dir / "synthetic.wav", speech_with_pauses())


@pytest.fixture(scope="session")
def corrupt_wav(audio_dir: Path) -> Path:
    """A file named .wav whose content is not audio."""
    path = audio_dir / "corrupt.wav"
    path.write_bytes(b"RIFF\x10\x00\x00\x00WAVEthis is not a wave file at all" * 4)
    return path


@pytest.fixture()
def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _pulse_env(root: Path) -> dict[str, str]:
    runtime = root / "run"
    home = root / "home"
    runtime.mkdir(mode=0o700, exist_ok=True)
    home.mkdir(exist_ok=True)
    env = dict(os.environ)
    env.update(
        {
            "HOME": str(home),
            "XDG_RUNTIME_DIR": str(runtime),
            "PULSE_RUNTIME_PATH": str(runtime / "pulse"),
        }
    )
    # A stray PULSE_SERVER would point clients at some other daemon.
    env.pop("PULSE_SERVER", None)
    return env


def _wait_gone(pid: int, timeout: float) -> None:
    """Wait for the daemon we started to exit; kill it (by its pid) if it does not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


@pytest.fixture()
def pulse_null_sink() -> Iterator[dict[str, str]]:
    """A private PulseAudio daemon whose null sink ``micsink`` stands in for a microphone.

    Yields the environment that makes PortAudio (through ALSA's ``pulse``
    device) and ``paplay``/``pactl`` talk to it; the default source is
    ``micsink.monitor``, so what is played to ``micsink`` is what is "heard".
    Recipe documented in DEVELOPERS.md, "Microphone stand-in for tests".
    """
    require_tools("pulseaudio", "pactl", "paplay")
    # Unix socket paths are limited to 108 bytes: keep the runtime dir short.
    root = Path(tempfile.mkdtemp(prefix="serpa-"))
    env = _pulse_env(root)
    cmd = [
        "pulseaudio",
        "-D",
        "--exit-idle-time=-1",
        "--system=false",
        "-n",
        "--disallow-exit",
        "--log-target=file:" + str(root / "pulseaudio.log"),
        "--load=module-native-protocol-unix",
        "--load=module-null-sink sink_name=micsink rate=16000 channels=1",
    ]
    pid: int | None = None
    try:
        subprocess.run(cmd, env=env, check=True, timeout=20, capture_output=True)
        deadline = time.monotonic() + 10
        while subprocess.run(["pactl", "info"], env=env, capture_output=True).returncode != 0:
            if time.monotonic() > deadline:
                log = (root / "pulseaudio.log").read_text(errors="replace")[-2000:]
                pytest.fail(f"pulseaudio did not come up; log tail:\n{log}")
            time.sleep(0.1)
        pid_text = (root / "run" / "pulse" / "pid").read_text().strip()
        pid = int(pid_text) if pid_text.isdigit() else None
        subprocess.run(["pactl", "set-default-source", "micsink.monitor"], env=env, check=True)
        yield env
    finally:
        subprocess.run(["pulseaudio", "--kill"], env=env, capture_output=True, timeout=20)
        if pid is not None:
            _wait_gone(pid, 5.0)
        shutil.rmtree(root, ignore_errors=True)


def ensure_ray_address_folder() -> None:
    """Create ``<system temp>/ray`` (Ray's default), where Ray 2.60's test ``Cluster`` records its address.

    ``ray.cluster_utils.Cluster`` writes ``ray_current_cluster`` there even when its nodes get their own
    temp dirs, and does not create the folder: on a machine where Ray never ran before, the fixture failed
    with FileNotFoundError (seen on a fresh CI machine).
    """
    from ray._common.utils import get_default_ray_temp_dir

    os.makedirs(get_default_ray_temp_dir(), exist_ok=True)
