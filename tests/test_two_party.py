"""Two-party calls end to end: a 10-minute stereo call through /ingest (split) and analyze --split-channels.

The call is made here: an 8 kHz stereo file whose left channel is the
caller and right channel the callee (espeak-ng sentences, each party its own
turns), plus one phrase both channels carry at the same instant, three times
over the ten minutes (at :data:`SHARED_AT`). Both parties' clocks must agree:
the shared phrase's final estimate starts at the same ``t0`` on both parties
(within one VAD frame, 30 ms), near where it was placed; each party's own
turns show up on that party only; and every ``stream``/``emotion`` event
names the call and the party's role.

The same file goes through the live monitor as a replay faster than real time
(a stereo ``/ingest`` client with ``roles``) and through ``serstream
analyze --split-channels --roles caller,callee``; ``serstream listen --file
--split-channels`` runs on the first minute, beside a mono file (not split).
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import numpy as np
import pytest
import soundfile as sf

from serstream import events
from serstream.client import EmotionEvent, IngestClient, StreamEvent
from serstream.inference.session import EmotionModel
from tests.audio import espeak_sentences, silence, write_wav
from tests.conftest import require_tools
from tests.e2e.helpers import Background
from tests.net.conftest import LiveServer
from tests.test_cli import run_cli

RATE = 8000
BLOCK_S = 20.0
BLOCKS = 30  # 10 minutes
CALLER_AT = 1.0  # each block: the caller speaks at +1 s, the callee at +8 s
CALLEE_AT = 8.0
SHARED_BLOCKS = (5, 17, 28)
SHARED_OFFSET = 15.0
#: Where the phrase both parties carry starts (seconds from the start of the call).
SHARED_AT = tuple(b * BLOCK_S + SHARED_OFFSET for b in SHARED_BLOCKS)
#: One VAD frame: how far apart the two parties' t0 of one instant may be.
FRAME_S = 0.030
#: How far a segment's start may sit from where its speech was placed (VAD padding, espeak's lead-in).
ONSET_S = 0.6

CALLER = ("Good morning, I am calling about my order.", "It still has not arrived.",
          "Can you check it for me please?")
CALLEE = ("Thank you for calling, how can I help?", "Let me look that up for you.",
          "I see it left the warehouse yesterday.")
SHARED = "Please hold the line."


def _clip(folder: Path, name: str, sentence: str) -> np.ndarray:
    path = espeak_sentences(folder / f"{name}.wav", [sentence], rate=RATE, pause_s=0.05)
    audio, rate = sf.read(str(path), dtype="float32")
    assert rate == RATE
    return audio


def _place(track: np.ndarray, clip: np.ndarray, at_s: float) -> None:
    start = int(round(at_s * RATE))
    track[start:start + clip.size] += clip


@pytest.fixture(scope="module")
def call_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_tools("espeak-ng", "sox")
    folder = tmp_path_factory.mktemp("call")
    caller = [_clip(folder, f"caller{i}", s) for i, s in enumerate(CALLER)]
    callee = [_clip(folder, f"callee{i}", s) for i, s in enumerate(CALLEE)]
    shared = _clip(folder, "shared", SHARED)
    for clip in (*caller, *callee, shared):
        assert clip.size / RATE < 5.5, "a sentence too long for its slot"
    left = silence(BLOCKS * BLOCK_S, RATE)
    right = silence(BLOCKS * BLOCK_S, RATE)
    for block in range(BLOCKS):
        _place(left, caller[block % len(caller)], block * BLOCK_S + CALLER_AT)
        _place(right, callee[block % len(callee)], block * BLOCK_S + CALLEE_AT)
    for at in SHARED_AT:
        _place(left, shared, at)
        _place(right, shared, at)
    return write_wav(folder / "call.wav", np.stack([left, right], axis=1), RATE)


def _finals(evs: list[dict[str, Any]], stream: str) -> list[dict[str, Any]]:
    return [e for e in evs if e.get("type") == "emotion" and e.get("kind") == "final" and e["stream"] == stream]


def _near(finals: list[dict[str, Any]], at: float) -> list[dict[str, Any]]:
    return [e for e in finals if abs(e["t0"] - at) <= ONSET_S]


def assert_parties_aligned(evs: list[dict[str, Any]], call: str, caller: str, callee: str) -> None:
    """The checks both replays share (``evs``: wire dicts of both parties' events)."""
    validator = jsonschema.Draft202012Validator(events.load_schema())
    for event in evs:
        validator.validate(event)
    for stream, role in ((caller, "caller"), (callee, "callee")):
        tagged = [e for e in evs if e["stream"] == stream and e["type"] in ("stream", "emotion")]
        assert tagged, f"no events of {stream}"
        assert {(e.get("call"), e.get("role")) for e in tagged} == {(call, role)}, stream
    caller_finals, callee_finals = _finals(evs, caller), _finals(evs, callee)
    for at in SHARED_AT:
        left, right = _near(caller_finals, at), _near(callee_finals, at)
        assert len(left) == 1 and len(right) == 1, (at, left, right)
        assert abs(left[0]["t0"] - right[0]["t0"]) <= FRAME_S + 1e-9, (at, left[0]["t0"], right[0]["t0"])
    # Each party's own turns are on that party only: the channels were not mixed.
    for block in range(BLOCKS):
        own_caller = block * BLOCK_S + CALLER_AT
        own_callee = block * BLOCK_S + CALLEE_AT
        assert _near(caller_finals, own_caller) and not _near(callee_finals, own_caller), own_caller
        assert _near(callee_finals, own_callee) and not _near(caller_finals, own_callee), own_callee


# ------------------------------------------------------------------ live: stereo /ingest, split


@pytest.fixture(scope="module")
def live(factory_model: Path) -> Iterator[LiveServer]:
    model = EmotionModel.load(factory_model, device="cpu", threads=1)
    server = LiveServer(model, max_speed=None).start()
    yield server
    server.stop()


def test_a_ten_minute_call_through_split_ingest_keeps_both_parties_on_one_clock(
    live: LiveServer, call_wav: Path
) -> None:
    audio, rate = sf.read(str(call_wav), dtype="float32", always_2d=True)
    duration = audio.shape[0] / rate

    async def replay() -> list[Any]:
        received: list[Any] = []
        client = IngestClient(live.url("/ingest"), "twoparty", rate, "s16le", roles=["caller", "callee"],
                              channels=2, max_frame_bytes=32_000)
        async with client:
            async def gather() -> None:
                async for event in client.events():
                    received.append(event)

            reader = asyncio.create_task(gather())
            for start in range(0, audio.shape[0], 4000):  # 0.5 s per message, as fast as it is taken
                await client.send(audio[start:start + 4000])
            await client.end()
            await asyncio.wait_for(reader, 120)
        return received

    started = time.monotonic()
    received = asyncio.run(replay())
    elapsed = time.monotonic() - started
    assert elapsed < duration / 2, f"a {duration:.0f} s call took {elapsed:.0f} s: not faster than real time"
    caller, callee = "twoparty:caller", "twoparty:callee"
    # The client got both parties' events on its one connection, each party's closing last.
    streams = [e for e in received if isinstance(e, StreamEvent)]
    assert {(e.stream, e.state) for e in streams} == {(caller, "open"), (callee, "open"), (caller, "closed"),
                                                      (callee, "closed")}
    assert all(e.channels == 1 and e.source == "websocket" for e in streams)
    assert {e.reason for e in streams if e.state == "closed"} == {"end of stream"}
    assert any(isinstance(e, EmotionEvent) and e.stream == callee for e in received)
    wire = [e.to_dict() for e in received if isinstance(e, (StreamEvent, EmotionEvent))]
    assert_parties_aligned(wire, "twoparty", caller, callee)
    # The monitor's own record agrees, and nothing was dropped on the way.
    assert_parties_aligned(live.collector.of(caller) + live.collector.of(callee), "twoparty", caller, callee)
    assert live.monitor is not None
    drops = live.monitor.stats()["drops"]
    assert drops["audio_samples"] == 0, drops


# ------------------------------------------------------------------ offline: analyze --split-channels


def test_analyze_split_channels_gives_each_party_its_stream_on_one_clock(
    factory_model: Path, call_wav: Path, tmp_path: Path
) -> None:
    out = tmp_path / "call.jsonl"
    proc = run_cli("analyze", "--model", str(factory_model), "--split-channels", "--roles", "caller,callee",
                   str(call_wav), "-o", str(out), timeout=600)
    assert proc.returncode == 0, proc.stderr
    evs = [json.loads(line) for line in out.read_text().splitlines()]
    base = str(call_wav)
    caller, callee = f"{base}:caller", f"{base}:callee"
    assert {e["stream"] for e in evs} == {caller, callee}
    assert_parties_aligned(evs, base, caller, callee)
    # One file summary per party.
    assert sorted(e["stream"] for e in evs if e["type"] == "file") == [callee, caller]


def test_analyze_split_leaves_mono_files_whole_and_says_so_once(
    factory_model: Path, speech_wav: Path, tmp_path: Path
) -> None:
    stereo = write_wav(tmp_path / "two.wav", np.stack([sf.read(str(speech_wav), dtype="float32")[0]] * 2, axis=1))
    proc = run_cli("analyze", "--model", str(factory_model), "--split-channels", str(speech_wav), str(stereo),
                   str(speech_wav), timeout=300)
    assert proc.returncode == 0, proc.stderr
    evs = [json.loads(line) for line in proc.stdout.splitlines()]
    assert {e["stream"] for e in evs} == {str(speech_wav), f"{speech_wav}-2", f"{stereo}:left", f"{stereo}:right"}
    mono = [e for e in evs if e["type"] == "emotion" and e["stream"] == str(speech_wav)]
    assert mono and all("call" not in e and "role" not in e for e in mono)
    notes = [line for line in proc.stderr.splitlines() if "not split" in line]
    assert len(notes) == 1 and str(speech_wav) in notes[0], proc.stderr


@pytest.mark.parametrize(("args", "fragment"), [
    (("--roles", "a,b"), "--roles needs --split-channels"),
    (("--split-channels", "--roles", "a,a"), "must differ"),
    (("--split-channels", "--roles", "a,b,c"), "3 roles (a,b,c) for 2 channels"),
])
def test_bad_split_options_are_one_line_errors(
    factory_model: Path, call_wav: Path, args: tuple[str, ...], fragment: str
) -> None:
    from tests.test_cli import assert_one_line_error

    assert_one_line_error(run_cli("analyze", "--model", str(factory_model), *args, str(call_wav)), fragment)


# ------------------------------------------------------------------ listen --file --split-channels


def test_listen_split_channels_opens_one_stream_per_party(
    factory_model: Path, call_wav: Path, speech_wav: Path, free_port: int, tmp_path: Path
) -> None:
    audio, rate = sf.read(str(call_wav), dtype="float32", frames=int(60 * RATE), always_2d=True)
    minute = write_wav(tmp_path / "minute.wav", audio, rate)
    proc = Background([
        "listen", "--model", str(factory_model), "--file", str(minute), "--file", str(speech_wav),
        "--split-channels", "--roles", "caller,callee", "--fast", "--port", str(free_port),
        "--exit-when-done", "--json",
    ])
    try:
        code = proc.finish(timeout=240)
    finally:
        proc.kill()
    assert code == 0, "\n".join(proc.stderr)
    evs = proc.json_events()
    caller, callee = "file:minute.wav:caller", "file:minute.wav:callee"
    opened = {e["stream"]: e for e in evs if e["type"] == "stream" and e["state"] == "open"}
    assert set(opened) == {caller, callee, "file:speech.wav"}
    assert (opened[caller]["call"], opened[caller]["role"]) == ("file:minute.wav", "caller")
    assert "call" not in opened["file:speech.wav"] and opened["file:speech.wav"]["channels"] == 1
    shared = [at for at in SHARED_AT if at < 55]
    for at in shared:
        left, right = _near(_finals(evs, caller), at), _near(_finals(evs, callee), at)
        assert len(left) == 1 and len(right) == 1 and abs(left[0]["t0"] - right[0]["t0"]) <= FRAME_S + 1e-9
    assert sum("not split (one channel)" in line for line in proc.stderr) == 1
    assert evs[-1]["type"] == "stats" and evs[-1]["drops"]["audio_samples"] == 0
