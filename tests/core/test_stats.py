"""Tests for serstream.core.stats: Counters, LatencyTracker, RateMeter."""

import math

import numpy as np
import pytest

from serstream.core.stats import Counters, LatencyTracker, RateMeter


def test_counters_increment_and_snapshot_is_a_copy():
    counters = Counters(a=1)
    assert counters.inc("a") == 2
    assert counters.inc("b", 5) == 5
    snap = counters.snapshot()
    counters.inc("a")
    assert snap == {"a": 2, "b": 5} and type(snap) is dict


def test_percentiles_of_known_values():
    tracker = LatencyTracker()
    for v in range(1, 101):
        tracker.record(v / 1000)
    p = tracker.percentiles((50, 95, 99))
    assert p[50] == pytest.approx(np.percentile(np.arange(1, 101) / 1000, 50))
    assert p[99] == pytest.approx(0.09901)
    assert tracker.count == 100


def test_tracker_keeps_only_the_most_recent_values():
    tracker = LatencyTracker(capacity=10)
    for _ in range(100):
        tracker.record(1.0)
    for _ in range(10):
        tracker.record(0.001)
    assert tracker.percentiles((100,))[100] == pytest.approx(0.001)
    assert tracker.count == 110 and tracker.size == 10


def test_empty_tracker_and_bad_values():
    tracker = LatencyTracker()
    assert tracker.percentiles((50, 99)) == {50: None, 99: None}
    tracker.record(math.nan)
    tracker.record(-1.0)
    assert tracker.rejected == 2 and tracker.count == 0
    with pytest.raises(ValueError):
        tracker.percentiles((101,))
    with pytest.raises(ValueError):
        LatencyTracker(capacity=0)


def test_rate_meter_over_a_sliding_window():
    meter = RateMeter(window_s=10.0, start=0.0)
    for k in range(100):  # 10 events per second for 10 s
        meter.record(k * 0.1)
    assert meter.rate(10.0) == pytest.approx(10.0, rel=0.1)
    assert meter.rate(30.0) == 0.0
    assert meter.total == 100


def test_rate_meter_uses_elapsed_time_before_a_full_window():
    meter = RateMeter(window_s=10.0, start=0.0)
    meter.record(1.0, n=4)
    assert meter.rate(2.0) == pytest.approx(2.0)
    assert RateMeter().rate(5.0) == 0.0
