"""Tests for serstream.core.stream_ids: the one suffix rule (the monitor's use of it is in tests/test_monitor.py)."""

from __future__ import annotations

import itertools

from serstream.core.stream_ids import MAX_SUFFIX, allocate, candidates


def test_candidates_are_the_base_then_dash_two_up_to_the_limit() -> None:
    got = list(candidates("call-17"))
    assert got[:3] == ["call-17", "call-17-2", "call-17-3"]
    assert got[-1] == f"call-17-{MAX_SUFFIX}" and len(got) == MAX_SUFFIX
    assert list(candidates("rtp:0000000a", max_suffix=3)) == ["rtp:0000000a", "rtp:0000000a-2", "rtp:0000000a-3"]


def test_allocate_takes_the_first_free_id() -> None:
    assert allocate("file:a.wav", set()) == "file:a.wav"
    assert allocate("file:a.wav", {"file:a.wav"}) == "file:a.wav-2"
    # A hole is reused: the first free candidate, not one past the highest.
    assert allocate("x", {"x", "x-3"}) == "x-2"
    assert allocate("x", {"x", "x-2", "x-3"}, max_suffix=3) is None


def test_allocating_in_turn_gives_distinct_ids() -> None:
    taken: set[str] = set()
    for _ in range(MAX_SUFFIX):
        stream_id = allocate("mic:USB", taken)
        assert stream_id is not None and stream_id not in taken
        taken.add(stream_id)
    assert allocate("mic:USB", taken) is None
    assert taken == set(itertools.islice(candidates("mic:USB"), MAX_SUFFIX))
