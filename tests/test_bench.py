"""`serstream bench`'s own pieces on a small model: a capacity step through file sources, and its report.

The figures themselves belong to the benchmark runs (README); here we check that a step
really feeds the monitor through the file source, that the verdict is the capacity rule's,
and that every counter the table shows comes from the step.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import soundfile as sf

from serstream.bench import BenchReport, format_report, run_step, write_load_files
from serstream.core.capacity import StepOutcome, judge
from serstream.inference.session import EmotionModel


@pytest.fixture(scope="module")
def model(factory_model: Path) -> EmotionModel:
    return EmotionModel.load(factory_model, device="cpu", threads=1)


def test_load_files_are_distinct_16k_speech(tmp_path: Path) -> None:
    files = write_load_files(tmp_path, count=3, seconds=5.0)
    assert [p.name for p in files] == ["load-00.wav", "load-01.wav", "load-02.wav"]
    data = [sf.read(str(p))[0] for p in files]
    assert all(sf.info(str(p)).samplerate == 16000 for p in files)
    assert all(len(d) == 80000 for d in data)
    assert not (data[0] == data[1]).all()


def test_a_small_step_through_file_sources(model: EmotionModel, tmp_path: Path) -> None:
    files = write_load_files(tmp_path, count=2, seconds=10.0)
    step = run_step(model, streams=3, seconds=5.0, files=files)
    assert step.streams == 3
    assert step.partials > 0 and step.finals > 0 and step.p95_ms is not None
    assert step.audio_dropped == 0
    # Real-time file sources: about 5 s of estimates, not a burst of pushed audio.
    assert step.source_lag_ms < 250, step.source_lag_ms
    again = judge(StepOutcome(
        streams=3, audio_dropped=step.audio_dropped, partials_expired=step.partials_expired,
        partials_dropped=step.partials_dropped, finals_dropped=step.finals_dropped,
        partials_superseded=step.partials_superseded, partials=step.partials, finals=step.finals,
        partial_p95_ms=step.p95_ms, final_p95_ms=step.final_p95_ms, source_lag_ms=step.source_lag_ms,
    ))
    assert (again.sustained, again.thinned) == (step.sustained, step.thinned)
    report = BenchReport(model="factory", device="cpu", cpu_count=2, steps=[step],
                         max_sustained_streams=3 if step.sustained else 0,
                         max_thinned_streams=3 if step.thinned else 0, rss_idle_mb=1.0, rss_load_mb=step.rss_mb,
                         provider="cpu (CPUExecutionProvider)")
    table = format_report(report)
    lines = table.splitlines()
    assert lines[0].startswith("model factory on cpu (CPUExecutionProvider)")
    assert any("superseded  expired" in line for line in lines)
    row = next(line for line in lines if line.strip().startswith("3 "))
    # streams, every, thinned, dropped, est/s, p50, p95, final p95, superseded, expired, batch, cpu%, RSS
    fields = row.split("(")[0].split()
    assert len(fields) == 13, row
    assert fields[1] == ("yes" if step.sustained else "NO") and fields[2] == ("yes" if step.thinned else "NO")
    assert int(fields[8]) == step.partials_superseded and int(fields[9]) == step.partials_expired
    assert f"sustained (every partial): {report.max_sustained_streams} streams" in table
    assert f"with partials thinned:     {report.max_thinned_streams} streams" in table
    # --json: every figure, the verdicts and their reasons included
    dumped = json.loads(json.dumps(asdict(report)))
    assert dumped["steps"][0]["sustained"] == step.sustained and dumped["steps"][0]["why"] == step.why
    assert dumped["max_thinned_streams"] == report.max_thinned_streams and dumped["provider"] == report.provider
