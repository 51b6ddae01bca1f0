"""Asterisk AudioSocket: the pure session, a real TCP listener, the command line, and fuzz.

The Asterisk side is played by :class:`AsteriskLeg`, written from the
published protocol (docs.asterisk.org, "AudioSocket"): a 3-byte header (type,
big-endian 16-bit length), then the payload; ``0x01`` carries the call's UUID
as 16 binary bytes, ``0x10``/``0x12`` signed linear 16-bit little-endian mono
at 8/16 kHz, ``0x03`` one DTMF digit, ``0x00`` hangs up. It packs its own
headers with :mod:`struct` rather than using the session module's helper, so
the two sides are independent readings of the specification.
"""

from __future__ import annotations

import argparse
import random
import signal
import socket
import struct
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

from serstream.cli import UserError, _audiosocket_sources, build_parser
from serstream.core.vad import VadConfig
from serstream.inference.session import EmotionModel
from serstream.monitor import Monitor, MonitorConfig, SourceError
from serstream.sources.audiosocket import (
    AudioSocketConfig,
    AudioSocketSource,
    _peer_allowed,
    parse_allow,
    parse_listen_spec,
)
from serstream.sources.audiosocket_session import (
    AUDIO_RATES,
    CAUSES,
    Audio,
    AudioSocketSession,
    Ended,
    Rejected,
    SessionConfig,
    Start,
    message,
)
from serstream.sources.base import Source
from tests.audio import espeak_sentences, speech_with_pauses
from tests.conftest import require_tools
from tests.e2e.helpers import Background
from tests.net.conftest import Collector, wait_until

CALL = uuid.UUID("0f8fad5b-d9cb-469f-a165-70867728950e")
OTHER = uuid.UUID("7c9e6679-7425-40de-944b-e07fc1f90ae7")


# --------------------------------------------------------------------------- the Asterisk side, from the spec


def frame(kind: int, payload: bytes = b"") -> bytes:
    return struct.pack(">BH", kind, len(payload)) + payload


def slin(audio: np.ndarray) -> bytes:
    """float samples -> signed linear 16-bit little-endian."""
    return (np.clip(audio, -1.0, 1.0) * 32767).astype("<i2").tobytes()


class AsteriskLeg:
    """One AudioSocket() connection as Asterisk makes it: UUID, 20 ms audio frames, hangup."""

    def __init__(self, port: int, call: uuid.UUID = CALL) -> None:
        self.call = call
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_uuid(self) -> None:
        self.send(frame(0x01, self.call.bytes))

    def send_audio(self, audio: np.ndarray, kind: int = 0x10, speed: float = 4.0) -> int:
        """``audio`` at the type's rate in 20 ms frames, ``speed`` times real time; the frames sent."""
        rate = AUDIO_RATES[kind]
        step = rate // 50
        sent = 0
        started = time.monotonic()
        for start in range(0, audio.size, step):
            self.send(frame(kind, slin(audio[start:start + step])))
            sent += 1
            ahead = sent * 0.02 / speed - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
        return sent

    def hangup(self) -> None:
        self.send(frame(0x00))

    def closed_by_server(self, timeout: float = 10.0) -> bool:
        """True once the server closed its side (recv gives EOF or a reset)."""
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()


# --------------------------------------------------------------------------- the pure session


def run(session: AudioSocketSession, data: bytes, chunks: list[int] | None = None, now: float = 0.0) -> list[Any]:
    """Feed ``data`` in pieces of the given sizes (all at once when None)."""
    out: list[Any] = []
    if chunks is None:
        return session.feed(data, now)
    pos = 0
    for n in chunks:
        out += session.feed(data[pos:pos + n], now)
        pos += n
    out += session.feed(data[pos:], now)
    return out


def a_call() -> bytes:
    """Every frame type once: UUID, audio at each rate, DTMF, an unknown type, odd audio, hangup."""
    parts = [frame(0x01, CALL.bytes)]
    for kind in AUDIO_RATES:
        parts.append(frame(kind, struct.pack("<4h", 1, -1, 32767, -32768)))
    parts += [frame(0x03, b"7"), frame(0x42, b"xyz"), frame(0x10, b"\x01\x02\x03"), frame(0x10, b""),
              frame(0x00)]
    return b"".join(parts)


def summary(outputs: list[Any]) -> list[tuple[Any, ...]]:
    rows: list[tuple[Any, ...]] = []
    for o in outputs:
        if isinstance(o, Audio):
            rows.append(("audio", o.sample_rate, o.samples.tolist()))
        elif isinstance(o, Start):
            rows.append(("start", str(o.call_uuid), o.sample_rate, o.restart))
        elif isinstance(o, Rejected):
            rows.append(("rejected", o.cause, o.count))
        else:
            rows.append(("ended", o.reason, o.cause))
    return rows


def test_every_frame_type() -> None:
    session = AudioSocketSession(SessionConfig(), 0.0)
    out = summary(session.feed(a_call(), 1.0))
    values = [1 / 32768, -1 / 32768, 32767 / 32768, -1.0]
    expected: list[tuple[Any, ...]] = []
    for i, rate in enumerate(AUDIO_RATES.values()):
        expected += [("start", str(CALL), rate, i > 0), ("audio", rate, pytest.approx(values))]
    expected += [("rejected", "unknown_type", 1), ("rejected", "odd_length", 1), ("ended", "hangup", None)]
    assert out == expected
    assert session.dtmf == 1 and session.call_uuid == CALL and session.ended
    assert session.rejects == {"unknown_type": 1, "odd_length": 1}
    assert session.samples == 4 * len(AUDIO_RATES)
    assert session.feed(frame(0x10, b"\0\0"), 2.0) == []  # nothing after the end


def test_split_reads_at_every_byte_boundary() -> None:
    data = a_call()
    whole = summary(AudioSocketSession(SessionConfig(), 0.0).feed(data, 0.0))
    for cut in range(1, len(data)):
        assert summary(run(AudioSocketSession(SessionConfig(), 0.0), data, [cut])) == whole, cut
    one_by_one = run(AudioSocketSession(SessionConfig(), 0.0), data, [1] * len(data))
    assert summary(one_by_one) == whole


@pytest.mark.parametrize(
    ("data", "cause", "text"),
    [
        (frame(0x10, b"\0\0"), "audio_before_uuid", "before the UUID"),
        (frame(0x01, b"short"), "bad_uuid", "5 bytes"),
        (frame(0x01, CALL.bytes) + frame(0x01, OTHER.bytes), "uuid_changed", str(OTHER)),
        (frame(0x01, CALL.bytes) + frame(0xFF, b"\x01"), "peer_error", "hangup of calling party"),
        (frame(0x01, CALL.bytes) + frame(0xFF), "peer_error", "no code"),
    ],
)
def test_protocol_errors_end_the_connection(data: bytes, cause: str, text: str) -> None:
    session = AudioSocketSession(SessionConfig(), 0.0)
    out = session.feed(data + frame(0x10, b"\0\0"), 0.0)
    ended = out[-1]
    assert isinstance(ended, Ended) and ended.cause == cause and text in ended.message
    assert session.rejects == {cause: 1}
    assert not any(isinstance(o, Audio) for o in out)


def test_repeated_uuid_is_fine() -> None:
    session = AudioSocketSession(SessionConfig(), 0.0)
    out = session.feed(frame(0x01, CALL.bytes) * 2 + frame(0x10, b"\0\0"), 0.0)
    assert [type(o) for o in out] == [Start, Audio] and not session.rejects


def test_length_beyond_the_data_is_truncated() -> None:
    session = AudioSocketSession(SessionConfig(), 0.0)
    session.feed(frame(0x01, CALL.bytes) + struct.pack(">BH", 0x10, 1000) + b"\0" * 10, 0.0)
    assert session.pending_bytes == 13
    (ended,) = session.eof(1.0)
    assert (ended.reason, ended.cause) == ("truncated", "truncated")
    assert "says 1000 payload bytes, 10 came" in ended.message
    clean = AudioSocketSession(SessionConfig(), 0.0)
    clean.feed(frame(0x01, CALL.bytes), 0.0)
    assert clean.eof(1.0) == [Ended("closed")] and not clean.rejects


def test_timeouts_half_header_idle_and_no_uuid() -> None:
    cfg = SessionConfig(idle_timeout_s=10.0, partial_timeout_s=2.0)
    stalled = AudioSocketSession(cfg, 0.0)
    stalled.feed(frame(0x01, CALL.bytes) + b"\x10\x01", 1.0)  # half a header
    assert stalled.poll(2.9) == []
    (ended,) = stalled.poll(3.0)
    assert ended.cause == "stalled" and "2 of the 3 header bytes" in ended.message

    idle = AudioSocketSession(cfg, 0.0)
    idle.feed(frame(0x01, CALL.bytes), 0.0)
    for t in range(1, 30):  # audio keeps it alive
        idle.feed(frame(0x10, b"\0\0" * 160), float(t))
        assert idle.poll(t + 9.9) == []
    (ended,) = idle.poll(29 + 10.0)
    assert (ended.reason, ended.cause) == ("idle", "idle")

    silent = AudioSocketSession(cfg, 0.0)
    (ended,) = silent.poll(10.0)
    assert ended.cause == "no_uuid" and silent.rejects == {"no_uuid": 1}


def test_speed_cap_pauses_reading_without_timing_out() -> None:
    cfg = SessionConfig(idle_timeout_s=1.0, partial_timeout_s=1.0, max_speed=2.0, burst_s=1.0)
    session = AudioSocketSession(cfg, 0.0)
    three_seconds = frame(0x01, CALL.bytes) + frame(0x10, b"\0\0" * 8000) * 3
    session.feed(three_seconds + b"\x10", 0.0)  # and half a header
    assert session.pace_delay(0.0) == pytest.approx(1.0)  # (3 s - 1 s burst) / 2x
    assert session.poll(1.5) == []  # the pause does not count as silence
    assert session.pace_delay(1.0) == 0.0
    assert [o.cause for o in session.poll(2.0)] == ["stalled"]
    uncapped = AudioSocketSession(SessionConfig(max_speed=None), 0.0)
    uncapped.feed(three_seconds, 0.0)
    assert uncapped.pace_delay(0.0) == 0.0


def test_hold_keeps_the_timeouts_waiting() -> None:
    session = AudioSocketSession(SessionConfig(idle_timeout_s=1.0, partial_timeout_s=1.0), 0.0)
    session.feed(frame(0x01, CALL.bytes) + b"\x10", 0.0)
    session.hold(3.0)
    assert session.poll(3.9) == []
    assert [o.cause for o in session.poll(4.0)] == ["stalled"]


def test_config_and_message_errors_are_one_line() -> None:
    for bad in ({"idle_timeout_s": 0}, {"partial_timeout_s": -1}, {"max_speed": 0.5}, {"burst_s": -1}):
        with pytest.raises(ValueError) as info:
            SessionConfig(**bad)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="16-bit length"):
        message(0x10, b"\0" * 65536)
    assert message(0x10, b"ab") == frame(0x10, b"ab")


# --------------------------------------------------------------------------- fuzz: 100,000 mutated streams


def oracle(data: bytes, closed: bool) -> tuple[Counter[str], int, str | None]:
    """What the specification says a receiver must make of ``data``: (causes, samples, how it ended)."""
    causes: Counter[str] = Counter()
    samples, pos, call = 0, 0, None
    while len(data) - pos >= 3:
        kind, length = data[pos], (data[pos + 1] << 8) | data[pos + 2]
        if pos + 3 + length > len(data):
            break
        payload = data[pos + 3:pos + 3 + length]
        pos += 3 + length
        if kind == 0x00:
            return causes, samples, "hangup"
        if kind == 0xFF:
            causes["peer_error"] += 1
            return causes, samples, "error"
        if kind == 0x01:
            if length != 16:
                causes["bad_uuid"] += 1
                return causes, samples, "protocol error"
            if call is not None and payload != call:
                causes["uuid_changed"] += 1
                return causes, samples, "protocol error"
            call = payload
        elif kind in AUDIO_RATES:
            if call is None:
                causes["audio_before_uuid"] += 1
                return causes, samples, "protocol error"
            if length % 2:
                causes["odd_length"] += 1
            else:
                samples += length // 2
        elif kind != 0x03:
            causes["unknown_type"] += 1
    if pos < len(data):
        causes["truncated"] += 1
        return causes, samples, "truncated" if closed else None
    return causes, samples, "closed" if closed else None


def valid_stream(rng: random.Random) -> bytes:
    parts = [frame(0x01, rng.randbytes(16))]
    for _ in range(rng.randint(0, 5)):
        kind = rng.choice((*AUDIO_RATES, 0x03))
        parts.append(frame(kind, b"5" if kind == 0x03 else rng.randbytes(2 * rng.randint(0, 24))))
    if rng.random() < 0.5:
        parts.append(frame(rng.choice((0x00, 0xFF)), b"" if rng.random() < 0.5 else b"\x02"))
    return b"".join(parts)


def mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(7)
        at = rng.randrange(len(buf) + 1)
        if op == 0 and buf:
            buf[min(at, len(buf) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1:
            buf[at:at] = rng.randbytes(rng.randint(1, 8))
        elif op == 2:
            del buf[at:at + rng.randint(1, 8)]
        elif op == 3:
            del buf[at:]
        elif op == 4 and buf:
            buf[min(at, len(buf) - 1)] = rng.randrange(256)  # often a type or a length byte
        elif op == 5:
            buf[at:at] = struct.pack(">BH", rng.randrange(256), rng.randrange(65536))
        else:
            buf[at:at] = buf[:rng.randint(0, 40)]
    return bytes(buf)


def test_fuzz_100k_mutated_streams_no_crash_every_rejection_counted() -> None:
    rng = random.Random(20_240_14)
    cfg = SessionConfig(max_speed=None)
    seen: Counter[str] = Counter()
    for i in range(100_000):
        data = mutate(rng, valid_stream(rng))
        session = AudioSocketSession(cfg, 0.0)
        outputs: list[Any] = []
        pos = 0
        while pos < len(data):
            n = rng.randint(1, 48)
            outputs += session.feed(data[pos:pos + n], 0.0)
            pos += n
        outputs += session.eof(0.0)
        causes, samples, how = oracle(data, closed=True)
        ends = [o for o in outputs if isinstance(o, Ended)]
        assert len(ends) == 1 and outputs[-1] is ends[0], (i, data)
        counted = Counter(o.cause for o in outputs if isinstance(o, Rejected))
        counted.update(o.cause for o in ends if o.cause)
        assert counted == causes == Counter(session.rejects), (i, data)
        assert set(counted) <= set(CAUSES)
        assert ends[0].reason == how, (i, data)
        assert sum(o.samples.size for o in outputs if isinstance(o, Audio)) == samples == session.samples
        seen.update(counted)
    # The mutations reached every cause a byte stream can produce.
    assert set(seen) == set(CAUSES) - {"stalled", "idle", "no_uuid"}, seen


# --------------------------------------------------------------------------- a real listener, in process


@pytest.fixture(scope="module")
def model(factory_model: Path) -> EmotionModel:
    return EmotionModel.load(factory_model, device="cpu", threads=1)


@pytest.fixture()
def monitor(model: EmotionModel) -> Iterator[tuple[Monitor, Collector]]:
    collector = Collector()
    mon = Monitor(model, MonitorConfig(vad=VadConfig(aggressiveness=2), stats_interval_s=0.5), collector)
    mon.start()
    yield mon, collector
    mon.stop(drain=False)


def listener(mon: Monitor, role: str | None = None, **session: Any) -> AudioSocketSource:
    options = {"idle_timeout_s": 5.0, "partial_timeout_s": 0.5, "max_speed": 8.0, **session}
    source = AudioSocketSource(mon, "127.0.0.1", 0, role, AudioSocketConfig(session=SessionConfig(**options),
                                                                          poll_interval_s=0.02))
    source.start()
    return source


def talk(port: int, call: uuid.UUID, audio: np.ndarray, kind: int = 0x10, speed: float = 4.0) -> AsteriskLeg:
    leg = AsteriskLeg(port, call)
    leg.send_uuid()
    leg.send_audio(audio, kind, speed)
    leg.hangup()
    return leg


def test_paired_legs_become_one_call_with_roles(monitor: tuple[Monitor, Collector]) -> None:
    mon, collector = monitor
    caller, callee = listener(mon, "caller"), listener(mon, "callee")
    assert isinstance(caller, Source)
    speech8 = speech_with_pauses(((0.3, 1.6), (0.6, 1.4)), tail_s=1.0, rate=8000, seed=3)
    speech16 = speech_with_pauses(((0.5, 1.8),), tail_s=1.0, rate=16000, seed=4)
    legs: list[AsteriskLeg] = []
    threads = [
        threading.Thread(target=lambda: legs.append(talk(caller.port, CALL, speech8, 0x10))),
        threading.Thread(target=lambda: legs.append(talk(callee.port, CALL, speech16, 0x12))),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    ids = {"caller": f"audiosocket:{CALL}:caller", "callee": f"audiosocket:{CALL}:callee"}
    wait_until(lambda: all(collector.of(i, "stream", state="closed") for i in ids.values()), 30, "both legs closed")
    for leg in legs:
        assert leg.closed_by_server()
        leg.close()
    caller.stop()
    callee.stop()
    for role, stream_id in ids.items():
        (opened,) = collector.of(stream_id, "stream", state="open")
        rate = 8000 if role == "caller" else 16000
        assert (opened["source"], opened["codec"], opened["sample_rate"]) == ("audiosocket", "pcm_s16le", rate)
        assert (opened["call"], opened["role"]) == (str(CALL), role)
        (closed,) = collector.of(stream_id, "stream", state="closed")
        assert closed["reason"] == "hangup" and closed["call"] == str(CALL)
        assert collector.of(stream_id, "speech", state="start") and collector.of(stream_id, "speech", state="end")
        finals = collector.of(stream_id, "emotion", kind="final")
        assert finals and all((e["call"], e["role"]) == (str(CALL), role) for e in finals)
        assert not collector.of(stream_id, "error")
    assert caller.stats()["closed"][ids["caller"]]["samples"] == speech8.size
    assert callee.stats()["closed"][ids["callee"]]["samples"] == speech16.size
    assert caller.stats()["hangups"] == 1 and caller.stats()["active"] == 0


def test_trouble_is_counted_once_per_cause_and_other_calls_go_on(monitor: tuple[Monitor, Collector]) -> None:
    mon, collector = monitor
    source = listener(mon, idle_timeout_s=0.8)
    good_audio = speech_with_pauses(((0.3, 1.6), (0.5, 1.5)), tail_s=1.0, rate=8000, seed=5)
    good: list[AsteriskLeg] = []
    runner = threading.Thread(target=lambda: good.append(talk(source.port, CALL, good_audio, 0x10, speed=2.0)))
    runner.start()

    def bad(call: uuid.UUID, tail: bytes, close: bool = False) -> AsteriskLeg:
        leg = AsteriskLeg(source.port, call)
        leg.send_uuid()
        leg.send(frame(0x10, slin(np.zeros(160, np.float32))) + tail)
        if close:
            leg.sock.shutdown(socket.SHUT_WR)
        return leg

    calls = [uuid.uuid4() for _ in range(8)]
    legs = [
        bad(calls[0], b"\x10\x01"),  # half a header, then a stall
        bad(calls[1], b"\x10\x01"),  # the same cause again: counted, not reported again
        bad(calls[2], b""),  # never hangs up: idle
        bad(calls[3], struct.pack(">BH", 0x10, 1000) + b"\0" * 10, close=True),  # length beyond the data
        bad(calls[4], frame(0x77, b"junk") + frame(0x77, b"") + frame(0x03, b"#") + frame(0x00)),  # unknown type
    ]
    for leg in legs:
        assert leg.closed_by_server(10)
        leg.close()
    runner.join(30)
    good_id = f"audiosocket:{CALL}"
    wait_until(lambda: collector.of(good_id, "stream", state="closed"), 20, "the good call to end")
    assert good[0].closed_by_server()
    stats = source.stats()
    source.stop()

    reasons = {str(c): collector.of(f"audiosocket:{c}", "stream", state="closed")[0]["reason"] for c in calls[:5]}
    assert reasons == {str(calls[0]): "stalled", str(calls[1]): "stalled", str(calls[2]): "idle",
                       str(calls[3]): "truncated", str(calls[4]): "hangup"}
    assert stats["rejects"] == {"stalled": 2, "idle": 1, "truncated": 1, "unknown_type": 2}
    assert stats["dtmf"] == 1 and stats["active"] == 0 and stats["connections"] == 6
    errors = [e for e in collector.of(type_="error") if e["stream"] != good_id]
    assert sorted(e["code"] for e in errors) == ["idle", "stalled", "truncated", "unknown_type"]
    assert all(e["count"] == 1 and "\n" not in e["message"] for e in errors)
    drops = mon.stats()["drops"]
    assert drops["audiosocket_rejected_stalled"] == 2 and drops["audiosocket_rejected_unknown_type"] == 2
    # The well-behaved call heard none of it.
    assert collector.of(good_id, "stream", state="closed")[0]["reason"] == "hangup"
    assert collector.of(good_id, "emotion", kind="final") and not collector.of(good_id, "error")


def test_a_full_ring_pauses_reading_instead_of_overwriting(model: EmotionModel) -> None:
    """The monitor is not started, so nothing drains the ring: the listener must stop reading."""
    mon = Monitor(model, MonitorConfig(ring_seconds=0.5), Collector())
    source = listener(mon, max_speed=None, idle_timeout_s=30.0)
    leg = AsteriskLeg(source.port)
    leg.send_uuid()
    errors: list[BaseException] = []

    def flood() -> None:
        try:
            leg.send_audio(np.zeros(8000 * 30, np.float32), 0x10, speed=1000.0)
        except OSError as exc:  # the listener closed the connection at stop
            errors.append(exc)

    sender = threading.Thread(target=flood)
    sender.start()
    wait_until(lambda: source.stats()["backpressure_waits"] >= 5, 10, "the listener to pause the connection")
    stats = source.stats()
    ring_drops = mon.stats()["drops"]["audio_samples"]
    source.stop()
    sender.join(15)
    leg.close()
    assert ring_drops == 0
    # What was read fits the half-second ring (4000 samples) with its last quarter free.
    assert 0 < stats["samples"] <= 4000 and stats["active"] == 1
    assert stats["bytes"] < 10_000  # of the 480,000 sent: the rest waits in the kernel's buffers, unread
    assert not sender.is_alive() and len(errors) <= 1


def test_connection_caps_refuse_and_count(monitor: tuple[Monitor, Collector]) -> None:
    mon, collector = monitor
    source = AudioSocketSource(mon, "127.0.0.1", 0, None, AudioSocketConfig(max_connections=2, max_per_address=5))
    source.start()
    legs = [AsteriskLeg(source.port, uuid.uuid4()) for _ in range(2)]
    for leg in legs:
        leg.send_uuid()
    wait_until(lambda: source.stats()["active"] == 2, 5, "two connections")
    extra = AsteriskLeg(source.port)
    assert extra.closed_by_server(5)
    for leg in [*legs, extra]:
        leg.close()
    wait_until(lambda: source.stats()["active"] == 0, 5, "the connections to close")
    per_address = AudioSocketSource(mon, "127.0.0.1", 0, None, AudioSocketConfig(max_per_address=1))
    per_address.start()
    first, second = AsteriskLeg(per_address.port), AsteriskLeg(per_address.port)
    assert second.closed_by_server(5)
    first.close()
    second.close()
    source.stop()
    per_address.stop()
    assert source.stats()["refused"]["refused_busy"] == 1
    assert per_address.stats()["refused"]["refused_busy_address"] == 1
    codes = sorted(e["code"] for e in collector.of(type_="error"))
    assert codes == ["refused_busy", "refused_busy_address"]


def test_fuzz_through_the_real_socket(monitor: tuple[Monitor, Collector]) -> None:
    mon, collector = monitor
    source = listener(mon, idle_timeout_s=1.0, partial_timeout_s=0.5, max_speed=None)
    good_audio = speech_with_pauses(((0.3, 1.6),), tail_s=1.0, rate=16000, seed=6)
    good: list[AsteriskLeg] = []
    runner = threading.Thread(target=lambda: good.append(talk(source.port, CALL, good_audio, 0x12, speed=2.0)))
    runner.start()
    rng = random.Random(14)
    expected: Counter[str] = Counter()
    for _ in range(300):
        data = mutate(rng, valid_stream(rng))
        causes, _samples, how = oracle(data, closed=True)
        expected.update(causes)
        with socket.create_connection(("127.0.0.1", source.port), timeout=10) as sock:
            try:
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)
                sock.recv(1)  # wait for the server to finish with it
            except (ConnectionResetError, BrokenPipeError):
                pass
    runner.join(30)
    wait_until(lambda: collector.of(f"audiosocket:{CALL}", "stream", state="closed"), 20, "the good call to end")
    wait_until(lambda: source.stats()["active"] == 0, 10, "every fuzz connection closed")
    stats = source.stats()
    assert source.error is None and source._thread is not None and source._thread.is_alive()
    source.stop()
    assert Counter(stats["rejects"]) == expected
    assert stats["connections"] == 301
    good_id = f"audiosocket:{CALL}"
    assert collector.of(good_id, "stream", state="closed")[0]["reason"] == "hangup"
    assert collector.of(good_id, "emotion", kind="final") and not collector.of(good_id, "error")


# --------------------------------------------------------------------------- options and security


def test_listen_spec_and_allow_parsing() -> None:
    assert parse_listen_spec("127.0.0.1:9092=caller") == parse_listen_spec("127.0.0.1:9092=caller")
    spec = parse_listen_spec("[::1]:9093=callee")
    assert (spec.host, spec.port, spec.role) == ("::1", 9093, "callee")
    assert parse_listen_spec("9092").host == "127.0.0.1"
    for bad in ("127.0.0.1:99999", "::1:9092", "127.0.0.1:9092=Caller!", "host:"):
        with pytest.raises(ValueError) as info:
            parse_listen_spec(bad)
        assert "\n" not in str(info.value) and bad in str(info.value)
    nets = parse_allow(["10.0.0.5", "192.168.1.0/24"])
    assert _peer_allowed("10.0.0.5", nets) and _peer_allowed("192.168.1.77", nets)
    assert _peer_allowed("127.0.0.1", ()) and _peer_allowed("::ffff:127.0.0.1", ())
    assert not _peer_allowed("10.0.0.6", nets) and not _peer_allowed("8.8.8.8", ())
    with pytest.raises(ValueError, match="--audiosocket-allow"):
        parse_allow(["10.0.0.0/33"])


def _outward_address() -> str | None:
    """This machine's address on its default route (a UDP connect sends nothing), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 9))
        except OSError:
            return None
        address = str(probe.getsockname()[0])
    return None if address.startswith("127.") else address


def test_peers_outside_the_allow_list_are_closed_and_counted(monitor: tuple[Monitor, Collector]) -> None:
    mon, collector = monitor
    address = _outward_address()
    if address is None:
        pytest.skip("needs a non-loopback IPv4 address on this machine")
    with pytest.raises(ValueError, match="--audiosocket-allow"):
        AudioSocketSource(mon, address, 0)
    config = AudioSocketConfig(allow=parse_allow(["198.51.100.0/24"]))  # a documentation network: not us
    source = AudioSocketSource(mon, address, 0, None, config)
    source.start()
    try:
        for _ in range(2):
            with socket.create_connection((address, source.port), timeout=5) as sock:
                sock.sendall(frame(0x01, CALL.bytes) + frame(0x10, b"\0\0" * 160))
                try:
                    assert sock.recv(1) == b""
                except ConnectionResetError:
                    pass
    finally:
        source.stop()
    stats = source.stats()
    assert stats["refused"]["refused_address"] == 2 and stats["connections"] == 0 and stats["bytes"] == 0
    (error,) = collector.of(source.label, "error")
    assert error["code"] == "refused_address" and address in error["message"]
    assert not collector.of(type_="stream")


def test_command_line_refuses_unauthenticated_wide_listeners(model: EmotionModel, free_port: int) -> None:
    mon = Monitor(model, MonitorConfig(), lambda event: None)

    def sources(*argv: str) -> list[Source]:
        args: argparse.Namespace = build_parser().parse_args(["serve", *argv])
        return _audiosocket_sources(mon, args)

    with pytest.raises(UserError) as info:
        sources("--audiosocket", f"0.0.0.0:{free_port}")
    assert "--audiosocket-allow" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(UserError, match="idle timeout"):
        sources("--audiosocket", f"127.0.0.1:{free_port}", "--audiosocket-idle-timeout", "0")
    with pytest.raises(UserError, match="bad AudioSocket role"):
        sources("--audiosocket", f"127.0.0.1:{free_port}=NOPE")
    (bound,) = sources("--audiosocket", f"127.0.0.1:{free_port}=caller")
    try:
        with pytest.raises(UserError, match="already in use"):
            sources("--audiosocket", f"127.0.0.1:{free_port + 1 if free_port < 65535 else 1}",
                    "--audiosocket", f"127.0.0.1:{free_port}")
        with pytest.raises(SourceError, match="already in use"):
            AudioSocketSource(mon, "127.0.0.1", free_port)
    finally:
        bound.stop()
    assert sources() == []


# --------------------------------------------------------------------------- end to end: the command


def test_serve_command_end_to_end_two_parties(factory_model: Path, tmp_path: Path) -> None:
    """`serstream serve --audiosocket ...=caller --audiosocket ...=callee`: espeak speech in, events out."""
    require_tools("espeak-ng", "sox")
    caller_wav = espeak_sentences(tmp_path / "caller.wav", ["I would like to check on my order please."], rate=8000)
    callee_wav = espeak_sentences(tmp_path / "callee.wav", ["Of course, let me look that up for you."],
                                  rate=16000)
    import soundfile as sf

    caller_audio = sf.read(str(caller_wav), dtype="float32")[0]
    callee_audio = sf.read(str(callee_wav), dtype="float32")[0]
    ports = []
    for _ in range(2):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            ports.append(probe.getsockname()[1])
    proc = Background(["serve", "--model", str(factory_model), "--port", "0", "--json", "--threads", "1",
                       "--audiosocket", f"127.0.0.1:{ports[0]}=caller",
                       "--audiosocket", f"127.0.0.1:{ports[1]}=callee", "--audiosocket-max-speed", "8"])
    try:
        proc.wait_for(lambda: sum(proc.stderr_has(f"AudioSocket on 127.0.0.1:{p}") for p in ports) == 2, 60,
                      "the AudioSocket listeners")
        call = uuid.uuid4()
        legs: list[AsteriskLeg] = []
        threads = [threading.Thread(target=lambda: legs.append(talk(ports[0], call, caller_audio, 0x10))),
                   threading.Thread(target=lambda: legs.append(talk(ports[1], call, callee_audio, 0x12)))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        ids = {"caller": f"audiosocket:{call}:caller", "callee": f"audiosocket:{call}:callee"}

        def of(stream: str, type_: str, **fields: Any) -> list[dict[str, Any]]:
            return [e for e in proc.json_events() if e["stream"] == stream and e["type"] == type_
                    and all(e.get(k) == v for k, v in fields.items())]

        proc.wait_for(lambda: all(of(i, "stream", state="closed") for i in ids.values()), 30, "both legs closed")
        for leg in legs:
            leg.close()
        proc.proc.send_signal(signal.SIGINT)
        assert proc.finish(30) == 0
    finally:
        proc.kill()
    for role, stream_id in ids.items():
        (opened,) = of(stream_id, "stream", state="open")
        assert (opened["source"], opened["call"], opened["role"]) == ("audiosocket", str(call), role)
        assert opened["sample_rate"] == (8000 if role == "caller" else 16000)
        assert of(stream_id, "speech", state="start") and of(stream_id, "speech", state="end")
        finals = of(stream_id, "emotion", kind="final")
        assert finals and all((e["call"], e["role"]) == (str(call), role) for e in finals)
        assert of(stream_id, "stream", state="closed")[0]["reason"] == "hangup"
