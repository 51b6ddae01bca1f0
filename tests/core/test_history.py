"""The bus history ring and the resume plan (pure: time passed in)."""

from __future__ import annotations

import pytest

from serstream.core.history import EventHistory, HistoryEntry, parse_since, run_first_id


def fill(history: EventHistory, streams: list[str], t0: float = 0.0, dt: float = 1.0) -> list[int]:
    ids = []
    for i, stream in enumerate(streams):
        n = history.next_id()
        history.append(HistoryEntry(n, t0 + i * dt, stream, f'{{"id":{n}}}'.encode(), stream == "*"))
        ids.append(n)
    return ids


def only(stream: str):  # the server's filter: that stream plus broadcast (stats) events
    return lambda s, broadcast: broadcast or s == stream


def test_ids_are_contiguous_and_resume_returns_exactly_what_came_after() -> None:
    h = EventHistory(max_age_s=100, max_events=100)
    assert fill(h, ["a", "b", "*", "a", "b"]) == [1, 2, 3, 4, 5]
    plan = h.resume(2, now=5.0)
    assert [e.id for e in plan.entries] == [3, 4, 5]
    assert (plan.lost, plan.reason, plan.gap) == (0, None, False)
    assert [e.id for e in h.resume(2, only("a")).entries] == [3, 4]  # stats reach filtered clients
    assert [e.id for e in h.resume(0, only("b")).entries] == [2, 3, 5]
    assert h.resume(5).entries == () and not h.resume(5).gap  # up to date


def test_age_eviction_reports_the_lost_count_and_where_it_resumes() -> None:
    h = EventHistory(max_age_s=10, max_events=100)
    fill(h, ["a"] * 20)  # times 0..19
    plan = h.resume(3, now=19.0)  # keeps times >= 9: ids 10..20
    assert plan.resume_from == 10 and plan.lost == 6 and plan.reason == "history"
    assert [e.id for e in plan.entries] == list(range(10, 21))
    # Later, with nothing new published, everything has aged out.
    late = h.resume(15, now=100.0)
    assert late.entries == () and late.lost == 5 and late.resume_from == 21 and h.evicted == 20


def test_count_cap_is_a_hard_bound() -> None:
    h = EventHistory(max_age_s=1e9, max_events=3)
    fill(h, ["a"] * 10)
    assert len(h) == 3 and [e.id for e in h] == [8, 9, 10]
    plan = h.resume(8)
    assert [e.id for e in plan.entries] == [9, 10] and plan.lost == 0
    gap = h.resume(2)
    assert gap.lost == 5 and gap.resume_from == 8 and [e.id for e in gap.entries] == [8, 9, 10]


def test_future_since_replays_everything_held_with_a_future_gap() -> None:
    h = EventHistory(max_age_s=100, max_events=2)
    fill(h, ["a", "b", "c"])
    plan = h.resume(5000)
    assert plan.reason == "future" and plan.gap
    assert [e.id for e in plan.entries] == [2, 3] and plan.lost == 1 and plan.resume_from == 2


def test_since_from_an_earlier_run_is_a_restart_gap() -> None:
    h = EventHistory(max_age_s=100, max_events=2, first_id=5_000_001)
    assert h.oldest_id == 5_000_001 and h.last_id == 5_000_000
    fill_ids = []
    for t in range(3):
        n = h.next_id()
        h.append(HistoryEntry(n, float(t), "a", b"{}"))
        fill_ids.append(n)
    assert fill_ids == [5_000_001, 5_000_002, 5_000_003]
    plan = h.resume(1234)  # an id of the previous run
    assert plan.reason == "restart" and [e.id for e in plan.entries] == [5_000_002, 5_000_003]
    assert plan.lost == 1 and plan.resume_from == 5_000_002
    # The id just before this run's first: nothing of this run was seen, no restart.
    assert h.resume(5_000_000).reason == "history" and h.resume(5_000_000).lost == 1
    assert run_first_id(1_796_228_285.9) == 1_796_228_285_000_001
    assert run_first_id(1_796_228_300.0) > 1_796_228_285_000_001 + 10 * 1_000_000 - 1
    assert h.resume(0).reason == "history" and h.resume(0).since == 5_000_000  # 0: "nothing seen"
    with pytest.raises(ValueError):
        EventHistory(first_id=0)


def test_zero_history_keeps_nothing_and_numbers_still_advance() -> None:
    h = EventHistory(max_age_s=0, max_events=100)
    fill(h, ["a", "a"])
    assert len(h) == 0 and h.last_id == 2
    plan = h.resume(1)
    assert plan.entries == () and plan.lost == 1 and plan.resume_from == 3


def test_ids_must_increase_and_bounds_must_be_sane() -> None:
    h = EventHistory()
    h.append(HistoryEntry(5, 0.0, "a", b"{}"))
    with pytest.raises(ValueError, match="increase"):
        h.append(HistoryEntry(5, 0.0, "a", b"{}"))
    assert h.next_id() == 6
    with pytest.raises(ValueError):
        EventHistory(max_age_s=-1)
    with pytest.raises(ValueError):
        EventHistory(max_events=-1)
    with pytest.raises(ValueError):
        h.resume(-1)


@pytest.mark.parametrize("text,value", [("0", 0), ("17", 17), (" 42 ", 42), ("0007", 7)])
def test_parse_since_accepts_ids(text: str, value: int) -> None:
    assert parse_since(text) == value


@pytest.mark.parametrize("text", ["", "abc", "-1", "1.5", "1e3", "١٢", "9" * 19, "0x10", "1 2"])
def test_parse_since_refuses_garbage_in_one_line(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_since(text)
    assert "\n" not in str(info.value) and "since" in str(info.value)
