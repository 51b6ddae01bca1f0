"""The real microphone path: PortAudio -> sounddevice callback -> monitor, fed by PulseAudio.

A private PulseAudio daemon's null sink stands in for the microphone (see
the ``pulse_null_sink`` fixture and DEVELOPERS.md); ``paplay`` plays espeak-ng
speech into it while ``serstream listen --device pulse`` records its monitor
source. Ctrl-C (SIGINT) ends the run; it must drain and exit 0.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.audio import espeak_sentences
from tests.conftest import SENTENCES, require_tools
from tests.e2e.helpers import Background

pytestmark = pytest.mark.slow


def test_microphone_through_pulseaudio(pulse_null_sink: dict[str, str], factory_model: Path, tmp_path: Path,
                                       free_port: int) -> None:
    require_tools("espeak-ng", "sox", "paplay")
    speech = espeak_sentences(tmp_path / "mic-speech.wav", SENTENCES[:2], pause_s=0.8)
    env = pulse_null_sink
    proc = Background([
        "listen", "--model", str(factory_model), "--device", "pulse", "--json", "--port", str(free_port),
        "--duration", "60",
    ], env=env)
    try:
        proc.wait_for(lambda: proc.stderr_has("listening to"), 60, "the microphone to open")
        opened = [e for e in proc.json_events() if e["type"] == "stream" and e["state"] == "open"]
        assert opened and opened[0]["source"] == "microphone" and opened[0]["stream"] == "mic:pulse"
        # PortAudio's first callback comes 0.5-1.8 s after the stream opens; play only after it.
        time.sleep(2.0)
        played = subprocess.run(["paplay", "--device=micsink", str(speech)], env=env, timeout=60,
                                capture_output=True, text=True)
        assert played.returncode == 0, played.stderr

        def has_final() -> bool:
            return any(e["type"] == "emotion" and e["kind"] == "final" for e in proc.json_events())

        proc.wait_for(has_final, 20, "a final emotion event")
        proc.proc.send_signal(signal.SIGINT)
        code = proc.finish(timeout=30)
    finally:
        proc.kill()
    assert code == 0, "\n".join(proc.stderr)
    assert "Traceback" not in "\n".join(proc.stderr)
    events = [e for e in proc.json_events() if e["stream"] == "mic:pulse"]
    speech_states = [e["state"] for e in events if e["type"] == "speech"]
    assert "start" in speech_states and "end" in speech_states
    finals = [e for e in events if e["type"] == "emotion" and e["kind"] == "final"]
    assert len(finals) >= 1
    assert all(f["t1"] > f["t0"] for f in finals)
    # Ctrl-C closes the stream cleanly: the last event of the stream is its close.
    assert events[-1]["type"] == "stream" and events[-1]["state"] == "closed"


@pytest.mark.parametrize("rate", [0, -16000])
def test_a_rate_below_one_hz_is_refused_before_any_device_is_opened(rate: int) -> None:
    from serstream.sources.microphone import MicrophoneSource, SourceError

    with pytest.raises(SourceError, match="sample rate"):
        MicrophoneSource(monitor=None, device="no-such-device", sample_rate=rate)  # type: ignore[arg-type]
