"""Tests for serstream.sources.ingest_session: the /ingest protocol without a socket.

Each test feeds the messages a client would send and checks the decision, the
close code and reason docs/ingest.md promises, and the counters it names.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from serstream.sources.ingest_session import (
    CLOSE_POLICY,
    CLOSE_PROTOCOL,
    CLOSE_TOO_BIG,
    CLOSE_TRY_LATER,
    CLOSE_UNSUPPORTED,
    Audio,
    Dropped,
    End,
    Hello,
    IngestConfig,
    IngestSession,
    Refuse,
    SessionState,
)


def hello(**fields: object) -> str:
    return json.dumps({"type": "hello", "stream": "call-17", "sample_rate": 16000, **fields})


def open_session(config: IngestConfig | None = None, header: str | None = None, **fields: object) -> IngestSession:
    session = IngestSession(config or IngestConfig(), header)
    assert session.check_handshake() is None
    assert isinstance(session.accept_hello(hello(**fields)), Hello)
    assert session.check_capacity(0) is None
    session.opened("call-17", now=100.0)
    return session


def test_a_good_hello_opens_and_audio_is_decoded_per_format() -> None:
    session = open_session(format="s16le", channels=2)
    assert session.state is SessionState.OPEN and session.stream_id == "call-17"
    pcm = np.array([[16384, -32768], [1, 0]], dtype="<i2")
    decision = session.receive(pcm.tobytes())
    assert isinstance(decision, Audio)
    assert decision.samples.shape == (2, 2) and decision.samples.dtype == np.float32
    assert decision.samples.tolist() == [[0.5, -1.0], [1 / 32768, 0.0]]
    assert dict(decision.counts) == {"frames": 1, "bytes": 8}
    f32 = open_session(format="f32le").receive(np.array([0.25, -0.5], dtype="<f4").tobytes())
    assert isinstance(f32, Audio) and f32.samples[:, 0].tolist() == [0.25, -0.5]
    # An empty binary message is a frame of no audio, not an error.
    empty = session.receive(b"")
    assert isinstance(empty, Audio) and empty.samples.shape == (0, 2)


def test_end_ends_and_other_text_is_dropped_and_reported_once() -> None:
    session = open_session()
    first, second = session.receive('{"type": "ping"}'), session.receive("not json")
    assert isinstance(first, Dropped) and isinstance(second, Dropped)
    assert (first.code, first.count, first.report) == ("bad_message", 1, True)
    assert (second.count, second.report) == (2, False)
    assert dict(first.counts) == {"bad_messages": 1}
    assert isinstance(session.receive(' {"type" : "end"} '), End)
    assert session.state is SessionState.ENDED
    with pytest.raises(RuntimeError):
        session.receive(b"\0\0")


def test_partial_frames_are_dropped_and_oversized_ones_refused() -> None:
    session = open_session(IngestConfig(max_frame_bytes=64), format="f32le", channels=2)
    partial = session.receive(b"\0" * 12)  # 1.5 frames of 8 bytes
    assert isinstance(partial, Dropped) and partial.code == "bad_frame" and partial.report
    assert "12 bytes is not a whole number of 8-byte sample frames" in partial.message
    assert dict(partial.counts) == {"bad_frames": 1, "bad_frame_bytes": 12}
    assert isinstance(session.receive(b"\0" * 64), Audio)
    big = session.receive(b"\0" * 72)
    assert isinstance(big, Refuse) and big.code == CLOSE_TOO_BIG
    assert big.reason == "frame of 72 bytes exceeds the limit of 64" and dict(big.counts) == {"oversized_frames": 1}


@pytest.mark.parametrize(
    ("first", "code", "fragment"),
    [
        (b"\0\0", CLOSE_UNSUPPORTED, "not binary audio"),
        ("{", CLOSE_PROTOCOL, "not valid JSON"),
        (hello(format="mp3"), CLOSE_UNSUPPORTED, "format 'mp3' is not supported (use s16le or f32le)"),
        (hello(sample_rate=500), CLOSE_UNSUPPORTED, "outside 1000-384000"),
        (hello(stream="rtp:1"), CLOSE_UNSUPPORTED, "reserved"),
        (hello(stream="twilio:CA1:inbound"), CLOSE_UNSUPPORTED, "reserved"),
        (hello(stream="audiosocket:0a1b"), CLOSE_UNSUPPORTED, "reserved"),
        (hello(stream="fork:7f1d-42"), CLOSE_UNSUPPORTED, "reserved"),
        (hello(channels=9), CLOSE_UNSUPPORTED, "channels 9"),
    ],
)
def test_bad_hellos_are_refused_with_the_documented_code(first: str | bytes, code: int, fragment: str) -> None:
    session = IngestSession(IngestConfig())
    refusal = session.accept_hello(first)
    assert isinstance(refusal, Refuse) and refusal.code == code and fragment in refusal.reason
    assert dict(refusal.counts) == {"bad_hello": 1} and refusal.log == "hello"
    assert session.state is SessionState.REFUSED


def test_tokens_from_the_header_or_the_hello() -> None:
    config = IngestConfig(token="s3cret")
    # A wrong header is refused before the hello is read.
    refusal = IngestSession(config, "nope").check_handshake()
    assert isinstance(refusal, Refuse) and (refusal.code, refusal.reason) == (CLOSE_POLICY, "invalid token")
    assert dict(refusal.counts) == {"refused_token": 1}
    # A right header: the hello needs no token.
    assert isinstance(IngestSession(config, "s3cret").accept_hello(hello()), Hello)
    # No header: the hello's token decides.
    assert isinstance(IngestSession(config, None).accept_hello(hello(token="s3cret")), Hello)
    missing = IngestSession(config, None).accept_hello(hello())
    assert isinstance(missing, Refuse) and missing.code == CLOSE_POLICY
    # No server token: anything goes.
    assert isinstance(IngestSession(IngestConfig(), "whatever").accept_hello(hello()), Hello)


def test_capacity_and_open_failures_say_try_later() -> None:
    session = IngestSession(IngestConfig(max_streams=2))
    assert isinstance(session.accept_hello(hello()), Hello)
    refusal = session.check_capacity(2)
    assert isinstance(refusal, Refuse) and refusal.code == CLOSE_TRY_LATER and "max 2" in refusal.reason
    assert dict(refusal.counts) == {"refused_busy": 1}
    assert IngestSession(IngestConfig()).hello_timed_out().code == CLOSE_PROTOCOL
    long = IngestSession(IngestConfig()).open_failed("x" * 300)
    assert long.code == CLOSE_TRY_LATER and len(long.reason) == 120


def test_the_speed_cap_allows_the_burst_then_holds_to_max_speed() -> None:
    session = open_session(IngestConfig(max_speed=8.0, burst_s=2.0))
    session.pushed(16000 * 2)  # the 2 s burst, at once
    assert session.pace_delay(now=100.0) == 0.0
    session.pushed(16000 * 8)  # 8 s more: at 8x, that is 1 s of wall time
    assert session.pace_delay(now=100.0) == pytest.approx(1.0)
    assert session.pace_delay(now=100.5) == pytest.approx(0.5)
    assert session.pace_delay(now=101.0) == 0.0
    uncapped = open_session(IngestConfig(max_speed=None))
    uncapped.pushed(16000 * 100)
    assert uncapped.pace_delay(now=100.0) == 0.0


def test_calls_out_of_order_are_bugs_not_silent() -> None:
    session = IngestSession(IngestConfig())
    with pytest.raises(RuntimeError):
        session.receive(b"")
    with pytest.raises(RuntimeError):
        session.opened("x", 0.0)
