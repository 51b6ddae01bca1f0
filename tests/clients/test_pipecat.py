"""The Pipecat plugin (clients/pipecat) in a real Pipecat pipeline, in its own virtual environment.

``scripts/pipecat-venv.sh`` makes clients/pipecat/.venv (pipecat-ai from PyPI
and the plugin); tests/clients/pipecat_scenario.py runs there, against a real
``serstream serve`` started from this venv, or against nothing (monitor down).
The plugin's pure turn matcher (``serstream_pipecat/turns.py`` has no Pipecat
import) is also tested here directly.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from serstream.contract import LABELS
from tests.conftest import REPO, require_tools
from tests.e2e.helpers import Background

PIPECAT_VENV = REPO / "clients" / "pipecat" / ".venv"
PIPECAT_PYTHON = PIPECAT_VENV / "bin" / "python"
SCENARIO = Path(__file__).with_name("pipecat_scenario.py")
LEAD_S = TAIL_S = 0.6


def _load_turns() -> ModuleType:
    path = REPO / "clients" / "pipecat" / "src" / "serstream_pipecat" / "turns.py"
    spec = importlib.util.spec_from_file_location("serstream_pipecat_turns", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


turns = _load_turns()


# --------------------------------------------------------------------------- the pure turn matcher


def _emotion(t0: float, t1: float, kind: str, angry: float) -> dict[str, Any]:
    rest = (1.0 - angry) / 7
    probs = {label: (angry if label == "angry" else rest) for label in LABELS}
    return {"type": "emotion", "v": 1, "stream": "s", "kind": kind, "t0": t0, "t1": t1, "probs": probs,
            "arousal": angry, "valence": -angry, "dominance": 0.1}


def test_turn_settles_when_the_monitor_final_of_its_speech_arrives() -> None:
    tracker = turns.TurnTracker("s", turns.TurnConfig(settle_timeout_s=5.0))
    tracker.new_connection()
    tracker.audio(0.8)
    tracker.user_started(now=100.0)
    tracker.monitor_event({"type": "speech", "state": "start", "t": 0.6})
    tracker.audio(2.0)
    tracker.monitor_event(_emotion(0.6, 2.1, "partial", 0.3))
    tracker.user_stopped(now=101.0)
    assert tracker.due(now=101.1) == []  # the monitor is still in speech
    tracker.monitor_event({"type": "speech", "state": "end", "t": 2.4, "duration": 1.8, "reason": "silence"})
    assert tracker.due(now=101.2) == []  # its final is not there yet
    tracker.monitor_event(_emotion(0.6, 2.4, "final", 0.7))
    (reading,) = tracker.due(now=101.3)
    assert reading.final and reading.label == "angry" and reading.turn == 0
    assert reading.confidence == pytest.approx(0.7)
    assert (reading.t0, reading.t1) == (0.6, 2.4)
    assert tracker.due(now=200.0) == []  # given once


def test_turn_falls_back_to_its_partial_after_the_timeout() -> None:
    tracker = turns.TurnTracker("s", turns.TurnConfig(settle_timeout_s=1.0))
    tracker.new_connection()
    tracker.user_started(now=0.0)
    tracker.audio(1.5)
    tracker.monitor_event(_emotion(0.2, 1.2, "partial", 0.5))
    tracker.user_stopped(now=1.5)
    assert tracker.due(now=2.0) == []
    (reading,) = tracker.due(now=2.6)
    assert not reading.final and reading.estimates == 1


def test_turn_without_estimates_gives_no_reading_and_is_counted() -> None:
    tracker = turns.TurnTracker("s", turns.TurnConfig(settle_timeout_s=0.5))
    tracker.new_connection()
    tracker.user_started(now=0.0)
    tracker.audio(1.0)
    tracker.user_stopped(now=1.0)
    assert tracker.due(now=2.0) == []
    assert tracker.turns_without_reading == 1


def test_finals_are_weighted_by_duration_and_a_new_connection_restarts_the_clock() -> None:
    tracker = turns.TurnTracker("s")
    tracker.new_connection()
    tracker.audio(5.0)
    tracker.user_started(now=0.0)
    tracker.audio(4.0)
    tracker.monitor_event(_emotion(5.0, 8.0, "final", 0.9))   # 3 s of angry
    tracker.monitor_event(_emotion(8.0, 9.0, "final", 0.1))   # 1 s of not
    tracker.user_stopped(now=1.0)
    reading = tracker.current()
    assert reading is not None and reading.estimates == 2
    assert reading.probs["angry"] == pytest.approx((3 * 0.9 + 1 * 0.1) / 4)
    tracker.new_connection()
    assert tracker.clock == 0.0
    # An estimate of the new connection's clock does not land on the old turn.
    tracker.monitor_event(_emotion(6.0, 8.5, "final", 0.5))
    assert tracker.estimates_unmatched == 1


# --------------------------------------------------------------------------- the real pipeline


@pytest.fixture(scope="module")
def pipecat_python() -> Path:
    """clients/pipecat/.venv, made (or refreshed) by the project's script."""
    proc = subprocess.run(["bash", str(REPO / "scripts" / "pipecat-venv.sh")], cwd=REPO, capture_output=True,
                          text=True, timeout=1200)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        if any(s in proc.stderr for s in ("No matching distribution", "Could not find a version",
                                          "NewConnectionError", "Temporary failure in name resolution")):
            pytest.skip(f"pipecat-ai cannot be installed from PyPI here: {tail}")
        pytest.fail(f"scripts/pipecat-venv.sh failed ({proc.returncode}): {tail}")
    assert PIPECAT_PYTHON.exists()
    return PIPECAT_PYTHON


def _installed(python: Path, distribution: str) -> bool:
    code = (f"import importlib.metadata as m\ntry: m.version({distribution!r})\n"
            "except m.PackageNotFoundError: raise SystemExit(1)")
    # Run outside the checkout: its serstream.egg-info would be found through the current directory.
    return subprocess.run([str(python), "-c", code], capture_output=True, cwd="/").returncode == 0


def test_pipecat_venv_keeps_the_onnxruntimes_apart(pipecat_python: Path) -> None:
    assert _installed(pipecat_python, "pipecat-ai")
    assert _installed(pipecat_python, "serstream-pipecat")
    assert not _installed(pipecat_python, "onnxruntime-gpu")
    assert not _installed(pipecat_python, "serstream")
    main_python = REPO / ".venv" / "bin" / "python"
    assert not _installed(main_python, "pipecat-ai")
    assert not _installed(main_python, "onnxruntime")  # the plain one: only onnxruntime-gpu belongs here


@pytest.fixture(scope="module")
def turn_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One espeak-ng sentence at 24 kHz (the monitor resamples), with silence around it."""
    require_tools("espeak-ng", "sox")
    work = tmp_path_factory.mktemp("pipecat-audio")
    raw, wav = work / "raw.wav", work / "turn.wav"
    subprocess.run(["espeak-ng", "-v", "en", "-w", str(raw),
                    "I am really upset about this, nobody answers my calls."], check=True)
    subprocess.run(["sox", str(raw), "-r", "24000", "-c", "1", "-b", "16", str(wav),
                    "pad", str(LEAD_S), str(TAIL_S)], check=True)
    return wav


@pytest.fixture(scope="module")
def abrupt_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One espeak-ng sentence with silence before it and none after (the pipeline ends mid-utterance)."""
    require_tools("espeak-ng", "sox")
    work = tmp_path_factory.mktemp("pipecat-abrupt")
    raw, wav = work / "raw.wav", work / "abrupt.wav"
    subprocess.run(["espeak-ng", "-v", "en", "-w", str(raw), "I am really upset about this."], check=True)
    # Trim espeak's own trailing silence, so the monitor is still in speech when the audio stops.
    subprocess.run(["sox", str(raw), "-r", "24000", "-c", "1", "-b", "16", str(wav), "reverse", "silence", "1",
                    "0.02", "1%", "reverse", "pad", str(LEAD_S), "0"], check=True)
    return wav


def _scenario(python: Path, url: str, wav: Path, out: Path, *extra: str) -> dict[str, Any]:
    proc = subprocess.run(
        [str(python), str(SCENARIO), "--url", url, "--wav", str(wav), "--lead", str(LEAD_S),
         "--tail", str(TAIL_S), "--out", str(out), *extra],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return json.loads(out.read_text())


def _assert_passthrough(result: dict[str, Any]) -> None:
    assert result["passed"] == result["originals"]
    assert result["same_objects"], "a frame was replaced on its way through"
    assert result["system_in_order"] and result["others_in_order"], "frames were reordered"
    assert result["audio_unchanged"]


async def _ingest_refusal(port: int) -> str | None:
    """None when /ingest takes a stream; else the server's close reason."""
    try:
        async with connect(f"ws://127.0.0.1:{port}/ingest", open_timeout=10,
                           additional_headers={"Authorization": f"Bearer {TOKEN}"}) as ws:
            await ws.send(json.dumps({"type": "hello", "stream": "probe", "sample_rate": 16000,
                                      "format": "s16le", "channels": 1}))
            first = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert first["type"] == "stream" and first["state"] == "open", first
            return None
    except ConnectionClosed as exc:
        return exc.rcvd.reason if exc.rcvd is not None else "connection closed"


def _the_turns_final_emotion(result: dict) -> dict:
    """Frames passed through; exactly one EmotionFrame, final, for turn 0, after the turn and before EndFrame."""
    _assert_passthrough(result)
    sequence = [item["type"] for item in result["sequence"]]
    assert sequence.count("EmotionFrame") == 1, sequence
    # The reading comes after the turn ended, and (attached) before the transcription that follows.
    assert sequence.index("UserStoppedSpeakingFrame") < sequence.index("EmotionFrame") < sequence.index("EndFrame")
    emotion = next(item for item in result["sequence"] if item["type"] == "EmotionFrame")
    assert emotion["turn"] == 0 and emotion["final"] is True
    return emotion


TOKEN = "pipecat-test-token"


@pytest.mark.parametrize("tls", [False, True], ids=["ws-token", "wss-token"])
def test_emotion_frame_and_on_emotion_for_the_turn(
    pipecat_python: Path, factory_model: Path, turn_wav: Path, free_port: int, tmp_path: Path, tls: bool
) -> None:
    """The monitor has a token (and, for wss, an openssl-made certificate); the plugin presents both."""
    args = ["serve", "--model", str(factory_model), "--port", str(free_port), "--token", TOKEN]
    extra = ["--attach", "--token", TOKEN]
    scheme = "ws"
    if tls:
        from tests.test_server_access import make_certificate

        cert, key = make_certificate(tmp_path)
        args += ["--tls-cert", str(cert), "--tls-key", str(key)]
        extra += ["--ca-file", str(cert)]
        scheme = "wss"
    monitor = Background(args)
    try:
        monitor.wait_for(lambda: monitor.stderr_has("serving"), 60, "serstream serve to start")
        if not tls:
            refusal = asyncio.run(_ingest_refusal(free_port))
            assert refusal is None, f"`serstream serve` refused an /ingest stream: {refusal}"
        result = _scenario(pipecat_python, f"{scheme}://127.0.0.1:{free_port}", turn_wav, tmp_path / "live.json",
                           *extra)
    finally:
        monitor.kill()
    emotion = _the_turns_final_emotion(result)
    assert emotion["stream"] == "pipecat-test"
    assert set(emotion["probs"]) == set(LABELS)
    assert sum(emotion["probs"].values()) == pytest.approx(1.0, abs=0.01)
    assert emotion["label"] == max(emotion["probs"], key=emotion["probs"].get)
    assert all(-1.0 <= emotion[k] <= 1.0 for k in ("arousal", "valence", "dominance"))
    # The reading covers the speech of the turn (0.6 s of lead-in, then the sentence).
    assert emotion["t0"] < LEAD_S + 0.5 < emotion["t1"]
    (call,) = result["on_emotion"]
    assert call["processor_is_ours"] and call["id"] == emotion["id"]
    transcription = next(item for item in result["sequence"] if item["type"] == "TranscriptionFrame")
    assert transcription["metadata"]["serstream_emotion"]["label"] == emotion["label"]
    assert result["counters"]["connects"] == 1 and result["counters"]["readings"] == 1
    assert result["warnings"] == []


def test_a_turn_cut_off_by_end_frame_still_gets_its_final_reading(
    pipecat_python: Path, factory_model: Path, abrupt_wav: Path, free_port: int, tmp_path: Path
) -> None:
    """EndFrame right after the turn's last audio: the plugin ends the ingest stream, so the
    monitor closes the open utterance and sends its final estimate before the pipeline stops."""
    monitor = Background(["serve", "--model", str(factory_model), "--port", str(free_port)])
    try:
        monitor.wait_for(lambda: monitor.stderr_has("serving"), 60, "serstream serve to start")
        result = _scenario(pipecat_python, f"ws://127.0.0.1:{free_port}", abrupt_wav, tmp_path / "abrupt.json",
                           "--abrupt")
        monitor.wait_for(lambda: monitor.stderr_has("end of stream"), 10, "the monitor to close the stream")
    finally:
        monitor.kill()
    emotion = _the_turns_final_emotion(result)
    assert emotion["t0"] < LEAD_S + 0.5 < emotion["t1"]
    (call,) = result["on_emotion"]
    assert call["id"] == emotion["id"]
    # Ending the stream on purpose is not an outage: nothing is logged as a warning.
    assert result["warnings"] == []
    assert result["counters"]["connects"] == 1 and result["counters"]["disconnects"] == 0


def test_pipeline_runs_to_completion_with_the_monitor_down(
    pipecat_python: Path, turn_wav: Path, free_port: int, tmp_path: Path
) -> None:
    # Nothing listens on free_port: every connection attempt is refused.
    result = _scenario(pipecat_python, f"ws://127.0.0.1:{free_port}", turn_wav, tmp_path / "down.json",
                       "--speed", "2")
    _assert_passthrough(result)
    sequence = [item["type"] for item in result["sequence"]]
    assert sequence[-1] == "EndFrame" and "EmotionFrame" not in sequence
    assert result["on_emotion"] == []
    transcription = next(item for item in result["sequence"] if item["type"] == "TranscriptionFrame")
    assert transcription["metadata"] == {}  # attach_to_transcription is off by default
    # Logged once, however many retries; the audio that could not be analysed is counted.
    (warning,) = result["warnings"]
    assert "cannot reach the monitor" in warning and str(free_port) in warning
    assert result["counters"]["connect_failures"] >= 1
    assert result["counters"]["audio_not_analysed_s"] > 5.0


def test_bad_and_newer_monitor_messages_are_logged_once_and_the_pipeline_goes_on(
    pipecat_python: Path, tmp_path: Path
) -> None:
    out = tmp_path / "bad.json"
    proc = subprocess.run([str(pipecat_python), str(Path(__file__).with_name("pipecat_bad_monitor.py")),
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["passed"] == result["originals"] and result["ended"]
    (hello,) = result["hellos"]
    assert hello["type"] == "hello" and hello["sample_rate"] == 16000 and hello["format"] == "s16le"
    counters = result["counters"]
    assert counters["malformed_messages"] == 8  # four kinds, each sent twice
    assert counters["monitor_errors"] == 3
    assert counters["connect_failures"] == 0 and counters["audio_sent_s"] > 0.5
    warnings = result["warnings"]
    # One line per kind of trouble, however often it happens.
    assert len(warnings) == 3, warnings
    assert sum("malformed" in w for w in warnings) == 1
    assert sum("schema v2" in w for w in warnings) == 1
    assert sum("inference_error" in w and "the worker failed" in w for w in warnings) == 1
    assert "ws://HOST:PORT" in result["wrong_url"] and "http://127.0.0.1:8765" in result["wrong_url"]
