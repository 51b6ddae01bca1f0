"""FreeSWITCH mod_audio_fork on /fork: the pure session, then a real server with mono, mixed and stereo calls.

The client does what mod_audio_fork does (drachtio-freeswitch-modules,
modules/mod_audio_fork/README.md): it connects offering the subprotocol
``audio.drachtio.org``, sends the metadata as its first text frame, then
binary frames of 16-bit little-endian PCM, channels interleaved for stereo
(caller first), 20 ms each, and closes the socket when the call ends.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Subprotocol

from serstream.sources.fork import query_of
from serstream.sources.fork_session import (
    SUBPROTOCOL,
    ForkConfig,
    ForkSession,
    OpenCall,
    PartyAudio,
    Refuse,
    Rejected,
    Stop,
    parse_rate,
)
from tests.audio import espeak_sentences, silence, voiced
from tests.callserver import CallServer, call_model, call_server_factory, wait_until
from tests.conftest import require_tools

__all__ = ["call_model", "call_server_factory"]  # fixtures used here

TOKEN = "fork-s3cret"


def l16(*channels: np.ndarray) -> bytes:
    """Interleaved signed 16-bit little-endian PCM (FreeSWITCH's native L16 on x86 and ARM)."""
    stacked = np.stack(channels, axis=1) if len(channels) > 1 else channels[0][:, None]
    return (np.clip(stacked, -1, 1) * 32767).astype("<i2").tobytes()


def frames_of(pcm: bytes, channels: int, rate: int, ms: int = 20) -> list[bytes]:
    step = 2 * channels * rate * ms // 1000
    return [pcm[i:i + step] for i in range(0, len(pcm), step)]


# ---------------------------------------------------------------- the pure session


def test_parse_rate_accepts_the_modules_spellings() -> None:
    assert [parse_rate(v) for v in ("8k", "16k", "16000", 24000, " 32K ")] == [8000, 16000, 16000, 24000, 32000]
    assert [parse_rate(v) for v in ("fast", "4k", 100, True, "16000.0", None)] == [None] * 6


def test_query_wins_over_metadata_and_the_rest_becomes_params() -> None:
    session = ForkSession(ForkConfig(), 0.0, query={"mix": "stereo", "rate": "16k"})
    meta = {"mix": "mono", "sampleRate": 8000, "callId": "abc-1", "caller": "1000", "n": 5}
    (opened,) = session.receive(json.dumps(meta), 0.0)
    assert isinstance(opened, OpenCall)
    assert (opened.call, opened.mix, opened.sample_rate) == ("abc-1", "stereo", 16000)
    assert [(p.stream_id, p.role) for p in opened.parties] == [("fork:abc-1:caller", "caller"),
                                                              ("fork:abc-1:callee", "callee")]
    assert dict(opened.params) == {"callId": "abc-1", "caller": "1000", "n": "5"}


@pytest.mark.parametrize("mix, parties", [
    ("mono", [("fork:c1", "caller")]),
    ("mixed", [("fork:c1", None)]),
    ("stereo", [("fork:c1:caller", "caller"), ("fork:c1:callee", "callee")]),
])
def test_each_mix_makes_its_parties_and_splits_channels(mix: str, parties: list[tuple[str, str | None]]) -> None:
    session = ForkSession(ForkConfig(), 0.0, query={"call": "c1"})
    (opened,) = session.receive(json.dumps({"mix": mix, "sampleRate": 8000}), 0.0)
    assert isinstance(opened, OpenCall) and [(p.stream_id, p.role) for p in opened.parties] == parties
    left, right = voiced(0.02, 8000), voiced(0.02, 8000, f0=200.0, seed=3)
    frame = l16(left, right) if mix == "stereo" else l16(left)
    (audio,) = session.receive(frame, 0.1)
    assert isinstance(audio, PartyAudio) and len(audio.channels) == len(parties)
    assert np.allclose(audio.channels[0], left, atol=1e-4)
    if mix == "stereo":
        assert np.allclose(audio.channels[1], right, atol=1e-4)


def test_audio_without_metadata_uses_the_query_and_a_fallback_call_id() -> None:
    session = ForkSession(ForkConfig(), 0.0, query={"rate": "16000"}, fallback_call="call-7")
    decisions = session.receive(l16(voiced(0.02, 16000)), 0.0)
    assert isinstance(decisions[0], OpenCall) and isinstance(decisions[1], PartyAudio)
    assert decisions[0].parties[0].stream_id == "fork:call-7" and decisions[0].sample_rate == 16000
    assert session.counts["no_metadata_text"] == 1


def test_free_text_metadata_is_kept_as_a_param() -> None:
    session = ForkSession(ForkConfig(), 0.0)
    (opened,) = session.receive("{'caller':'1000'}", 0.0)  # the README's single-quoted example is not JSON
    assert isinstance(opened, OpenCall) and opened.params == {"metadata": "{'caller':'1000'}"}
    assert (opened.mix, opened.sample_rate) == ("mono", 8000) and session.counts["metadata_not_json"] == 1


@pytest.mark.parametrize("query, meta, cause", [
    ({"mix": "quad"}, {}, "bad_format"),
    ({"rate": "11k"}, {}, "bad_format"),
    ({}, {"sampleRate": "lots"}, "bad_format"),
    ({"call": "bad id!"}, {}, "bad_metadata"),
])
def test_bad_format_refuses_the_call(query: dict[str, str], meta: dict[str, Any], cause: str) -> None:
    session = ForkSession(ForkConfig(), 0.0, query=query)
    (refused,) = session.receive(json.dumps(meta), 0.0)
    assert isinstance(refused, Refuse) and refused.cause == cause and session.stopped
    assert "\n" not in refused.reason


def test_bad_frames_are_counted_and_reported_once_text_is_counted() -> None:
    session = ForkSession(ForkConfig(max_frame_bytes=4000), 0.0, query={"mix": "stereo"})
    session.receive("{}", 0.0)
    for i in range(3):
        (bad,) = session.receive(b"\x00" * 6, 0.1)  # not a whole 4-byte stereo frame
        assert isinstance(bad, Rejected) and bad.cause == "bad_frame" and bad.report == (i == 0)
    (big,) = session.receive(b"\x00" * 4004, 0.2)
    assert isinstance(big, Rejected) and big.cause == "oversized"
    assert session.receive('{"dtmf": "5"}', 0.3) == []
    assert session.counts["texts"] == 1 and session.counts["rejected_bad_frame"] == 3


def test_metadata_and_idle_timeouts() -> None:
    waiting = ForkSession(ForkConfig(metadata_timeout_s=5), 0.0)
    refused = waiting.expire(5.0)
    assert isinstance(refused, Refuse) and refused.cause == "no_metadata"
    session = ForkSession(ForkConfig(idle_timeout_s=2), 0.0)
    session.receive("{}", 1.0)
    assert session.expire(2.9) is None
    stop = session.expire(3.0)
    assert isinstance(stop, Stop) and stop.reason == "idle timeout"


def test_query_of_leaves_the_token_out() -> None:
    assert query_of("/fork?mix=stereo&rate=16k&token=abc&call=x") == {"mix": "stereo", "rate": "16k", "call": "x"}


# ---------------------------------------------------------------- against a real server


@pytest.fixture(scope="module")
def two_voices_16k(tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, np.ndarray]:
    """Caller and callee speech (espeak-ng, 16 kHz), the callee's turns after the caller's."""
    require_tools("espeak-ng", "sox")
    root = tmp_path_factory.mktemp("fork-audio")
    caller_path = espeak_sentences(root / "caller.wav", ("My internet has been down since yesterday morning!",
                                                         "Yes, I already restarted the router twice."))
    callee_path = espeak_sentences(root / "callee.wav", ("I am sorry about that, have you restarted the router?",
                                                         "Thank you, I will send a technician tomorrow."),
                                   voice="en+f3")
    caller, _ = sf.read(str(caller_path), dtype="float32")
    callee, _ = sf.read(str(callee_path), dtype="float32")
    n = caller.shape[0] + callee.shape[0]
    left = np.concatenate([caller, np.zeros(n - caller.shape[0], np.float32)])
    right = np.concatenate([np.zeros(caller.shape[0], np.float32), callee])
    return left, right


async def fork_call(url: str, metadata: str | None, frames: list[bytes], *, wait_s: float = 0.0) -> Any:
    """What mod_audio_fork does for one call: connect, metadata, audio frames, close.

    ``wait_s``: first wait that long for the server to close (to see its close code).
    """
    async with connect(url, subprotocols=[Subprotocol(SUBPROTOCOL)]) as ws:
        if metadata is not None:
            await ws.send(metadata)
        for frame in frames:
            await ws.send(frame)
        if wait_s:
            await asyncio.wait_for(ws.wait_closed(), wait_s)
        return ws


def test_stereo_call_end_to_end(call_server_factory: Any, two_voices_16k: tuple[np.ndarray, np.ndarray]) -> None:
    server: CallServer = call_server_factory(token=TOKEN)
    left, right = two_voices_16k
    metadata = json.dumps({"callId": "7f1d-42", "caller": "1000", "callee": "1002"})
    url = server.url(f"/fork?mix=stereo&rate=16k&token={TOKEN}")
    ws = asyncio.run(fork_call(url, metadata, frames_of(l16(left, right), 2, 16000)))
    assert ws.subprotocol == SUBPROTOCOL
    ids = {"caller": "fork:7f1d-42:caller", "callee": "fork:7f1d-42:callee"}
    wait_until(lambda: set(ids.values()) <= server.closed_streams(), 60, "both parties to close")
    c = server.collector
    speech_starts = {}
    for role, stream_id in ids.items():
        (opened,) = c.of(stream_id, "stream", state="open")
        assert (opened["source"], opened["codec"], opened["sample_rate"], opened["channels"]) == (
            "fork", "pcm_s16le", 16000, 1)
        assert (opened["call"], opened["role"]) == ("7f1d-42", role)
        assert opened["params"] == {"callId": "7f1d-42", "caller": "1000", "callee": "1002"}
        (closed,) = c.of(stream_id, "stream", state="closed")
        assert closed["reason"] == "client closed"
        speech_starts[role] = [e["t"] for e in c.of(stream_id, "speech", state="start")]
        assert speech_starts[role], f"{role}: no speech"
        finals = c.of(stream_id, "emotion", kind="final")
        assert finals and all((e["call"], e["role"]) == ("7f1d-42", role) for e in finals)
    # Each party's speech is where it is in its channel: the callee speaks after the caller.
    assert min(speech_starts["callee"]) > max(speech_starts["caller"])


@pytest.mark.parametrize("mix, role", [("mono", "caller"), ("mixed", None)])
def test_mono_and_mixed_calls_make_one_stream(call_server_factory: Any, mix: str, role: str | None) -> None:
    server: CallServer = call_server_factory()
    audio = np.concatenate([silence(0.5, 8000), voiced(2.0, 8000), silence(1.0, 8000)])
    # No query: mix and rate come from the metadata.
    ws = asyncio.run(fork_call(server.url("/fork"), json.dumps({"mix": mix, "sampling": "8k", "uuid": f"u-{mix}"}),
                               frames_of(l16(audio), 1, 8000)))
    assert ws.subprotocol == SUBPROTOCOL
    stream_id = f"fork:u-{mix}"
    wait_until(lambda: stream_id in server.closed_streams(), 60, f"the {mix} stream to close")
    (opened,) = server.collector.of(stream_id, "stream", state="open")
    assert opened["role"] == role if role else "role" not in opened
    assert (opened["sample_rate"], opened["call"]) == (8000, f"u-{mix}")
    assert server.collector.of(stream_id, "emotion", kind="final")


def test_bad_frames_reported_once_call_goes_on_and_bad_mix_is_refused(call_server_factory: Any) -> None:
    server: CallServer = call_server_factory(fork=ForkConfig(max_speed=None, idle_timeout_s=1.5))
    audio = np.concatenate([silence(0.3, 8000), voiced(2.0, 8000), silence(1.0, 8000)])
    frames = frames_of(l16(audio), 1, 8000)
    frames[10:10] = [b"\x01\x02\x03"] * 3  # odd byte counts: dropped, counted

    async def run() -> tuple[Any, Any]:
        good = fork_call(server.url("/fork?call=odd&rate=8000"), "{}", frames)
        refused = fork_call(server.url("/fork?mix=surround"), "{}", [], wait_s=10)
        return tuple(await asyncio.gather(good, refused))  # type: ignore[return-value]

    _good, refused_ws = asyncio.run(run())
    assert refused_ws.close_code == 1003 and "mix" in refused_ws.close_reason
    wait_until(lambda: "fork:odd" in server.closed_streams(), 60, "the stream to close")
    errors = server.collector.of("fork:odd", "error")
    assert len(errors) == 1 and errors[0]["message"].startswith("bad_frame:")
    assert server.collector.of("fork:odd", "emotion", kind="final"), "the call went on"
    assert server.fork is not None and server.monitor is not None
    assert server.fork.counters["rejected_bad_frame"] == 3 and server.fork.counters["bad_format"] == 1
    assert server.monitor.stats()["drops"]["fork_rejected_bad_frame"] == 3

    async def silent_caller() -> Any:
        async with connect(server.url("/fork?call=quiet"), subprotocols=[Subprotocol(SUBPROTOCOL)]) as ws:
            await ws.send("{}")
            await ws.send(l16(silence(0.1, 8000)))
            await asyncio.wait_for(ws.wait_closed(), 10)
            return ws

    quiet = asyncio.run(silent_caller())
    assert (quiet.close_code, quiet.close_reason) == (1000, "idle timeout")
    wait_until(lambda: "fork:quiet" in server.closed_streams(), 30, "the idle stream to close")
    (closed,) = server.collector.of("fork:quiet", "stream", state="closed")
    assert closed["reason"] == "idle timeout"


def test_fork_needs_the_token_in_the_query(call_server_factory: Any) -> None:
    server: CallServer = call_server_factory(token=TOKEN)

    async def status(url: str) -> int:
        try:
            async with connect(url, subprotocols=[Subprotocol(SUBPROTOCOL)]):
                return 101
        except InvalidStatus as exc:
            return exc.response.status_code

    assert asyncio.run(status(server.url("/fork?mix=mono"))) == 401
    assert asyncio.run(status(server.url(f"/fork?mix=mono&token={TOKEN}x"))) == 401
    assert asyncio.run(status(server.url(f"/fork?mix=mono&token={TOKEN}"))) == 101


def test_routing_table_takes_new_audio_paths_only(call_model: Any) -> None:
    from serstream.monitor import Monitor
    from serstream.server import EventBus, MonitorServer
    from serstream.sources.fork import ForkHandler

    handler = ForkHandler(Monitor(call_model))  # never started: only the route table is built
    for bad in ("/ingest", "/events", "fork"):
        with pytest.raises(ValueError, match="new path"):
            MonitorServer(EventBus(), health=dict, metrics=str, audio_routes={bad: handler})
    server = MonitorServer(EventBus(), health=dict, metrics=str, audio_routes={"/fork": handler})
    route = server.routes["/fork"]
    assert (route.limit, route.query_token, route.hello_token, route.subprotocols) == (
        "ingest", True, False, (SUBPROTOCOL,))
    assert server.routes["/ingest"].hello_token and not server.routes["/events"].query_token
