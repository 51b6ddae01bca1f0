"""Tests for serstream.core.batcher.BatchFormer: closing rules, padding, and the bounded queue."""

from __future__ import annotations

import numpy as np
import pytest

from serstream.core.batcher import BatchFormer, Request
from serstream.core.scheduler import Window


def request(stream: str, kind: str = "partial", n: int = 4, value: float = 1.0, t: float = 0.0, context=None):
    window = Window(kind=kind, utterance=0, start=0, end=n, audio=np.full(n, value, dtype=np.float32))
    return Request(stream=stream, window=window, submitted=t, context=context)


def streams_of(batch):
    return [r.stream for r in batch.requests]


def test_batch_closes_when_full():
    former = BatchFormer(max_batch=4)
    for i in range(3):
        assert former.add(request(f"s{i}"), now=0.0) == []
    batches = former.add(request("s3"), now=0.0)
    assert len(batches) == 1 and batches[0].reason == "full"
    assert streams_of(batches[0]) == ["s0", "s1", "s2", "s3"]
    assert former.pending == 0 and former.counters["closed_full"] == 1


def test_partials_wait_for_their_deadline():
    former = BatchFormer(partial_wait_s=0.020, final_wait_s=0.002)
    former.add(request("a"), now=1.0)
    assert former.next_deadline() == pytest.approx(1.020)
    assert former.poll(1.019) == []
    batches = former.poll(1.020)
    assert len(batches) == 1 and batches[0].reason == "deadline" and batches[0].closed == 1.020
    assert former.next_deadline() is None


def test_finals_have_the_shorter_deadline_and_go_first():
    former = BatchFormer(partial_wait_s=0.020, final_wait_s=0.002)
    former.add(request("a"), now=0.0)
    former.add(request("b", kind="final"), now=0.010)
    assert former.next_deadline() == pytest.approx(0.012)
    assert former.poll(0.0119) == []
    (batch,) = former.poll(0.012)
    assert streams_of(batch) == ["b", "a"]  # the waiting partial rides along, behind the final


def test_rows_are_zero_padded_with_their_lengths():
    former = BatchFormer(max_batch=3, max_padding=1.0)
    former.add(request("a", n=3, value=0.1), now=0.0)
    former.add(request("b", kind="final", n=5, value=0.2), now=0.0)
    (batch,) = former.add(request("c", n=2, value=0.3), now=0.0)
    assert batch.audio.dtype == np.float32 and batch.audio.shape == (3, 5)
    assert batch.lengths.dtype == np.int64
    assert streams_of(batch) == ["b", "a", "c"]
    np.testing.assert_array_equal(batch.lengths, [5, 3, 2])
    expected = np.array([[0.2] * 5, [0.1] * 3 + [0, 0], [0.3] * 2 + [0, 0, 0]], dtype=np.float32)
    np.testing.assert_array_equal(batch.audio, expected)
    assert batch.padding == 5


def test_a_new_partial_replaces_the_streams_pending_partial():
    former = BatchFormer()
    former.add(request("a", value=1.0, context="old"), now=0.0)
    former.add(request("b"), now=0.0)
    former.add(request("a", value=2.0, context="new"), now=0.001)
    assert former.pending == 2 and former.counters["partials_superseded"] == 1
    (batch,) = former.flush(now=0.002)
    assert streams_of(batch) == ["b", "a"]
    assert batch.requests[1].context == "new" and batch.audio[1, 0] == 2.0


def test_a_final_replaces_the_streams_pending_partial():
    former = BatchFormer()
    former.add(request("a"), now=0.0)
    former.add(request("a", kind="final"), now=0.0)
    assert former.pending == 1 and former.counters["partials_superseded"] == 1
    (batch,) = former.poll(0.002)
    assert [r.window.kind for r in batch.requests] == ["final"]


def test_full_queue_drops_the_oldest_partial_first():
    former = BatchFormer(max_pending=3)
    for name in ("a", "b", "c"):
        former.add(request(name), now=0.0)
    former.add(request("d"), now=0.0)
    assert former.pending == 3 and former.counters["partials_dropped"] == 1
    former.add(request("e", kind="final"), now=0.0)
    assert former.counters["partials_dropped"] == 2 and former.counters["finals_dropped"] == 0
    (batch,) = former.flush(now=0.0)
    assert streams_of(batch) == ["e", "c", "d"]


def test_finals_are_dropped_only_when_nothing_but_finals_waits():
    former = BatchFormer(max_pending=2, final_wait_s=1.0)
    former.add(request("a", kind="final"), now=0.0)
    former.add(request("b", kind="final"), now=0.0)
    former.add(request("c"), now=0.0)
    assert former.counters["partials_dropped"] == 1 and former.pending == 2
    former.add(request("d", kind="final"), now=0.0)
    assert former.counters["finals_dropped"] == 1 and former.pending == 2
    (batch,) = former.flush(now=0.0)
    assert streams_of(batch) == ["a", "b"]


def test_batch_closes_before_padding_exceeds_the_sample_budget():
    former = BatchFormer(max_batch=8, max_batch_samples=10)
    assert former.add(request("a", n=4), now=0.0) == []
    assert former.add(request("b", n=4), now=0.0) == []
    (batch,) = former.add(request("c", n=4), now=0.0)
    assert batch.reason == "samples" and streams_of(batch) == ["a", "b"]
    assert former.pending == 1
    # A row over the budget on its own still goes out, alone.
    batches = former.add(request("d", n=25), now=0.0)
    assert [streams_of(b) for b in batches] == [["c"]]
    assert [streams_of(b) for b in former.flush(0.0)] == [["d"]]


def test_default_sample_budget_is_three_seconds_per_row():
    former = BatchFormer(max_batch=4)
    assert former.config.batch_samples == 4 * 3 * 16000


def test_pull_mode_queues_and_hands_out_one_batch_at_a_time():
    former = BatchFormer(max_batch=4, partial_wait_s=0.020)
    for i in range(10):
        assert former.add(request(f"s{i}"), now=0.0, close=False) == []
    assert former.pending == 10
    first = former.poll(0.0, max_batches=1)
    assert len(first) == 1 and first[0].size == 4 and streams_of(first[0])[0] == "s0"
    second = former.poll(0.0)
    assert [b.size for b in second] == [4]  # the last 2 are not due yet
    assert [b.size for b in former.poll(0.020)] == [2]
    assert former.counters["rows"] == 10 and former.counters["batches"] == 3


def test_context_and_submitted_pass_through():
    former = BatchFormer(max_batch=1)
    (batch,) = former.add(request("a", t=12.5, context={"seq": 7}), now=13.0)
    assert batch.requests[0].context == {"seq": 7} and batch.requests[0].submitted == 12.5


def test_every_request_given_up_on_comes_back_exactly_once():
    """Superseded, evicted and refused requests come back from drain_dropped, expired ones from expire."""
    former = BatchFormer(max_batch=8, max_pending=2, final_wait_s=1.0, partial_max_age_s=0.1)
    a1, a2, a_final = request("a", t=0.0), request("a", t=0.0), request("a", kind="final", t=0.0)
    b, c_final, d_final = request("b", t=0.0), request("c", kind="final", t=0.0), request("d", kind="final", t=0.0)
    former.add(a1, now=0.0, close=False)
    former.add(a2, now=0.0, close=False)  # supersedes a1
    assert former.drain_dropped() == [a1]
    assert former.drain_dropped() == []  # once only
    former.add(b, now=0.0, close=False)
    former.add(a_final, now=0.0, close=False)  # supersedes a2
    former.add(c_final, now=0.0, close=False)  # full: evicts b, the oldest partial
    former.add(d_final, now=0.0, close=False)  # full of finals: d is refused
    dropped = former.drain_dropped()
    assert len(dropped) == 3 and all(r is x for r, x in zip(dropped, (a2, b, d_final)))
    (batch,) = former.flush(0.0)
    assert batch.requests == [a_final, c_final]
    e = request("e", t=0.0)
    former.add(e, now=0.0, close=False)
    assert former.expire(0.2) == [e] and former.drain_dropped() == []
    counted = sum(former.counters[k] for k in ("partials_superseded", "partials_dropped",
                                                "partials_expired", "finals_dropped"))
    assert counted == 5  # a1, a2, b, d_final, e: each counted once, each returned once


def test_bad_requests_and_config_raise():
    former = BatchFormer()
    with pytest.raises(ValueError, match="kind"):
        former.add(request("a", kind="other"), now=0.0)
    empty = Request("a", Window("partial", 0, 0, 0, np.zeros(0, np.float32)), 0.0)
    with pytest.raises(ValueError, match="non-empty"):
        former.add(empty, now=0.0)
    assert former.pending == 0
    with pytest.raises(ValueError):
        BatchFormer(max_batch=0)
    with pytest.raises(ValueError):
        BatchFormer(max_pending=0)


def test_stale_partials_expire_and_finals_never_do():
    former = BatchFormer(max_batch=8, partial_max_age_s=0.1)
    old = request("a", t=0.0)
    fresh = request("b", t=0.25)
    final = request("c", kind="final", t=0.0)
    for r in (old, fresh, final):
        former.add(r, now=r.submitted, close=False)
    assert former.expire(0.15) == [old]  # only "a" waited past 0.1 s
    assert former.counters["partials_expired"] == 1 and former.pending == 2
    assert former.expire(0.3) == []  # "b" is 0.05 s old; the final never expires
    (batch,) = former.poll(1.0)
    assert sorted(streams_of(batch)) == ["b", "c"]
    # An expired partial no longer blocks its stream's next one from being its only waiting partial.
    former.add(request("a", t=2.0), now=2.0, close=False)
    assert former.pending == 1 and former.counters["partials_superseded"] == 0


def test_without_a_max_age_nothing_expires():
    former = BatchFormer(max_batch=8)
    former.add(request("a", t=0.0), now=0.0, close=False)
    assert former.expire(100.0) == [] and former.pending == 1
    with pytest.raises(ValueError):
        BatchFormer(partial_max_age_s=0.0)


def test_a_long_final_is_not_padded_together_with_short_partials():
    # 8 s of final against 3 s partials: one batch would be 60 % padding (computed for nothing).
    former = BatchFormer(max_batch=8, final_wait_s=0.0, partial_wait_s=0.0)
    for i in range(3):
        former.add(request(f"p{i}", n=300), now=0.0, close=False)
    former.add(request("f", kind="final", n=800), now=0.0, close=False)
    first, second = former.poll(0.0)
    assert streams_of(first) == ["f"] and first.audio.shape == (1, 800)
    assert streams_of(second) == ["p0", "p1", "p2"] and second.audio.shape == (3, 300)
    assert first.padding == 0 and second.padding == 0


def test_rows_of_similar_length_share_a_batch_within_max_padding():
    former = BatchFormer(max_batch=8, final_wait_s=0.0, partial_wait_s=0.0, max_padding=0.2)
    former.add(request("f", kind="final", n=350), now=0.0, close=False)
    for i, n in enumerate([300, 290, 100]):
        former.add(request(f"p{i}", n=n), now=0.0, close=False)
    first, second = former.poll(0.0)
    # 350 + 300 + 290 in a 3 x 350 batch wastes 10 %; the 100-sample row would make it 26 % (> 20 %).
    assert streams_of(first) == ["f", "p0", "p1"]
    assert streams_of(second) == ["p2"]
    assert first.padding / first.audio.size <= 0.2


def test_a_skipped_row_is_not_starved():
    # A short partial keeps being skipped by batches of long ones until it is the oldest: then it heads one.
    former = BatchFormer(max_batch=4, final_wait_s=0.0, partial_wait_s=0.0)
    former.add(request("long-0", kind="final", n=800), now=0.0, close=False)
    former.add(request("short", n=50), now=0.0, close=False)
    (batch,) = former.poll(0.0, max_batches=1)
    assert streams_of(batch) == ["long-0"]
    former.add(request("long-1", kind="final", n=800), now=0.1, close=False)
    (batch,) = former.poll(0.1, max_batches=1)
    assert streams_of(batch) == ["long-1"]  # finals go first ...
    (batch,) = former.poll(0.1, max_batches=1)
    assert streams_of(batch) == ["short"]  # ... and then the skipped partial is the head
    assert former.pending == 0


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_max_padding_outside_0_to_1_is_refused(bad):
    with pytest.raises(ValueError, match="max_padding"):
        BatchFormer(max_padding=bad)
