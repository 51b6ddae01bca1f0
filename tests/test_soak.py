"""benchmarks/soak.py, a few seconds of it: 2 real-time streams through a real ``serstream listen``.

The printed table must be the counters the benchmark collected (its JSON),
row by row, and its summary must add up from the rows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def test_soak_smoke_table_matches_the_collected_counters(tmp_path: Path, factory_model: Path) -> None:
    out = tmp_path / "soak.json"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "soak.py"), "--streams", "2", "--minutes", "0.12",
         "--interval-s", "2", "--warmup-s", "2", "--synthetic", "--threads", "1", "--model", str(factory_model),
         "--json-out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    header = lines[0].split()
    assert header == result["columns"]
    rows = [ln.split() for ln in lines[1:] if not ln.startswith("summary:")]
    samples = result["samples"]
    assert len(rows) == len(samples) >= 3
    for row, sample in zip(rows, samples):
        assert [float(cell) for cell in row] == [float(sample[c]) for c in header]
    summary = result["summary"]
    assert sum(s["events"] for s in samples) == summary["events_received"] > 0
    assert samples[-1]["ids_missing"] == summary["events_lost"] == 0
    assert samples[-1]["audio_dropped"] == summary["audio_dropped"]
    assert summary["rss_end_mb"] == samples[-1]["rss_mb"] > 10
    assert all(s["fds"] > 0 and s["threads"] > 1 for s in samples)
    assert summary["streams_with_estimates"] == 2
    text = [ln for ln in lines if ln.startswith("summary:")][0]
    assert f"events lost to the subscriber {summary['events_lost']}" in text
    assert f"({summary['memory_growth_after_warmup_pct']:+.2f} %)" in text
