"""serstream.core.parties (the one place multi-channel audio becomes party streams) and the split hello."""

from __future__ import annotations

import json

import numpy as np
import pytest

from serstream.core.parties import DEFAULT_ROLES, parse_roles, plan_parties, take_channel
from serstream.sources.ingest_session import (
    CLOSE_PROTOCOL,
    CLOSE_UNSUPPORTED,
    HelloError,
    IngestConfig,
    IngestSession,
    Refuse,
    parse_hello,
)


def test_two_channels_are_left_and_right_of_one_call_by_default() -> None:
    split = plan_parties("file:call.wav", 2)
    assert split.call == "file:call.wav"
    assert [(p.channel, p.role, p.stream) for p in split.parties] == [
        (0, "left", "file:call.wav:left"), (1, "right", "file:call.wav:right")]
    assert DEFAULT_ROLES == ("left", "right")
    assert plan_parties("x", 3).stream_ids == ("x:ch1", "x:ch2", "x:ch3")


def test_roles_and_call_can_be_named() -> None:
    split = plan_parties("c-17", 2, "caller, callee", call="CA123")
    assert split.call == "CA123"
    assert split.stream_ids == ("c-17:caller", "c-17:callee")
    assert plan_parties("c", 2, ["agent", "customer"]).stream_ids == ("c:agent", "c:customer")


@pytest.mark.parametrize(("roles", "channels", "fragment"), [
    ("caller", 2, "1 roles (caller) for 2 channels"),
    ("a,b,c", 2, "3 roles"),
    ("a,a", 2, "must differ"),
    ("a,", 2, "role ''"),
    ("a,b c", 2, "role 'b c'"),
    (["a", 7], 2, "role 7"),
    ("a,b", 9, "cannot split 9 channels"),
    ("a,b", 0, "cannot split 0 channels"),
])
def test_bad_roles_are_one_line_errors(roles: object, channels: int, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_roles(roles, channels)  # type: ignore[arg-type]
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_split_gives_each_party_its_channel_on_the_same_frames() -> None:
    split = plan_parties("s", 2)
    frames = np.stack([np.arange(6, dtype=np.float32), -np.arange(6, dtype=np.float32)], axis=1)
    left, right = split.split(frames)
    assert left.tolist() == [0, 1, 2, 3, 4, 5] and right.tolist() == [0, -1, -2, -3, -4, -5]
    assert left.dtype == np.float32 and left.flags["C_CONTIGUOUS"] and right.flags["C_CONTIGUOUS"]
    # Interleaved 1-D and int16 (scaled like the monitor scales it).
    left, right = split.split(np.array([16384, -16384, 8192, -8192], dtype=np.int16))
    assert left.tolist() == [0.5, 0.25] and right.tolist() == [-0.5, -0.25]
    # Float64 is narrowed, not rejected.
    assert split.split(np.zeros((3, 2)))[0].dtype == np.float32


@pytest.mark.parametrize(("block", "fragment"), [
    (np.zeros(5, np.float32), "not whole frames of 2"),
    (np.zeros((4, 3), np.float32), "not [frames, 2]"),
    (np.zeros((4, 2), np.int32), "float or int16"),
])
def test_split_refuses_blocks_that_are_not_whole_frames(block: np.ndarray, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        plan_parties("s", 2).split(block)
    assert fragment in str(info.value)


def test_take_channel_checks_the_channel() -> None:
    assert take_channel(np.array([[1.0, 2.0]]), 1).tolist() == [2.0]
    with pytest.raises(ValueError, match="has 2 channels, the party is channel 3"):
        take_channel(np.zeros((1, 2)), 2)


# ------------------------------------------------------------------ the /ingest hello

BASE = {"type": "hello", "stream": "call-17", "sample_rate": 8000, "channels": 2}


def hello(**fields: object) -> str:
    return json.dumps({**BASE, **fields})


def test_a_split_hello_names_its_parties() -> None:
    plain = parse_hello(hello())
    assert (plain.split, plain.roles, plain.call, plain.role) == (False, None, None, None)
    split = parse_hello(hello(split=True))
    assert split.split and split.parties("call-17-2").stream_ids == ("call-17-2:left", "call-17-2:right")
    assert split.parties("call-17-2").call == "call-17-2"
    named = parse_hello(hello(roles=["agent", "customer"], call="CA9"))
    assert named.split and named.roles == ("agent", "customer")
    assert named.parties("call-17").stream_ids == ("call-17:agent", "call-17:customer")
    assert named.parties("call-17").call == "CA9"
    # One party per connection: a mono stream tagged with its call and role.
    tagged = parse_hello(hello(channels=1, call="CA9", role="caller"))
    assert (tagged.split, tagged.call, tagged.role) == (False, "CA9", "caller")


@pytest.mark.parametrize(("fields", "code", "fragment"), [
    ({"split": "yes"}, CLOSE_PROTOCOL, "'split' must be true or false"),
    ({"split": True, "channels": 1}, CLOSE_UNSUPPORTED, "needs 'channels' of 2 or more"),
    ({"roles": "a,b"}, CLOSE_PROTOCOL, "'roles' must be a list"),
    ({"roles": ["a"]}, CLOSE_PROTOCOL, "1 roles (a) for 2 channels"),
    ({"roles": ["a", "a"]}, CLOSE_PROTOCOL, "must differ"),
    ({"call": ""}, CLOSE_PROTOCOL, "'call' must be 1-100"),
    ({"call": 5}, CLOSE_PROTOCOL, "'call' must be 1-100"),
    ({"split": True, "role": "a"}, CLOSE_PROTOCOL, "a split hello names 'roles'"),
    ({"role": "has space"}, CLOSE_PROTOCOL, "hello 'role'"),
])
def test_a_bad_split_hello_is_refused_with_a_reason(fields: dict[str, object], code: int, fragment: str) -> None:
    with pytest.raises(HelloError) as info:
        parse_hello(hello(**fields))
    assert info.value.code == code and fragment in info.value.reason
    # Through the session: refused and counted as a bad hello.
    refusal = IngestSession(IngestConfig()).accept_hello(hello(**fields))
    assert isinstance(refusal, Refuse) and refusal.counts == {"bad_hello": 1}


def test_a_split_connection_needs_room_for_all_its_parties() -> None:
    session = IngestSession(IngestConfig(max_streams=4))
    session.accept_hello(hello(split=True))
    assert session.streams_wanted == 2
    assert session.check_capacity(2) is None
    session = IngestSession(IngestConfig(max_streams=4))
    session.accept_hello(hello(split=True))
    refusal = session.check_capacity(3)
    assert isinstance(refusal, Refuse) and refusal.counts == {"refused_busy": 1}
    session = IngestSession(IngestConfig())
    session.accept_hello(hello(split=True))
    session.opened(["call-17:left", "call-17:right"], 0.0)
    assert session.stream_id == "call-17:left" and session.stream_ids == ("call-17:left", "call-17:right")
