"""benchmarks/profile_shares.py: py-spy raw stacks summed by pipeline stage."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _module():
    spec = importlib.util.spec_from_file_location("profile_shares", REPO / "benchmarks" / "profile_shares.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["profile_shares"] = module
    spec.loader.exec_module(module)
    return module


def test_each_sample_counts_once_under_its_first_stage() -> None:
    ps = _module()
    lines = [
        'process 1:"x";thread (2): serstream-inference;InferenceWorker._run (w.py:1);Session.run (o.py:2) 30',
        # result handling on the inference thread is not inference
        'process 1:"x";thread (2): serstream-inference;InferenceWorker._run (w.py:1);Monitor._on_result (m.py:3) 5',
        'process 1:"x";thread (3): serstream-pipeline;StreamPipeline.push (p.py:1);StreamResampler.process (r.py:2) 7',
        'process 1:"x";thread (3): serstream-pipeline;StreamPipeline.push (p.py:1);clean_in_place (p.py:9) 2',
        'process 1:"x";thread (4): rtp-5000;RtpSource._run (rtp.py:1);decode_ulaw (g.py:1) 11',
        'process 1:"x";thread (3): serstream-pipeline;Monitor._run (m.py:1) 1',
        'process 1:"x";process 9:"sender";thread (9): MainThread;rtp_sender (b.py:1) 4',
        'process 1:"x";thread (1): MainThread;run_rtp_step (b.py:2) 6',
    ]
    counted = ps.shares(lines)
    assert counted["inference (ONNX Runtime)"] == 30
    assert counted["results to event dicts (estimator, smoother, speaker state)"] == 5
    assert counted["resampling"] == 7
    assert counted["sanitising, levels, rings"] == 2
    assert counted["RTP receive, decode, jitter buffer"] == 11
    assert counted[ps.OTHER] == 1
    assert counted[ps.SENDER] == 4 and counted[ps.HARNESS] == 6
    assert sum(counted.values()) == 66
