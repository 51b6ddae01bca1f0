"""The LiveKit Agents plugin (clients/livekit) in a running livekit-agents AgentSession, in its own venv.

``scripts/livekit-venv.sh`` makes clients/livekit/.venv (livekit-agents from
PyPI and the plugin); tests/clients/livekit_scenario.py runs there, against a
real ``serstream serve`` started from this venv, or against nothing (monitor
down). No LiveKit server can run here (none is installed and nothing may be
fetched at run time), so there is no room: the scenario starts a real
``AgentSession`` with its audio input set to frames made from espeak-ng
speech, and the session itself calls the agent's ``stt_node`` (where the
plugin's ``tap`` sits), moves the user state and calls
``on_user_turn_completed``; only the STT is a stand-in (speech from the audio
level). The plugin's pure helpers (``serstream_livekit/pure.py`` imports no
LiveKit) are tested here directly.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from serstream_client.turns import EmotionReading

from serstream.contract import LABELS
from tests.audio import espeak_sentences
from tests.clients.helpers import start_monitor
from tests.conftest import REPO, require_tools

LIVEKIT_VENV = REPO / "clients" / "livekit" / ".venv"
LIVEKIT_PYTHON = LIVEKIT_VENV / "bin" / "python"
SCENARIO = Path(__file__).with_name("livekit_scenario.py")
PAUSE_S = 0.6  # silence before and after the sentence


def _load_pure() -> ModuleType:
    path = REPO / "clients" / "livekit" / "src" / "serstream_livekit" / "pure.py"
    spec = importlib.util.spec_from_file_location("serstream_livekit_pure", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


pure = _load_pure()


# --------------------------------------------------------------------------- the pure helpers


def test_user_state_changes_open_and_close_turns() -> None:
    assert pure.user_state_edge("listening", "speaking") == "start"
    assert pure.user_state_edge("away", "speaking") == "start"
    assert pure.user_state_edge("speaking", "listening") == "stop"
    assert pure.user_state_edge("speaking", "away") == "stop"
    assert pure.user_state_edge("listening", "away") is None
    assert pure.user_state_edge("speaking", "speaking") is None


def _reading(turn: int, t0: float, t1: float, angry: float, final: bool = True) -> EmotionReading:
    probs = {"angry": angry, "neutral": 1.0 - angry}
    label = max(probs, key=lambda k: probs[k])
    return EmotionReading(stream="s", turn=turn, label=label, confidence=probs[label], probs=probs,
                          arousal=angry, valence=-angry, dominance=0.0, t0=t0, t1=t1, estimates=2, final=final)


def test_speech_spans_of_one_turn_combine_weighted_by_duration() -> None:
    assert pure.combine_readings([]) is None
    one = _reading(0, 1.0, 2.0, 0.9)
    assert pure.combine_readings([one]) is one
    combined = pure.combine_readings([_reading(3, 1.0, 4.0, 0.9), _reading(4, 5.0, 6.0, 0.1, final=False)])
    assert combined.probs["angry"] == pytest.approx((3 * 0.9 + 1 * 0.1) / 4)
    assert combined.label == "angry" and combined.confidence == pytest.approx(combined.probs["angry"])
    assert combined.arousal == pytest.approx((3 * 0.9 + 1 * 0.1) / 4)
    assert (combined.turn, combined.t0, combined.t1, combined.estimates) == (3, 1.0, 6.0, 4)
    assert combined.final is False  # one part had only a partial


def test_pcm_seconds_and_ingest_url() -> None:
    assert pure.pcm_seconds(48_000 * 2 * 2, 48_000, 2) == pytest.approx(1.0)
    assert pure.pcm_seconds(960, 24_000, 1) == pytest.approx(0.02)
    assert pure.pcm_seconds(960, 0, 1) == 0.0 and pure.pcm_seconds(960, 16_000, 0) == 0.0
    assert pure.ingest_url("ws://127.0.0.1:8765") == "ws://127.0.0.1:8765/ingest"
    assert pure.ingest_url("wss://h:1/custom?x=1") == "wss://h:1/custom?x=1"
    with pytest.raises(ValueError, match="ws://HOST:PORT"):
        pure.ingest_url("http://127.0.0.1:8765")


# --------------------------------------------------------------------------- with livekit-agents


@pytest.fixture(scope="module")
def livekit_python() -> Path:
    """clients/livekit/.venv, made (or refreshed) by the project's script."""
    proc = subprocess.run(["bash", str(REPO / "scripts" / "livekit-venv.sh")], cwd=REPO, capture_output=True,
                          text=True, timeout=1200)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        if any(s in proc.stderr for s in ("No matching distribution", "Could not find a version",
                                          "NewConnectionError", "Temporary failure in name resolution")):
            pytest.skip(f"livekit-agents cannot be installed from PyPI here: {tail}")
        pytest.fail(f"scripts/livekit-venv.sh failed ({proc.returncode}): {tail}")
    assert LIVEKIT_PYTHON.exists()
    return LIVEKIT_PYTHON


def _installed(python: Path, distribution: str) -> bool:
    code = (f"import importlib.metadata as m\ntry: m.version({distribution!r})\n"
            "except m.PackageNotFoundError: raise SystemExit(1)")
    # Run outside the checkout: its serstream.egg-info would be found through the current directory.
    return subprocess.run([str(python), "-c", code], capture_output=True, cwd="/").returncode == 0


def test_livekit_venv_has_the_plugin_and_not_the_monitor(livekit_python: Path) -> None:
    assert _installed(livekit_python, "livekit-agents")
    assert _installed(livekit_python, "serstream-livekit")
    assert _installed(livekit_python, "serstream-client")
    assert not _installed(livekit_python, "serstream")
    assert not _installed(livekit_python, "onnxruntime-gpu")
    assert not _installed(REPO / ".venv" / "bin" / "python", "livekit-agents")


@pytest.fixture(scope="module")
def turn_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One espeak-ng sentence at 24 kHz (LiveKit's usual input rate), with silence around it."""
    require_tools("espeak-ng", "sox")
    path = tmp_path_factory.mktemp("livekit-audio") / "turn.wav"
    return espeak_sentences(path, ["I am really upset about this, nobody answers my calls."], rate=24_000,
                            pause_s=PAUSE_S)


@pytest.fixture(scope="module")
def abrupt_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One espeak-ng sentence at 24 kHz with silence before it and none after (the session ends mid-utterance)."""
    require_tools("espeak-ng", "sox")
    work = tmp_path_factory.mktemp("livekit-abrupt")
    raw, wav = work / "raw.wav", work / "abrupt.wav"
    subprocess.run(["espeak-ng", "-v", "en", "-w", str(raw), "I am really upset about this."], check=True)
    # Trim espeak's own trailing silence, so the monitor is still in speech when the audio stops.
    subprocess.run(["sox", str(raw), "-r", "24000", "-c", "1", "-b", "16", str(wav), "reverse", "silence", "1",
                    "0.02", "1%", "reverse", "pad", str(PAUSE_S), "0"], check=True)
    return wav


def _scenario(python: Path, url: str, wav: Path, out: Path, *extra: str, timeout: float = 150) -> dict[str, Any]:
    proc = subprocess.run(
        [str(python), str(SCENARIO), "--url", url, "--wav", str(wav), "--lead", str(PAUSE_S),
         "--tail", str(PAUSE_S), "--out", str(out), *extra],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return json.loads(out.read_text())


def _assert_frames_untouched(result: dict[str, Any]) -> None:
    """The agent's stt_node got every frame the session gave the tap: the same objects, in order, same bytes."""
    assert result["sent"] > 100
    # The session passes the scenario's own frames to the stt_node (and its flush silence at close).
    assert result["sent_reached_tap"] == result["sent"], "the session lost frames before the tap"
    assert result["tap_out"] == result["tap_in"] >= result["sent"]
    assert result["same_objects"], "a frame was replaced, lost or reordered on its way through the tap"
    assert result["bytes_unchanged"], "a frame's audio changed"
    assert result["closed"], "the session's close event did not close the plugin"


def _assert_reading_of_the_turn(reading: dict[str, Any], turn_s: float) -> None:
    assert reading["final"] is True
    assert set(reading["probs"]) == set(LABELS)
    assert sum(reading["probs"].values()) == pytest.approx(1.0, abs=0.01)
    assert reading["label"] == max(reading["probs"], key=reading["probs"].get)
    assert all(-1.0 <= reading[k] <= 1.0 for k in ("arousal", "valence", "dominance"))
    # It covers the sentence: the monitor heard speech from about the end of the lead-in,
    # and nothing beyond the audio of the turn.
    assert 0.0 <= reading["t0"] < PAUSE_S + 0.5 < reading["t1"] <= turn_s + 0.5


TOKEN = "livekit-test-token"


@pytest.mark.parametrize("tls", [False, True], ids=["ws-token", "wss-token"])
def test_a_reading_per_turn_in_the_callback_latest_and_the_user_message(
    livekit_python: Path, factory_model: Path, turn_wav: Path, free_port: int, tmp_path: Path, tls: bool
) -> None:
    """The monitor has a token (and, for wss, an openssl-made certificate); the plugin presents both."""
    args = ["serve", "--model", str(factory_model), "--port", str(free_port), "--token", TOKEN]
    extra = ["--token", TOKEN]
    scheme = "ws"
    if tls:
        from tests.test_server_access import make_certificate

        cert, key = make_certificate(tmp_path)
        args += ["--tls-cert", str(cert), "--tls-key", str(key)]
        extra += ["--ca-file", str(cert)]
        scheme = "wss"
    monitor = start_monitor(args)
    try:
        result = _scenario(livekit_python, f"{scheme}://127.0.0.1:{free_port}", turn_wav, tmp_path / "live.json",
                           *extra)
    finally:
        monitor.kill()
    _assert_frames_untouched(result)
    (reading,) = result["readings"]
    assert reading["turn"] == 0 and reading["stream"] == "livekit-test"
    _assert_reading_of_the_turn(reading, result["turn_s"])
    assert result["latest"] == reading
    # on_user_turn_completed got it into the user message, for the LLM.
    # The session's own turn handling: the user spoke, stopped, and on_user_turn_completed put
    # the reading into the user message, for the LLM.
    assert result["user_states"] == ["speaking", "listening"]
    (annotated,) = result["annotated"]
    assert annotated["extra"][result["metadata_key"]] == reading
    assert annotated["text"] == "turn 0"  # the message's content is left as it was
    assert result["counters"]["connects"] == 1 and result["counters"]["readings"] == 1
    # Only the frames that came while the first connection was opening (it opens on the first frame).
    assert result["counters"]["audio_not_analysed_s"] < 1.0
    assert result["warnings"] == []


def test_a_turn_cut_off_by_the_session_closing_still_gets_its_reading(
    livekit_python: Path, factory_model: Path, abrupt_wav: Path, free_port: int, tmp_path: Path
) -> None:
    """The session closes right after the user's last word: the turn still gets its final reading.

    On close the session pushes its own flush (2 s of silence) through the stt_node, hence the tap; on
    the session's close event the plugin then ends its ingest stream and waits for the monitor's last
    events, so the monitor records an end of stream and the turn's final arrives before the plugin stops.
    """
    monitor = start_monitor(["serve", "--model", str(factory_model), "--port", str(free_port)])
    try:
        result = _scenario(livekit_python, f"ws://127.0.0.1:{free_port}", abrupt_wav, tmp_path / "abrupt.json",
                           "--abrupt")
        monitor.wait_for(lambda: monitor.stderr_has("end of stream"), 10, "the monitor to close the stream")
    finally:
        monitor.kill()
    _assert_frames_untouched(result)
    (reading,) = result["readings"]
    assert reading["turn"] == 0 and reading["final"] is True
    assert reading["t0"] < PAUSE_S + 0.5 < reading["t1"]
    assert result["latest"] == reading
    assert result["annotated"] == []  # the session never completed the turn
    # Ending the stream on purpose is not an outage: nothing is logged as a warning.
    assert result["warnings"] == []
    assert result["counters"]["connects"] == 1 and result["counters"]["disconnects"] == 0


def test_agent_runs_unaffected_with_the_monitor_down(
    livekit_python: Path, turn_wav: Path, free_port: int, tmp_path: Path
) -> None:
    # Nothing listens on free_port: every connection attempt is refused.
    result = _scenario(livekit_python, f"ws://127.0.0.1:{free_port}", turn_wav, tmp_path / "down.json",
                       "--speed", "2")
    _assert_frames_untouched(result)
    assert result["readings"] == [] and result["latest"] is None
    (annotated,) = result["annotated"]
    assert annotated["extra"] == {}
    assert annotated["waited_s"] < 0.5, "annotate held the agent up although no reading could come"
    # Logged once, however many retries; the audio that could not be analysed is counted.
    (warning,) = result["warnings"]
    assert "cannot reach the monitor" in warning and str(free_port) in warning
    assert result["counters"]["connect_failures"] >= 3
    assert result["counters"]["audio_not_analysed_s"] > 4.0


def test_monitor_killed_between_turns_the_plugin_reconnects(
    livekit_python: Path, factory_model: Path, turn_wav: Path, free_port: int, tmp_path: Path
) -> None:
    """The monitor dies after the first turn and comes back: the second turn gets its reading too.

    A callback that raises is registered as well: it is logged once and the others still run.
    """
    sync = tmp_path / "sync"
    sync.mkdir()
    args = ["serve", "--model", str(factory_model), "--port", str(free_port)]
    monitor = start_monitor(args)
    proc = subprocess.Popen(
        [str(livekit_python), str(SCENARIO), "--url", f"ws://127.0.0.1:{free_port}", "--wav", str(turn_wav),
         "--lead", str(PAUSE_S), "--tail", str(PAUSE_S), "--out", str(tmp_path / "again.json"),
         "--turns", "2", "--sync-dir", str(sync), "--bad-callback"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 90
        while not (sync / "phase1").exists():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the first turn never completed"
            time.sleep(0.1)
        monitor.kill()
        time.sleep(1.0)  # the plugin notices, logs and retries against nothing
        monitor = start_monitor(args)
        (sync / "resume").write_text("go")
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        monitor.kill()
    assert proc.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    result = json.loads((tmp_path / "again.json").read_text())
    _assert_frames_untouched(result)
    first, second = result["readings"]
    assert (first["turn"], second["turn"]) == (0, 1)
    _assert_reading_of_the_turn(first, result["turn_s"])
    assert second["final"] is True and second["t1"] > second["t0"]
    assert [a["extra"][result["metadata_key"]]["turn"] for a in result["annotated"]] == [0, 1]
    assert [a["text"] for a in result["annotated"]] == ["turn 0", "turn 1"]
    counters = result["counters"]
    assert counters["connects"] == 2 and counters["disconnects"] >= 1
    assert counters["readings"] == 2 and counters["callback_errors"] == 2
    warnings = result["warnings"]
    assert sum("lost the connection" in w for w in warnings) == 1, warnings
    assert sum("callback broken failed" in w for w in warnings) == 1, warnings
    assert len(warnings) == 2, warnings


def test_bad_settings_are_one_clear_error_and_odd_input_is_counted_never_raised(
    livekit_python: Path, free_port: int, tmp_path: Path
) -> None:
    out = tmp_path / "inputs.json"
    proc = subprocess.run([str(livekit_python), str(Path(__file__).with_name("livekit_inputs.py")),
                           "--port", str(free_port), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert "ws://HOST:PORT" in result["bad_url"] and "http://127.0.0.1:8765" in result["bad_url"]
    assert result["unknown_setting"] == "SerstreamEmotion: unknown setting(s) colour"
    assert result["bad_ca_file"].startswith("serstream ca_file:") and "/nonexistent/ca.pem" in result["bad_ca_file"]
    # Outside an event loop: counted as not analysed, one line on stderr.
    assert result["outside_loop"]["audio_not_analysed_s"] == pytest.approx(0.02)
    assert proc.stderr.count("outside the agent's event loop") == 1
    # The odd item went through the tap like the frames; it was counted, not sent.
    assert result["passed_through"] and result["closed"]
    counters = result["counters"]
    assert counters["not_audio"] == 1 and counters["frames"] == 2
    assert counters["turns"] == 1 and counters["turns_without_reading"] == 1 and counters["readings"] == 0
    assert result["annotate"] is None
    (warning,) = result["warnings"]
    assert "cannot reach the monitor" in warning


def test_annotate_waits_for_a_late_final_and_bad_monitor_messages_are_logged_once(
    livekit_python: Path, tmp_path: Path
) -> None:
    """A scripted monitor (livekit_fake_monitor.py): two speech spans of one turn, the second's final late."""
    out = tmp_path / "fake.json"
    proc = subprocess.run([str(livekit_python), str(Path(__file__).with_name("livekit_fake_monitor.py")),
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    (hello,) = result["hellos"]
    assert (hello["sample_rate"], hello["channels"], hello["format"]) == (24_000, 2, "s16le")
    assert result["received_bytes"] == result["pushed_bytes"] > 0  # every frame sent while connected arrived
    # The monitor renamed the stream; the readings carry its name.
    assert result["stream_id"] == "lk-fake-2"
    first, second = result["readings"]
    assert first["turn"] == 0 and first["t1"] - first["t0"] == pytest.approx(1.0)
    assert second["turn"] == 1 and second["t1"] - second["t0"] == pytest.approx(1.0)
    # annotate waited for the second span's final (sent 0.6 s after the turn ended), not for its 3 s limit,
    # and gave one reading for both spans, weighted by duration (1 s each).
    assert 0.5 <= result["waited_s"] < 2.5
    annotated = result["annotated"]
    assert annotated["estimates"] == 2 and annotated["final"] is True
    assert annotated["probs"]["angry"] == pytest.approx((0.9 + 0.3) / 2)
    assert (annotated["t0"], annotated["t1"]) == (first["t0"], second["t1"])
    assert result["extra"]["serstream_emotion"] == annotated and result["text"] == "I am upset"
    counters = result["counters"]
    assert counters["malformed_messages"] == 4 and counters["monitor_errors"] == 3
    # One line per kind of trouble, however often it happens.
    warnings = result["warnings"]
    assert len(warnings) == 3, warnings
    assert sum("malformed" in w for w in warnings) == 1
    assert sum("schema v2" in w for w in warnings) == 1
    assert sum("inference_error" in w and "the worker failed" in w for w in warnings) == 1
