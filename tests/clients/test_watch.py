"""``serstream watch`` against a real monitor, with no monitor, and its line formatting."""

from __future__ import annotations

import io
import json
import subprocess
import time
from pathlib import Path

import jsonschema
import pytest

from serstream import events
from serstream.watch import Printer, WatchOptions, events_url, format_event
from tests.clients.helpers import start_monitor
from tests.conftest import REPO, serstream_command
from tests.e2e.helpers import Background


def _watch(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([*serstream_command(), "watch", *args], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finish(proc: subprocess.Popen[str], timeout: float = 60) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


# --------------------------------------------------------------------------- pure formatting


def _emotion(kind: str) -> dict:
    probs = {"neutral": 0.2, "angry": 0.8}
    return {"type": "emotion", "v": 1, "stream": "mic", "ts": 1.7e9, "seq": 3, "kind": kind, "utterance": 0,
            "t0": 1.0, "t1": 3.5, "label": "angry", "confidence": 0.8, "probs": probs, "arousal": 0.7,
            "valence": -0.4, "dominance": 0.5, "latency_ms": 38.2,
            "smoothed": {"label": "angry", "confidence": 0.6, "probs": probs, "arousal": 0.5, "valence": -0.3,
                         "dominance": 0.4}}


def test_readable_lines() -> None:
    final = format_event(_emotion("final"))
    assert final is not None and "[mic] final   angry     0.80  A+0.70 V-0.40 D+0.50  1.0-3.5s" in final
    assert "mood angry 0.60" in final and final.endswith("38 ms")
    assert format_event(_emotion("partial")) is None  # partials: in place on a TTY only
    assert format_event(_emotion("partial"), WatchOptions(partials_as_lines=True)) is not None
    end = {"type": "speech", "v": 1, "stream": "mic", "ts": 1.7e9, "state": "end", "t": 3.5, "duration": 2.5,
           "reason": "silence"}
    assert format_event(end).endswith("[mic] speech end at 3.50s (2.50 s, silence)")
    error = {"type": "error", "v": 1, "stream": "rtp", "ts": 1.7e9, "code": "decode_error",
             "message": "short packet", "count": 1}
    assert format_event(error).endswith("[rtp] error decode_error: short packet (x1)")
    stats = {"type": "stats", "v": 1, "stream": "*", "ts": 1.7e9, "streams": 2, "windows_per_s": 3.0,
             "batches": {"count": 4, "mean_size": 1.5, "max_size": 2}, "queues": {}, "drops": {"events": 3},
             "latency_ms": {"p50": 30, "p95": 60, "p99": 70, "count": 9}, "device": "cpu", "uptime_s": 9.0}
    assert format_event(stats) is None
    assert "2 streams" in format_event(stats, WatchOptions(stats=True))
    # Lines come from the typed model: a malformed event (a broken monitor) is not shown, never an exception.
    assert format_event({"type": "emotion", "kind": "final", "confidence": "high"}) is None
    assert format_event({"type": "something-new"}) is None


def test_partials_redraw_one_line_in_place_on_a_terminal() -> None:
    out = io.StringIO()
    printer = Printer(out, WatchOptions(), tty=True)
    printer.show(_emotion("partial"))
    printer.show(_emotion("partial"))
    printer.show(_emotion("final"))
    text = out.getvalue()
    assert text.count("\r\x1b[2K") == 3 and text.count("\n") == 1
    assert text.endswith("38 ms\n") and "partial" not in text.rsplit("\r\x1b[2K", 1)[1]
    json_out = io.StringIO()
    Printer(json_out, WatchOptions(json_lines=True), tty=True).show(_emotion("partial"))
    assert json.loads(json_out.getvalue()) == _emotion("partial")


def test_events_url() -> None:
    assert events_url("ws://127.0.0.1:8765") == "ws://127.0.0.1:8765/events"
    assert events_url("127.0.0.1:9000") == "ws://127.0.0.1:9000/events"
    assert events_url("http://host:1/") == "ws://host:1/events"
    assert events_url("ws://host:1/events?stream=a") == "ws://host:1/events?stream=a"


# --------------------------------------------------------------------------- against a real monitor


@pytest.mark.slow
def test_watch_readable_json_and_stream_filter(
    factory_model: Path, speech_wav: Path, speech_wav_44k_stereo: Path, free_port: int
) -> None:
    monitor = Background(["listen", "--model", str(factory_model), "--file", str(speech_wav), "--file",
                          str(speech_wav_44k_stereo), "--loop", "--port", str(free_port)])
    url = f"ws://127.0.0.1:{free_port}"
    try:
        monitor.wait_for(lambda: monitor.stderr_has("dashboard http://"), 60, "the monitor to start")
        readable = _watch(url, "--duration", "9")
        raw = _watch(url, "--json", "--duration", "9")
        one = _watch(url, "--json", "--stream", "file:speech.wav", "--duration", "9")
        results = [_finish(p) for p in (readable, raw, one)]
    finally:
        monitor.kill()
    for code, _out, err in results:
        assert code == 0, err
        assert "Traceback" not in err
    (_, text, err), (_, raw_out, _), (_, one_out, _) = results
    assert "watching ws://127.0.0.1" in err
    lines = text.splitlines()
    assert any("[file:speech.wav] speech start at" in line for line in lines), text
    finals = [line for line in lines if "[file:speech.wav] final" in line]
    assert finals and all(" ms" in line for line in finals), text

    validator = jsonschema.Draft202012Validator(events.load_schema())
    every = [json.loads(line) for line in raw_out.splitlines()]
    for event in every:
        validator.validate(event)
    streams = {e["stream"] for e in every}
    assert {"file:speech.wav", "file:speech-44k.wav"} <= streams
    assert any(e["type"] == "emotion" and e["kind"] == "partial" for e in every)
    filtered = [json.loads(line) for line in one_out.splitlines()]
    assert any(e["type"] == "emotion" for e in filtered)
    assert {e["stream"] for e in filtered} <= {"file:speech.wav", "*"}


@pytest.mark.slow
def test_watch_reconnects_when_the_monitor_restarts(factory_model: Path, speech_wav: Path, free_port: int) -> None:
    args = ["listen", "--model", str(factory_model), "--file", str(speech_wav), "--loop", "--port", str(free_port)]
    monitor = start_monitor(args)
    watcher = None
    try:
        watcher = Background(["watch", f"ws://127.0.0.1:{free_port}", "--json", "--duration", "40"])
        watcher.wait_for(lambda: any('"type":"emotion"' in line for line in watcher.stdout), 30, "first events")
        monitor.kill()
        watcher.wait_for(lambda: watcher.stderr_has("disconnected from"), 15, "the disconnect notice")
        seen = len(watcher.stdout)
        monitor = start_monitor(args)
        watcher.wait_for(lambda: watcher.stderr_has("reconnected to"), 60, "the reconnect notice")
        watcher.wait_for(lambda: any('"type":"emotion"' in line for line in watcher.stdout[seen:]), 30,
                         "events after the restart")
    finally:
        monitor.kill()
        if watcher is not None:
            watcher.kill()
    assert "Traceback" not in "\n".join(watcher.stderr)


def test_watch_without_a_monitor(free_port: int) -> None:
    url = f"ws://127.0.0.1:{free_port}"  # nothing listens there
    code, out, err = _finish(_watch(url, "--no-retry"), timeout=120)
    assert code == 2 and out == ""
    (line,) = [ln for ln in err.splitlines() if "error" in ln]
    assert line.startswith("serstream: error: no serstream monitor at") and str(free_port) in line
    assert "Traceback" not in err

    started = time.monotonic()
    code, out, err = _finish(_watch(url, "--duration", "3"), timeout=120)
    assert code == 0 and out == ""
    assert time.monotonic() - started >= 2.5  # kept retrying until --duration
    assert err.count("no serstream monitor at") == 1 and "retrying" in err  # said once, not per attempt
    assert "Traceback" not in err

    code, _, err = _finish(_watch("ftp://example"), timeout=120)
    assert code == 2 and err.strip().splitlines()[-1].startswith("serstream: error:")


def test_a_pasted_dashboard_url_gives_the_events_url_and_its_token(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from serstream.watch import resolve_token, token_from_url

    pasted = "https://monitor.lan:8765/#token=a%2Fb%2Bc"
    assert events_url(pasted) == "wss://monitor.lan:8765/events"  # the fragment is not sent anywhere
    assert token_from_url(pasted) == "a/b+c"
    assert token_from_url("ws://127.0.0.1:8765") is None
    monkeypatch.delenv("SERSTREAM_TOKEN", raising=False)
    args = argparse.Namespace(url=pasted, token=None, token_file=None)
    assert resolve_token(args) == "a/b+c"
    monkeypatch.setenv("SERSTREAM_TOKEN", "from-env")
    assert resolve_token(args) == "from-env"
    assert resolve_token(argparse.Namespace(url=pasted, token="flag", token_file=None)) == "flag"


def test_roles_name_the_party_of_each_line() -> None:
    opened = {"type": "stream", "v": 1, "stream": "c:caller", "ts": 1.7e9, "state": "open", "source": "websocket",
              "codec": "pcm_s16le", "sample_rate": 8000, "channels": 1, "call": "c", "role": "caller"}
    line = format_event(opened)
    assert line is not None
    assert line.endswith("[c:caller] caller: stream open (websocket, pcm_s16le, 8000 Hz, 1 ch) (call c)")
    speech = {"type": "speech", "v": 1, "stream": "c:caller", "ts": 1.7e9, "state": "start", "t": 1.0}
    assert format_event(speech).endswith("[c:caller] speech start at 1.00s")
    out = io.StringIO()
    printer = Printer(out, WatchOptions(), tty=False)
    for event in (opened, speech, {**_emotion("final"), "stream": "c:caller", "call": "c", "role": "caller"}):
        printer.show(event)
    lines = out.getvalue().splitlines()
    # The speech event has no role of its own: the printer remembers the party from its stream event.
    assert len(lines) == 3 and all("[c:caller] caller: " in line for line in lines), lines


def test_watch_call_prints_both_parties_with_their_roles(
    factory_model: Path, speech_wav: Path, speech_wav_44k_stereo: Path, free_port: int
) -> None:
    monitor = Background(["listen", "--model", str(factory_model), "--file", str(speech_wav), "--file",
                          str(speech_wav_44k_stereo), "--split-channels", "--roles", "caller,callee", "--loop",
                          "--port", str(free_port)])
    url = f"ws://127.0.0.1:{free_port}"
    try:
        monitor.wait_for(lambda: monitor.stderr_has("dashboard http://"), 60, "the monitor to start")
        code, text, err = _finish(_watch(url, "--call", "file:speech-44k.wav", "--duration", "9", "--since", "0"))
    finally:
        monitor.kill()
    assert code == 0 and "Traceback" not in err, err
    assert "(call file:speech-44k.wav)" in err
    lines = text.splitlines()
    for role in ("caller", "callee"):
        assert any(f"[file:speech-44k.wav:{role}] {role}: final" in line for line in lines), text
        assert any(f"[file:speech-44k.wav:{role}] {role}: speech start" in line for line in lines), text
    assert not any("file:speech.wav" in line for line in lines), text
