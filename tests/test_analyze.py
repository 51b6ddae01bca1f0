"""``serstream analyze``: offline analysis with the factory model on espeak-ng and synthetic audio."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest

from serstream import events
from serstream.analyze import AnalyzeConfig, AnalyzeError, StreamSpec, analyze, read_stream_csv, streams_from_args
from serstream.inference.session import EmotionModel
from tests.audio import silence, voiced, write_wav
from tests.conftest import REPO, serstream_command
from tests.modelfactory import model_failing_on_quiet_audio


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(events.load_schema())


def run_analyze(model: EmotionModel, streams: list[StreamSpec], **config: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    # Through JSON and back, as a consumer of the JSON lines would see them.
    analyze(model, streams, lambda e: out.append(json.loads(events.dumps(e))), AnalyzeConfig(**config))
    return out


def test_cli_analyze_speech_and_corrupt_file(
    factory_model: Path, speech_wav: Path, synthetic_wav: Path, corrupt_wav: Path, tmp_path: Path,
    validator: jsonschema.Draft202012Validator,
) -> None:
    out = tmp_path / "out.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "SERSTREAM_MODEL"}
    proc = subprocess.run(
        [*serstream_command(), "analyze", "--model", str(factory_model), str(speech_wav), str(corrupt_wav),
         str(synthetic_wav), "--output", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1, proc.stderr  # one file failed
    assert "Traceback" not in proc.stderr
    err_lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(err_lines) == 1 and str(corrupt_wav) in err_lines[0]
    lines = [json.loads(ln) for ln in out.read_text().splitlines()]
    for event in lines:
        validator.validate(event)
    summaries = {e["file"]: e for e in lines if e["type"] == "file"}
    assert set(summaries) == {str(speech_wav), str(synthetic_wav)}
    errors = [e for e in lines if e["type"] == "error"]
    assert len(errors) == 1 and str(corrupt_wav) in errors[0]["message"]
    for path, segments in ((speech_wav, 3), (synthetic_wav, 2)):
        finals = [e for e in lines if e["type"] == "emotion" and e["file"] == str(path)]
        assert all(e["kind"] == "final" for e in finals)
        assert len(finals) >= segments
        summary = summaries[str(path)]
        assert summary["segments"] == len(finals)
        assert summary["probs"]["neutral"] >= 0 and abs(sum(summary["probs"].values()) - 1) < 1e-3
        # The summary is the duration-weighted mean: it lies within the range of its segments.
        for label in summary["probs"]:
            values = [e["probs"][label] for e in finals]
            assert min(values) - 1e-3 <= summary["probs"][label] <= max(values) + 1e-3
        assert [e["seq"] for e in finals] == list(range(len(finals)))


def test_no_speech_summary_says_so(factory_model: Path, tmp_path: Path) -> None:
    quiet = write_wav(tmp_path / "silence.wav", silence(2.0))
    model = EmotionModel.load(factory_model, device="cpu", threads=1)
    lines = run_analyze(model, streams_from_args([quiet]))
    assert len(lines) == 1
    summary = lines[0]
    assert summary["type"] == "file" and summary["segments"] == 0
    assert summary["label"] is None and summary["probs"] is None
    assert summary["duration_s"] == pytest.approx(2.0)


def test_partials_on_request(factory_model: Path, synthetic_wav: Path) -> None:
    model = EmotionModel.load(factory_model, device="cpu", threads=1)
    plain = run_analyze(model, streams_from_args([synthetic_wav]))
    with_partials = run_analyze(model, streams_from_args([synthetic_wav]), partials=True)
    assert not any(e.get("kind") == "partial" for e in plain)
    partials = [e for e in with_partials if e.get("kind") == "partial"]
    assert partials
    # Finals do not depend on whether partials were computed alongside.
    finals = [e["probs"] for e in plain if e.get("kind") == "final"]
    assert finals == [e["probs"] for e in with_partials if e.get("kind") == "final"]


def test_csv_streams_carry_speaker_state(state_model: Path, tmp_path: Path) -> None:
    """Two files of one speaker in a CSV stream: the second is judged against the first's statistics."""
    quiet = write_wav(tmp_path / "quiet.wav", np.concatenate([silence(0.3), 0.15 * voiced(1.5, seed=3), silence(1.0)]))
    loud = write_wav(tmp_path / "loud.wav", np.concatenate([silence(0.3), voiced(1.5, seed=4), silence(1.0)]))
    listing = tmp_path / "list.csv"
    listing.write_text("file,stream\nquiet.wav,spk1\nloud.wav,spk1\n")
    model = EmotionModel.load(state_model, device="cpu", threads=1)

    together = run_analyze(model, read_stream_csv(listing))
    apart = run_analyze(model, streams_from_args([loud]))

    loud_together = [e for e in together if e["type"] == "emotion" and e["file"].endswith("loud.wav")]
    loud_apart = [e for e in apart if e["type"] == "emotion"]
    assert len(loud_together) == len(loud_apart) == 1
    # After the quiet file, the same loud utterance is more aroused than on its own.
    assert loud_together[0]["arousal"] > loud_apart[0]["arousal"] + 0.1
    # One stream: sequence and utterance numbers continue across its files.
    emotions = [e for e in together if e["type"] == "emotion"]
    assert {e["stream"] for e in emotions} == {"spk1"}
    assert [e["seq"] for e in emotions] == [0, 1]
    assert [e["utterance"] for e in emotions] == [0, 1]
    assert [e["file"] for e in together if e["type"] == "file"] == [str(quiet), str(loud)]


def test_streams_are_batched_together(factory_model: Path, synthetic_wav: Path) -> None:
    model = EmotionModel.load(factory_model, device="cpu", threads=1)
    calls: list[int] = []
    real_infer = model.infer

    class Counting:
        info = model.info
        device = model.device

        def infer(self, audio: np.ndarray, lengths: np.ndarray, state: Any = None) -> Any:
            calls.append(audio.shape[0])
            return real_infer(audio, lengths, state)

    files = [synthetic_wav] * 4
    specs = [StreamSpec(f"s{i}", (f,)) for i, f in enumerate(files)]
    out: list[dict[str, Any]] = []
    summary = analyze(Counting(), specs, out.append, AnalyzeConfig(max_batch=32))
    assert summary.segments == 8 and not summary.failed
    assert max(calls) == 4  # one utterance of each of the four streams per batch


def test_bad_csv_is_a_clear_error(tmp_path: Path) -> None:
    listing = tmp_path / "bad.csv"
    listing.write_text("path,speaker\na.wav,1\n")
    with pytest.raises(AnalyzeError, match="file.*stream"):
        read_stream_csv(listing)


def test_a_file_the_model_fails_on_is_reported_and_the_others_still_run(
    factory_model: Path, tmp_path: Path, validator: jsonschema.Draft202012Validator
) -> None:
    path = model_failing_on_quiet_audio(factory_model, tmp_path / "fails-on-quiet.onnx")
    quiet = write_wav(tmp_path / "quiet.wav", np.concatenate([silence(0.3), voiced(1.5, seed=5), silence(1.0)]))
    loud = write_wav(tmp_path / "loud.wav", np.concatenate([silence(0.3), 3.0 * voiced(1.5, seed=6), silence(1.0)]))
    model = EmotionModel.load(path, device="cpu", threads=1)

    lines = run_analyze(model, streams_from_args([quiet, loud]))  # both in one batch: it fails as a whole
    for event in lines:
        validator.validate(event)
    errors = [e for e in lines if e["type"] == "error"]
    assert [(e["stream"], e["code"]) for e in errors] == [(str(quiet), "inference_error")]
    assert "non-finite" in errors[0]["message"]
    summaries = [e for e in lines if e["type"] == "file"]
    assert [e["file"] for e in summaries] == [str(loud)]
    assert summaries[0]["segments"] == 1 and summaries[0]["label"] is not None
    assert not [e for e in lines if e["type"] == "emotion" and e["file"] == str(quiet)]

    env = {k: v for k, v in os.environ.items() if k != "SERSTREAM_MODEL"}
    out = tmp_path / "out.jsonl"
    proc = subprocess.run(
        [*serstream_command(), "analyze", "--model", str(path), str(quiet), str(loud), "--output", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1, proc.stderr  # one file failed
    assert "Traceback" not in proc.stderr
    err_lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(err_lines) == 1 and str(quiet) in err_lines[0] and "model failed" in err_lines[0]
    assert [json.loads(ln)["file"] for ln in out.read_text().splitlines() if '"type":"file"' in ln] == [str(loud)]


def test_the_same_file_twice_gets_the_one_suffix_rule(tmp_path: Path) -> None:
    # Same rule as the live monitor's ids (serstream/core/stream_ids.py): NAME, NAME-2, NAME-3.
    names = [s.stream for s in streams_from_args(["a.wav", "a.wav", "b.wav", "a.wav"])]
    assert names == ["a.wav", "a.wav-2", "b.wav", "a.wav-3"]
    with pytest.raises(AnalyzeError, match="given more than 100 times"):
        streams_from_args(["a.wav"] * 101)
