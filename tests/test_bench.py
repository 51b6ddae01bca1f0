"""`serstream bench`'s own pieces on a small model: a capacity step and the report it prints.

The figures themselves belong to the benchmark runs (README); here we check that a
step really feeds the monitor and that every counter the table shows comes from it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from serstream.bench import BenchReport, format_report, run_step, speech_like
from serstream.inference.session import EmotionModel


@pytest.fixture(scope="module")
def model(factory_model: Path) -> EmotionModel:
    return EmotionModel.load(factory_model, device="cpu", threads=1)


def test_a_small_step_produces_estimates_and_a_table_row(model: EmotionModel) -> None:
    step = run_step(model, streams=3, seconds=4.0, audio=speech_like(8.0, seed=3))
    assert step.streams == 3
    assert step.windows > 0 and step.p95_ms is not None
    assert step.audio_dropped == 0
    assert step.partials_expired >= 0 and step.partials_superseded >= 0
    report = BenchReport(model="factory", device="cpu", cpu_count=2, inference=[], final_latency_ms={},
                         partial_latency_ms={}, steps=[step], max_sustained_streams=3 if step.sustained else 0,
                         rss_idle_mb=1.0, rss_load_mb=step.rss_mb)
    table = format_report(report)
    assert any("superseded  expired" in line for line in table.splitlines())
    row = next(line for line in table.splitlines() if line.strip().startswith("3 "))
    # streams, sustained, dropped, est/s, p50, p95, final p95, superseded, expired, batch, cpu%, RSS
    fields = row.split("(")[0].split()
    assert len(fields) == 12, row
    assert int(fields[7]) == step.partials_superseded and int(fields[8]) == step.partials_expired
