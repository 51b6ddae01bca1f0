"""Twilio Media Streams on /twilio: the pure session, a real server end to end, clock alignment, fuzz.

The client side is written from Twilio's published message format
(tests/callserver.py: ``connected``, ``start``, ``media`` with string
``sequenceNumber``/``chunk``/``timestamp`` and base64 u-law, ``stop``); the
server side is the real monitor with the factory model behind the real
``websockets`` server.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Subprotocol

from serstream.sources.twilio_session import (
    REJECT_CAUSES,
    OpenTrack,
    Refuse,
    Rejected,
    StartCall,
    Stop,
    TrackAudio,
    TwilioConfig,
    TwilioSession,
    signature_ok,
    twilio_signature,
)
from tests.audio import espeak_sentences, silence, voiced
from tests.callserver import CallServer, TwilioCall, call_model, call_server_factory, ulaw_encode, wait_until
from tests.conftest import require_tools

__all__ = ["call_model", "call_server_factory"]  # fixtures used here

TOKEN = "tw-s3cret"
RATE = 8000


def ulaw_b64(samples: np.ndarray) -> str:
    return base64.b64encode(ulaw_encode(samples)).decode("ascii")


def started_session(config: TwilioConfig | None = None, tracks: tuple[str, ...] = ("inbound", "outbound"),
                    totals: dict[str, int] | None = None) -> tuple[TwilioSession, TwilioCall]:
    call = TwilioCall("CA1234", tracks=tracks, custom={"agent": "ada", "queue": "billing"})
    session = TwilioSession(config or TwilioConfig(), 0.0, totals if totals is not None else {})
    assert session.receive(call.connected(), 0.0) == []
    decisions = session.receive(call.start(), 0.0)
    assert len(decisions) == 1 and isinstance(decisions[0], StartCall)
    return session, call


def audio_of(decisions: list[Any]) -> TrackAudio:
    audio = [d for d in decisions if isinstance(d, TrackAudio)]
    assert len(audio) == 1, decisions
    return audio[0]


# ---------------------------------------------------------------- the pure session


def test_start_names_the_call_tracks_format_and_custom_parameters() -> None:
    session, call = started_session()
    start = session.call
    assert start is not None
    assert (start.call, start.stream_sid, start.tracks, start.sample_rate) == (
        "CA1234", call.stream_sid, ("inbound", "outbound"), 8000)
    assert start.codec.stream_codec == "pcmu"
    assert dict(start.params) == {"agent": "ada", "queue": "billing"}
    assert start.stream_id("inbound") == "twilio:CA1234:inbound"
    assert session.counts["starts"] == 1 and session.counts["connected"] == 1


def test_telnyx_variant_is_read_by_the_same_session_and_opens_tracks_lazily() -> None:
    session = TwilioSession(TwilioConfig(), 0.0)
    start = {"event": "start", "sequence_number": "1", "stream_id": "32de0dea",
             "start": {"call_control_id": "v2:T02llQxIyaRkhfRKx", "media_format":
                       {"encoding": "PCMU", "sample_rate": 8000, "channels": 1}}}
    (decision,) = session.receive(json.dumps(start), 0.0)
    assert isinstance(decision, StartCall)
    assert decision.dialect == "telnyx" and decision.tracks == ()
    assert decision.stream_id("inbound") == "telnyx:v2:T02llQxIyaRkhfRKx:inbound"
    media = {"event": "media", "sequence_number": "2", "stream_id": "32de0dea",
             "media": {"track": "outbound", "chunk": "1", "timestamp": "0", "payload": ulaw_b64(voiced(0.02, RATE))}}
    decisions = session.receive(json.dumps(media), 0.1)
    assert isinstance(decisions[0], OpenTrack) and decisions[0].track == "outbound"
    assert audio_of(decisions).samples.shape == (160,)


def test_timestamps_place_audio_gaps_filled_overlaps_trimmed_late_dropped() -> None:
    totals: dict[str, int] = {}
    session, call = started_session(TwilioConfig(max_gap_s=1.0), totals=totals)
    chunk = voiced(0.02, RATE)
    first = audio_of(session.receive(call.media("inbound", 0, chunk), 0.0))
    assert (first.silence, first.samples.shape[0]) == (0, 160)
    # 100 ms missing: 800 frames of silence first, then the chunk.
    gap = audio_of(session.receive(call.media("inbound", 120, chunk), 0.1))
    assert gap.silence == 800 and gap.samples.shape[0] == 960
    assert not gap.samples[:800].any() and gap.samples[800:].any()
    # Overlapping by 10 ms: the overlap is cut.
    overlap = audio_of(session.receive(call.media("inbound", 130, chunk), 0.2))
    assert (overlap.silence, overlap.samples.shape[0]) == (0, 80)
    # Wholly in the past (a duplicate): dropped and counted.
    (late,) = session.receive(call.media("inbound", 120, chunk), 0.3)
    assert isinstance(late, Rejected) and late.cause == "late_chunk" and late.report
    (late2,) = session.receive(call.media("inbound", 0, chunk), 0.3)
    assert isinstance(late2, Rejected) and not late2.report and late2.count == 2
    # A jump past max_gap_s fills max_gap_s and moves the track's origin; what follows is contiguous.
    jump = audio_of(session.receive(call.media("inbound", 60_000, chunk), 0.4))
    assert jump.silence == 8000
    after = audio_of(session.receive(call.media("inbound", 60_020, chunk), 0.5))
    assert after.silence == 0 and after.samples.shape[0] == 160
    # The other track has its own clock: its first chunk at 40 ms gets 40 ms of silence.
    out = audio_of(session.receive(call.media("outbound", 40, chunk), 0.5))
    assert (out.track, out.silence) == ("outbound", 320)
    assert totals["gaps"] == 3 and totals["gap_frames"] == 800 + 8000 + 320
    assert totals["clock_jumps"] == 1 and totals["overlap_frames"] == 80 and totals["rejected_late_chunk"] == 2


def test_one_ms_timestamp_jitter_does_not_add_silence() -> None:
    session, call = started_session()
    chunk = voiced(0.02, RATE)
    assert audio_of(session.receive(call.media("inbound", 0, chunk), 0.0)).silence == 0
    assert audio_of(session.receive(call.media("inbound", 21, chunk), 0.0)).silence == 0
    assert audio_of(session.receive(call.media("inbound", 40, chunk), 0.0)).samples.shape[0] == 160


def test_bad_input_is_counted_and_reported_once_per_cause() -> None:
    session = TwilioSession(TwilioConfig(), 0.0)
    call = TwilioCall("CA9")
    chunk = voiced(0.02, RATE)
    (early,) = session.receive(call.media("inbound", 0, chunk), 0.0)
    assert isinstance(early, Rejected) and early.cause == "media_before_start" and early.report
    session.receive(call.start(), 0.0)
    good = json.loads(call.media("inbound", 0, chunk))
    cases: list[tuple[str | bytes, str]] = [
        ("{not json", "bad_json"),
        ("[1, 2]", "bad_json"),
        ('{"event": 5}', "bad_json"),
        (b"\x00\x01", "binary"),
        ('{"event": "hangup"}', "unknown_event"),
        (json.dumps({**good, "media": {**good["media"], "payload": "@@not base64@@"}}), "bad_base64"),
        (json.dumps({**good, "media": {**good["media"], "timestamp": "soon"}}), "bad_media"),
        (json.dumps({**good, "media": {**good["media"], "track": "sideways"}}), "bad_media"),
        (json.dumps({**good, "media": "x"}), "bad_media"),
        ("x" * 70_000, "oversized"),
        (call.start(), "second_start"),
    ]
    for message, cause in cases * 2:
        (decision,) = session.receive(message, 0.1)
        assert isinstance(decision, Rejected) and decision.cause == cause, (message[:40], decision)
        assert "\n" not in decision.message
    rejected = {k: v for k, v in session.counts.items() if k.startswith("rejected_")}
    assert rejected == {"rejected_media_before_start": 1, "rejected_bad_json": 6, "rejected_binary": 2,
                        "rejected_unknown_event": 2, "rejected_bad_base64": 2, "rejected_bad_media": 6,
                        "rejected_oversized": 2, "rejected_second_start": 2}
    assert set(k[len("rejected_"):] for k in rejected) <= set(REJECT_CAUSES)
    # A one-track stream refuses media for the track it did not announce.
    mono, mono_call = started_session(tracks=("inbound",))
    (other,) = mono.receive(mono_call.media("outbound", 0, chunk), 0.0)
    assert isinstance(other, Rejected) and other.cause == "unknown_track"


@pytest.mark.parametrize("fmt, cause", [
    ({"encoding": "audio/x-opus", "sampleRate": 8000, "channels": 1}, "unknown_encoding"),
    ({"encoding": "audio/x-mulaw", "sampleRate": 7, "channels": 1}, "unknown_encoding"),
    ({"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 2}, "unknown_encoding"),
    ("mulaw", "bad_start"),
])
def test_unknown_encoding_refuses_the_call(fmt: Any, cause: str) -> None:
    session = TwilioSession(TwilioConfig(), 0.0)
    message = json.loads(TwilioCall("CA1").start())
    message["start"]["mediaFormat"] = fmt
    (decision,) = session.receive(json.dumps(message), 0.0)
    assert isinstance(decision, Refuse) and decision.cause == cause
    assert decision.code in (1002, 1003) and session.stopped and session.counts[cause] == 1


def test_start_and_idle_timeouts() -> None:
    config = TwilioConfig(start_timeout_s=5, idle_timeout_s=30)
    waiting = TwilioSession(config, 100.0)
    assert waiting.deadline == 105.0 and waiting.expire(104.9) is None
    refused = waiting.expire(105.0)
    assert isinstance(refused, Refuse) and refused.cause == "no_start"
    session, call = started_session(config)
    session.receive(call.media("inbound", 0, voiced(0.02, RATE)), 10.0)
    assert session.deadline == 40.0 and session.expire(39.0) is None
    session.resume(25.0)  # the adapter waited on a full ring until 25 s: not the client's idle time
    assert session.deadline == 55.0 and session.expire(54.0) is None
    stop = session.expire(55.0)
    assert isinstance(stop, Stop) and stop.reason == "idle timeout" and session.counts["idle_timeouts"] == 1


def test_stop_ends_the_session() -> None:
    session, call = started_session()
    (stop,) = session.receive(call.stop(), 1.0)
    assert isinstance(stop, Stop) and stop.reason == "stop" and session.stopped


# ---------------------------------------------------------------- fuzz (pure)


def _mutate(rng: random.Random, text: str) -> str | bytes:
    """One random corruption of a valid message: textual (bytes, cuts) or structural (fields, types)."""
    kind = rng.randrange(10)
    if kind == 0:
        i = rng.randrange(len(text))
        return text[:i] + chr(rng.randrange(1, 0x3000)) + text[i + 1:]
    if kind == 1:
        return text[: rng.randrange(len(text))]
    if kind == 2:
        i = rng.randrange(len(text))
        return text[:i] + rng.choice(['"', "{", "}", "[", "]", ",", ":", "\\", "null", "1e999"]) + text[i:]
    if kind == 3:
        return text.encode("utf-8")[: rng.randrange(1, 64)]
    obj = json.loads(text)
    junk: list[Any] = [None, True, -1, 2**70, 1.5, "", "x" * rng.randrange(300), [], {}, [1, "a"], {"a": {}},
                       "NaN", "-5", "0x10", "١٢٣", "12" * 10]

    def pick() -> Any:
        return copy.deepcopy(rng.choice(junk))  # a fresh object: never a cycle
    if kind == 4:
        obj["event"] = rng.choice([pick(), "media", "start", "stop", "dtmf", "mark", "connected", "MEDIA"])
    elif kind == 5 and obj:
        del obj[rng.choice(list(obj))]
    elif kind in (6, 7):
        inner = obj.get(obj.get("event")) if isinstance(obj.get(obj.get("event")), dict) else obj
        if inner:
            key = rng.choice(list(inner))
            inner[key] = pick() if kind == 6 else (
                inner[key][:-2] + "%%" if isinstance(inner[key], str) and len(inner[key]) > 2 else pick())
            if isinstance(inner.get("mediaFormat"), dict) and rng.random() < 0.5:
                inner["mediaFormat"][rng.choice(["encoding", "sampleRate", "channels"])] = pick()
    elif kind == 8:
        obj[rng.choice(["extra", "media", "start", "streamSid", "sequenceNumber"])] = pick()
    else:
        return json.dumps(obj) * rng.randrange(2, 4)
    return json.dumps(obj)


def _valid_messages() -> list[str]:
    call = TwilioCall("CA77", custom={"k": "v"})
    chunk = voiced(0.02, RATE)
    return [call.connected(), call.start(), call.media("inbound", 20, chunk), call.media("outbound", 40, chunk),
            call.dtmf("5"), call.mark("m1"), call.stop()]


OUTCOMES = ("chunks", "connected", "dtmf", "mark", "starts", "stops", "bad_start", "unknown_encoding")


def test_fuzz_100k_mutated_messages_into_the_session() -> None:
    """No exception, and every message ends as exactly one outcome or one counted rejection."""
    rng = random.Random(20260214)
    valid = _valid_messages()
    totals: dict[str, int] = {}
    sessions = 0
    session: TwilioSession | None = None
    now = 0.0
    for _ in range(100_000):
        if session is None or session.stopped:
            session = TwilioSession(TwilioConfig(), now, totals)
            sessions += 1
            # Most sessions get a valid start first so the media paths are fuzzed too.
            if rng.random() < 0.8:
                session.receive(valid[1], now)
        message = _mutate(rng, rng.choice(valid)) if rng.random() < 0.9 else rng.choice(valid)
        now += 0.001
        decisions = session.receive(message, now)
        for decision in decisions:
            if isinstance(decision, TrackAudio):
                assert decision.samples.dtype == np.float32 and np.isfinite(decision.samples).all()
            if isinstance(decision, Rejected):
                assert decision.cause in REJECT_CAUSES and "\n" not in decision.message
    rejected = sum(v for k, v in totals.items() if k.startswith("rejected_"))
    used = sum(totals.get(k, 0) for k in OUTCOMES)
    assert totals["messages"] == used + rejected, totals
    assert rejected > 50_000 and totals["chunks"] > 1_000, totals
    assert {"rejected_bad_json", "rejected_bad_base64", "rejected_bad_media",
            "rejected_media_before_start"} <= set(totals), totals
    assert sessions > 10


# ---------------------------------------------------------------- against a real server


@pytest.fixture(scope="module")
def speech_8k(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    """Two espeak-ng utterance sets at 8 kHz (one per party)."""
    require_tools("espeak-ng", "sox")
    root = tmp_path_factory.mktemp("twilio-audio")
    out = {}
    for name, sentences in (
        ("inbound", ("Hello, I am calling about the invoice you sent me last week.",
                     "I have been waiting for a very long time and I am not happy!")),
        ("outbound", ("Thank you for calling, how can I help you today?",
                      "I am sorry to hear that, let me check it for you right away.")),
    ):
        path = espeak_sentences(root / f"{name}.wav", sentences, rate=RATE)
        audio, rate = sf.read(str(path), dtype="float32")
        assert rate == RATE
        out[name] = audio
    return out


async def send_all(url: str, messages: list[str | bytes], *, close: bool = True, headers: Any = None) -> Any:
    async with connect(url, additional_headers=headers or {}, max_size=None) as ws:
        for message in messages:
            await ws.send(message)
        if not close:
            return ws
        try:
            await asyncio.wait_for(ws.wait_closed(), 30)
        except TimeoutError:
            pass
        return ws


def interleave(*tracks: list[tuple[int, str]]) -> list[str]:
    """Messages of several tracks in timestamp order, as Twilio sends them."""
    merged = sorted((stamp, i, j, msg) for i, track in enumerate(tracks) for j, (stamp, msg) in enumerate(track))
    return [msg for _, _, _, msg in merged]


def test_two_party_call_end_to_end(call_server_factory: Any, speech_8k: dict[str, np.ndarray]) -> None:
    server: CallServer = call_server_factory(token=TOKEN)
    # <Stream url> takes no query string: the token comes as <Parameter name="token">, in customParameters.
    call = TwilioCall("CAe2e0001", custom={"agent": "ada", "ticket": "T-17", "token": TOKEN})
    messages = [call.connected(), call.start()]
    messages += interleave(call.track_media("inbound", speech_8k["inbound"]),
                           call.track_media("outbound", speech_8k["outbound"]))
    messages.insert(5, call.dtmf("1"))
    messages.append(call.mark("greeting"))
    messages.append(call.stop())
    ws = asyncio.run(send_all(server.url("/twilio"), messages))
    assert ws.close_code == 1000
    ids = {track: f"twilio:CAe2e0001:{track}" for track in ("inbound", "outbound")}
    wait_until(lambda: set(ids.values()) <= server.closed_streams(), 60, "both party streams to close")
    c = server.collector
    for track, stream_id in ids.items():
        (opened,) = c.of(stream_id, "stream", state="open")
        assert (opened["source"], opened["codec"], opened["sample_rate"]) == ("twilio", "pcmu", 8000)
        assert (opened["call"], opened["role"]) == ("CAe2e0001", track)
        assert opened["params"] == {"agent": "ada", "ticket": "T-17"}
        (closed,) = c.of(stream_id, "stream", state="closed")
        assert closed["reason"] == "stop"
        assert c.of(stream_id, "speech", state="start"), f"{track}: no speech"
        finals = c.of(stream_id, "emotion", kind="final")
        assert finals, f"{track}: no final emotion"
        assert all((e["call"], e["role"]) == ("CAe2e0001", track) for e in finals)
        assert not c.of(stream_id, "error")
    assert server.twilio is not None
    stats = server.twilio.stats()
    assert stats["dtmf"] == 1 and stats["mark"] == 1 and stats["stops"] == 1 and stats["active"] == 0


def test_start_token_check() -> None:
    config = TwilioConfig(token=TOKEN)
    for custom, expected in (({"token": TOKEN, "a": "b"}, StartCall), ({"token": "nope"}, Refuse), ({}, Refuse)):
        session = TwilioSession(config, 0.0)
        (decision,) = session.receive(TwilioCall("CA1", custom=custom).start(), 0.0)
        assert isinstance(decision, expected), (custom, decision)
        if isinstance(decision, StartCall):
            assert dict(decision.params) == {"a": "b"}, "the token must not reach the stream event"
        else:
            assert decision.code == 1008 and session.counts["refused_token"] == 1
    # A handshake that carried the token (checked by the server) needs none in the start.
    trusted = TwilioSession(config, 0.0, authenticated=True)
    assert isinstance(trusted.receive(TwilioCall("CA1").start(), 0.0)[0], StartCall)


def test_signature_matches_twilios_published_example() -> None:
    # The worked example of Twilio's request-validation docs (auth token 12345).
    params = {"CallSid": "CA1234567890ABCDE", "Caller": "+14158675309", "Digits": "1234",
              "From": "+14158675309", "To": "+18005551212"}
    url = "https://mycompany.com/myapp.php?foo=1&bar=2"
    assert twilio_signature("12345", url, params) == "RSOYDt4T1cUTdK1PDd93/VVr8B8="
    signature = twilio_signature("12345", "wss://example.com/twilio")
    assert signature_ok("12345", ["wss://example.com/twilio"], signature)
    assert not signature_ok("12345", ["wss://example.com/twilio2"], signature)
    assert not signature_ok("54321", ["wss://example.com/twilio"], signature)
    assert not signature_ok("12345", ["wss://example.com/twilio"], None)
    assert not signature_ok("12345", ["wss://example.com/twilio"], "bad \u738b")


def test_x_twilio_signature_is_checked_at_the_handshake(call_server_factory: Any) -> None:
    auth = "twilio-auth-0123"
    server: CallServer = call_server_factory(token=TOKEN, twilio=TwilioConfig(max_speed=None, auth_token=auth))
    assert server.server is not None
    host = f"127.0.0.1:{server.server.port}"

    async def attempt(signature: str | None) -> int | None:
        call = TwilioCall("CAsig", tracks=("inbound",))  # no token in customParameters: the signature suffices
        headers = {"X-Twilio-Signature": signature} if signature is not None else {}
        async with connect(server.url("/twilio"), additional_headers=headers) as ws:
            for message in (call.connected(), call.start(), call.stop()):
                try:
                    await ws.send(message)
                except ConnectionClosed:
                    break
            await asyncio.wait_for(ws.wait_closed(), 10)
            return ws.close_code

    good = twilio_signature(auth, f"wss://{host}/twilio")
    assert asyncio.run(attempt(good)) == 1000
    assert asyncio.run(attempt(twilio_signature("other", f"wss://{host}/twilio"))) == 1008
    assert asyncio.run(attempt(None)) == 1008
    assert server.twilio is not None and server.twilio.counters["refused_signature"] == 2
    assert len(server.collector.of(type_="stream", state="open", call="CAsig")) == 1


def test_telnyx_variant_end_to_end(call_server_factory: Any, speech_8k: dict[str, np.ndarray]) -> None:
    """Telnyx's snake-case messages (stream_id, call_control_id, media_format) on the same path."""
    server: CallServer = call_server_factory()
    call_id = "v2:T02llQxIyaRkhfRKxgAP8nY511EhFLizdvdUKJiSw8d6A9BborherQ"
    messages: list[str | bytes] = [
        json.dumps({"event": "connected", "version": "1.0.0"}),
        json.dumps({"event": "start", "sequence_number": "1", "stream_id": "32de0dea-53cb",
                    "start": {"user_id": "3e6f995f", "call_control_id": call_id, "client_state": "aGF2ZSBhIG5pY2UgZGF5",
                              "media_format": {"encoding": "PCMU", "sample_rate": 8000, "channels": 1}}}),
    ]
    encoded = {track: ulaw_encode(speech_8k[track]) for track in ("inbound", "outbound")}
    sequence = 1
    for i in range(0, max(len(b) for b in encoded.values()), 160):
        for track, data in encoded.items():
            if i < len(data):
                sequence += 1
                messages.append(json.dumps({
                    "event": "media", "sequence_number": str(sequence), "stream_id": "32de0dea-53cb",
                    "media": {"track": track, "chunk": str(i // 160 + 1), "timestamp": str(i // 8),
                              "payload": base64.b64encode(data[i:i + 160]).decode("ascii")}}))
    messages.append(json.dumps({"event": "stop", "sequence_number": str(sequence + 1), "stream_id": "32de0dea-53cb",
                                "stop": {"user_id": "3e6f995f", "call_control_id": call_id}}))
    ws = asyncio.run(send_all(server.url("/twilio"), messages))
    assert ws.close_code == 1000
    ids = {track: f"telnyx:{call_id}:{track}" for track in ("inbound", "outbound")}
    wait_until(lambda: set(ids.values()) <= server.closed_streams(), 60, "both Telnyx parties to close")
    for track, stream_id in ids.items():
        (opened,) = server.collector.of(stream_id, "stream", state="open")
        assert (opened["source"], opened["call"], opened["role"]) == ("twilio", call_id, track)
        assert server.collector.of(stream_id, "emotion", kind="final"), f"{track}: no final emotion"


def test_token_in_custom_parameters_or_the_url_query(call_server_factory: Any) -> None:
    server: CallServer = call_server_factory(token=TOKEN)

    async def attempt(url: str, custom: dict[str, str]) -> tuple[int, int | None]:
        call = TwilioCall("CAtok", tracks=("inbound",), custom=custom)
        try:
            async with connect(url) as ws:
                await ws.send(call.connected())
                await ws.send(call.start())
                await ws.send(call.stop())
                await asyncio.wait_for(ws.wait_closed(), 10)
                return 101, ws.close_code
        except InvalidStatus as exc:
            return exc.response.status_code, None

    assert asyncio.run(attempt(server.url("/twilio"), {})) == (101, 1008)
    assert asyncio.run(attempt(server.url("/twilio"), {"token": "wrong"})) == (101, 1008)
    assert asyncio.run(attempt(server.url("/twilio"), {"token": TOKEN})) == (101, 1000)
    assert asyncio.run(attempt(server.url("/twilio?token=wrong"), {"token": TOKEN})) == (401, None)
    assert asyncio.run(attempt(server.url(f"/twilio?token={TOKEN}"), {})) == (101, 1000)
    assert server.server is not None and server.server.refusals["unauthorized"] == 1
    assert server.twilio is not None and server.twilio.counters["refused_token"] == 2
    opened = server.collector.of(type_="stream", state="open", call="CAtok")
    assert len(opened) == 2 and all("token" not in e.get("params", {}) for e in opened)


def test_bad_input_counted_reported_once_and_other_calls_untouched(
    call_server_factory: Any, speech_8k: dict[str, np.ndarray]
) -> None:
    server: CallServer = call_server_factory(twilio=TwilioConfig(max_speed=None, idle_timeout_s=1.5))
    good = TwilioCall("CAgood")
    bad = TwilioCall("CAbad", tracks=("inbound",))
    chunk = voiced(0.02, RATE)
    bad_media = json.loads(bad.media("inbound", 20, chunk))
    bad_media["media"]["payload"] = "!!!!"
    junk = ["{oops", "{oops", json.dumps(bad_media), json.dumps(bad_media)]
    bad_messages = [bad.connected(), bad.media("inbound", 0, chunk), bad.media("inbound", 0, chunk), bad.start()]
    bad_messages += junk + [m for _, m in bad.track_media("inbound", voiced(1.0, RATE))]
    unknown = TwilioCall("CAopus", encoding="audio/x-opus")
    good_messages = [good.connected(), good.start()] + interleave(
        good.track_media("inbound", speech_8k["inbound"]), good.track_media("outbound", speech_8k["outbound"])
    ) + [good.stop()]

    async def run() -> tuple[Any, Any, Any]:
        return await asyncio.gather(
            send_all(server.url("/twilio"), good_messages),
            # No stop: the idle timeout closes it.
            send_all(server.url("/twilio"), bad_messages),
            send_all(server.url("/twilio"), [unknown.connected(), unknown.start()]),
        )

    good_ws, bad_ws, unknown_ws = asyncio.run(run())
    assert good_ws.close_code == 1000
    assert unknown_ws.close_code == 1003 and "not supported" in unknown_ws.close_reason
    assert bad_ws.close_code == 1000 and bad_ws.close_reason == "idle timeout"
    bad_id = "twilio:CAbad:inbound"
    wait_until(lambda: {bad_id, "twilio:CAgood:inbound", "twilio:CAgood:outbound"} <= server.closed_streams(),
               60, "the streams to close")
    c = server.collector
    (closed,) = c.of(bad_id, "stream", state="closed")
    assert closed["reason"] == "idle timeout"
    errors = c.of(bad_id, "error")
    causes = sorted(e["message"].split(":")[0] for e in errors)
    assert causes == ["bad_base64", "bad_json"], errors  # once per cause (media_before_start had no stream yet)
    assert not c.of(type_="stream", call="CAopus")
    for track in ("inbound", "outbound"):
        assert c.of(f"twilio:CAgood:{track}", "emotion", kind="final")
        assert not c.of(f"twilio:CAgood:{track}", "error")
    assert server.twilio is not None and server.monitor is not None
    stats = server.twilio.stats()
    assert stats["rejected_media_before_start"] == 2 and stats["rejected_bad_json"] == 2
    assert stats["rejected_bad_base64"] == 2 and stats["unknown_encoding"] == 1 and stats["idle_timeouts"] == 1
    drops = server.monitor.stats()["drops"]
    assert drops["twilio_rejected_bad_json"] == 2 and drops["twilio_unknown_encoding"] == 1


def test_ten_minute_call_faster_than_real_time_keeps_both_clocks_aligned(call_server_factory: Any) -> None:
    """The same utterance at the same call time lands at the same t0 on both tracks.

    The outbound track starts 2 s late, sends 40 ms chunks instead of 20 ms,
    and leaves out stretches of silence (so its timestamps jump); the
    inbound track is continuous. Any misplacement would show as a shift.
    """
    server: CallServer = call_server_factory()
    length_s = 600
    utterances_s = (30.0, 150.0, 297.5, 451.0, 590.0)
    audio = silence(length_s, RATE)
    for i, at in enumerate(utterances_s):
        speech = voiced(1.6, RATE, f0=120.0 + 15 * i, seed=i)
        start = int(at * RATE)
        audio[start:start + speech.shape[0]] = speech
    call = TwilioCall("CAlong")
    inbound = call.track_media("inbound", audio, chunk_ms=20)
    skips = [(int(at * 1000) - 9000, int(at * 1000) - 4000) for at in utterances_s[1:]] + [(0, 2000)]
    outbound = call.track_media("outbound", audio, chunk_ms=40, skip=skips)
    messages = [call.connected(), call.start()] + interleave(inbound, outbound) + [call.stop()]
    ws = asyncio.run(send_all(server.url("/twilio"), messages))
    assert ws.close_code == 1000
    ids = ("twilio:CAlong:inbound", "twilio:CAlong:outbound")
    wait_until(lambda: set(ids) <= server.closed_streams(), 300, "the 10-minute call to finish")
    c = server.collector
    starts = {sid: [e["t"] for e in c.of(sid, "speech", state="start")] for sid in ids}
    assert len(starts[ids[0]]) == len(utterances_s), starts
    assert np.allclose(starts[ids[0]], starts[ids[1]], atol=0.03), starts
    assert np.allclose(starts[ids[0]], utterances_s, atol=0.5), starts
    finals = {sid: sorted(e["t0"] for e in c.of(sid, "emotion", kind="final")) for sid in ids}
    assert len(finals[ids[0]]) >= len(utterances_s)
    assert finals[ids[0]] == pytest.approx(finals[ids[1]], abs=0.03), finals
    assert server.twilio is not None
    assert server.twilio.counters["gaps"] == len(skips) and server.twilio.counters.get("rejected_late_chunk", 0) == 0


def test_short_fuzz_through_the_socket_counts_everything(call_server_factory: Any) -> None:
    server: CallServer = call_server_factory(twilio=TwilioConfig(max_speed=None, idle_timeout_s=2.0))
    rng = random.Random(7)
    valid = _valid_messages()
    batches = []
    for _ in range(4):
        batch: list[str | bytes] = [valid[0], valid[1]]
        while len(batch) < 502:
            message = _mutate(rng, rng.choice(valid[2:6]))
            # A mutation that turns into a stop would end the connection early: keep the rest readable.
            if (b"stop" if isinstance(message, bytes) else "stop") not in message:
                batch.append(message)
        batches.append(batch)

    async def run() -> list[Any]:
        return list(await asyncio.gather(*(send_all(server.url("/twilio"), b) for b in batches)))

    results = asyncio.run(run())
    assert all(ws.close_code in (1000, 1002, 1003) for ws in results), [ws.close_code for ws in results]
    assert server.twilio is not None
    wait_until(lambda: server.twilio is not None and server.twilio.active == 0, 30, "the fuzzed calls to end")
    totals = server.twilio.counters
    rejected = sum(v for k, v in totals.items() if k.startswith("rejected_"))
    used = sum(totals.get(k, 0) for k in OUTCOMES)
    assert totals["messages"] == used + rejected == sum(len(b) for b in batches), totals
    assert rejected > 1000
    # The server still takes a clean call afterwards.
    call = TwilioCall("CAafter", tracks=("inbound",))
    msgs = [call.connected(), call.start()] + [m for _, m in call.track_media("inbound", voiced(2.0, RATE))]
    ws = asyncio.run(send_all(server.url("/twilio"), msgs + [call.stop()]))
    assert ws.close_code == 1000
    wait_until(lambda: "twilio:CAafter:inbound" in server.closed_streams(), 30, "the clean call")


def test_connection_closed_without_stop_is_reported_disconnected_or_closed(call_server_factory: Any) -> None:
    server: CallServer = call_server_factory()
    call = TwilioCall("CAdrop", tracks=("inbound",))

    async def run() -> None:
        ws = await connect(server.url("/twilio"))
        media = [m for _, m in call.track_media("inbound", voiced(0.5, RATE))]
        for message in [call.connected(), call.start(), *media]:
            await ws.send(message)
        await ws.close()

    asyncio.run(run())
    wait_until(lambda: "twilio:CAdrop:inbound" in server.closed_streams(), 30, "the stream to close")
    (closed,) = server.collector.of("twilio:CAdrop:inbound", "stream", state="closed")
    assert closed["reason"] == "client closed"


def test_serve_command_takes_twilio_and_fork_calls_over_wss(
    tmp_path: Path, factory_model: Path, free_port: int, speech_8k: dict[str, np.ndarray]
) -> None:
    """``serstream serve`` with TLS and a token: /twilio (signed handshake) and /fork (?token=) are served."""
    import ssl

    from serstream.client import EmotionEvent, StreamEvent, events
    from tests.clients.helpers import start_monitor
    from tests.test_server_access import make_certificate

    cert, key = make_certificate(tmp_path)
    auth = "twilio-account-auth-token"
    env = {**os.environ, "TWILIO_AUTH_TOKEN": auth}
    monitor = start_monitor(["serve", "--model", str(factory_model), "--port", str(free_port), "--token", TOKEN,
                             "--tls-cert", str(cert), "--tls-key", str(key)], env=env, ready="dashboard https://")
    base = f"wss://127.0.0.1:{free_port}"
    context = ssl.create_default_context(cafile=str(cert))
    try:
        assert monitor.stderr_has(f"{base}/twilio (Twilio Media Streams)") and monitor.stderr_has(f"{base}/fork")
        async def run() -> list[Any]:
            seen: list[Any] = []
            closed: set[str] = set()

            async def watch() -> None:
                async for event in events(f"{base}/events", token=TOKEN, ca_file=cert):
                    seen.append(event)
                    if isinstance(event, StreamEvent) and event.state == "closed":
                        closed.add(event.stream)
                        if {"twilio:CAcli:inbound", "twilio:CAcli:outbound", "fork:fs-1:caller",
                                "fork:fs-1:callee"} <= closed:
                            return

            watcher = asyncio.create_task(watch())
            await asyncio.sleep(0.5)
            call = TwilioCall("CAcli")
            twilio_messages = [call.connected(), call.start(), *interleave(
                call.track_media("inbound", speech_8k["inbound"]), call.track_media("outbound", speech_8k["outbound"])),
                call.stop()]
            signature = twilio_signature(auth, f"{base}/twilio")
            async with connect(f"{base}/twilio", ssl=context, additional_headers={"X-Twilio-Signature": signature},
                               max_size=None) as ws:
                for message in twilio_messages:
                    await ws.send(message)
                await asyncio.wait_for(ws.wait_closed(), 30)
            pcm = (np.stack([speech_8k["inbound"], np.zeros_like(speech_8k["inbound"])], axis=1) * 32767)
            frames = pcm.astype("<i2").tobytes()
            async with connect(f"{base}/fork?mix=stereo&rate=8k&call=fs-1&token={TOKEN}", ssl=context,
                               subprotocols=[Subprotocol("audio.drachtio.org")]) as ws:
                await ws.send('{"caller":"1000"}')
                for i in range(0, len(frames), 640):
                    await ws.send(frames[i:i + 640])
            await asyncio.wait_for(watcher, 90)
            return seen

        seen = asyncio.run(asyncio.wait_for(run(), 150))
        opened = {e.stream: (e.source, e.call, e.role) for e in seen
                  if isinstance(e, StreamEvent) and e.state == "open"}
        assert opened["twilio:CAcli:inbound"] == ("twilio", "CAcli", "inbound")
        assert opened["twilio:CAcli:outbound"] == ("twilio", "CAcli", "outbound")
        assert opened["fork:fs-1:caller"] == ("fork", "fs-1", "caller")
        assert opened["fork:fs-1:callee"] == ("fork", "fs-1", "callee")
        finals = {e.stream for e in seen if isinstance(e, EmotionEvent) and e.kind == "final"}
        assert {"twilio:CAcli:inbound", "twilio:CAcli:outbound", "fork:fs-1:caller"} <= finals, finals
    finally:
        monitor.kill()
