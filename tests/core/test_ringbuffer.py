"""Tests for serstream.core.ringbuffer.AudioRing, including a model-based property test."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serstream.core.ringbuffer import AudioRing


def _ramp(start: int, n: int) -> np.ndarray:
    return np.arange(start, start + n, dtype=np.float32)


def test_write_then_read_returns_samples_and_their_index():
    ring = AudioRing(10)
    assert ring.write(_ramp(0, 4)) == 0
    index, data = ring.read()
    assert index == 0
    np.testing.assert_array_equal(data, _ramp(0, 4))
    assert ring.available == 0 and ring.written == 4


def test_wraparound_keeps_order():
    ring = AudioRing(8)
    ring.write(_ramp(0, 6))
    ring.read(5)
    ring.write(_ramp(6, 6))  # wraps past the end of the buffer
    index, data = ring.read()
    assert index == 5
    np.testing.assert_array_equal(data, _ramp(5, 7))


def test_overflow_drops_oldest_and_read_index_shows_the_gap():
    ring = AudioRing(8)
    ring.write(_ramp(0, 6))
    assert ring.write(_ramp(6, 5)) == 3
    assert ring.dropped == 3
    index, data = ring.read()
    assert index == 3
    np.testing.assert_array_equal(data, _ramp(3, 8))


def test_write_larger_than_capacity_keeps_the_newest_samples():
    ring = AudioRing(5)
    ring.write(_ramp(0, 2))
    lost = ring.write(_ramp(2, 12))
    assert lost == 9  # 2 unread old samples + 7 samples of the block that never fit
    index, data = ring.read()
    assert index == 9
    np.testing.assert_array_equal(data, _ramp(9, 5))
    assert ring.written == 14 and ring.dropped == 9


def test_read_limit_and_empty_read():
    ring = AudioRing(4)
    ring.write(_ramp(0, 3))
    index, data = ring.read(2)
    assert (index, data.tolist()) == (0, [0.0, 1.0])
    index, data = ring.read(0)
    assert (index, data.size) == (2, 0)
    ring.read()
    index, data = ring.read()
    assert (index, data.size) == (3, 0)


def test_read_returns_a_copy():
    ring = AudioRing(4)
    ring.write(_ramp(0, 2))
    _, data = ring.read()
    ring.write(_ramp(10, 4))
    assert data.tolist() == [0.0, 1.0]


@pytest.mark.parametrize("capacity", [0, -3, 2.5, True])
def test_bad_capacity_raises(capacity):
    with pytest.raises(ValueError, match="capacity"):
        AudioRing(capacity)


def test_bad_shapes_raise():
    ring = AudioRing(4)
    with pytest.raises(ValueError):
        ring.write(np.zeros((2, 2), dtype=np.float32))
    with pytest.raises(ValueError):
        ring.read(-1)


operations = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.integers(0, 40)),
        st.tuples(st.just("read"), st.one_of(st.none(), st.integers(0, 40))),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(capacity=st.integers(1, 32), ops=operations)
def test_ring_matches_a_list_model(capacity, ops):
    ring = AudioRing(capacity)
    unread: list[int] = []  # absolute indices of unread samples; sample value == its index
    next_value = 0
    dropped = 0
    for op, n in ops:
        if op == "write":
            unread.extend(range(next_value, next_value + n))
            lost = ring.write(_ramp(next_value, n))
            next_value += n
            excess = max(0, len(unread) - capacity)
            del unread[:excess]
            dropped += excess
            assert lost == excess
        else:
            take = len(unread) if n is None else min(n, len(unread))
            expected_index = unread[0] if unread else next_value
            index, data = ring.read(n)
            assert index == expected_index
            assert data.tolist() == [float(v) for v in unread[:take]]
            del unread[:take]
        assert ring.available == len(unread)
        assert ring.dropped == dropped
        assert ring.written == next_value
