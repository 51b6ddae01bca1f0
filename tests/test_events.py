"""Event constructors against the JSON Schema, and the schema against bad events."""

from __future__ import annotations

import copy
import json
from typing import Any

import jsonschema
import numpy as np
import pytest

from serstream import events
from serstream.contract import EVENT_SCHEMA_VERSION, LABELS
from serstream.core.smoother import MoodState

TS = 1_732_250_000.123456


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    schema = events.load_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def probs_array(top: int = 4) -> np.ndarray:
    p = np.full(len(LABELS), 0.05, np.float32)
    p[top] = 1.0 - 0.05 * (len(LABELS) - 1)
    return p


def mood() -> MoodState:
    p = probs_array(0)
    return MoodState(
        label="neutral",
        confidence=float(p[0]),
        probs={label: float(v) for label, v in zip(LABELS, p)},
        arousal=0.1,
        valence=-0.2,
        dominance=0.3,
    )


def sample_events() -> dict[str, dict[str, Any]]:
    return {
        "stream_open": events.stream_opened(
            "mic", source="microphone", codec="pcm_f32", sample_rate=48000, channels=2,
            ts=TS, detail="Built-in Microphone",
        ),
        "stream_closed": events.stream_closed(
            "rtp-1", source="rtp", codec="pcmu", sample_rate=8000, channels=1, ts=TS,
            reason="idle for 30 s\n(no packets)",
        ),
        "speech_start": events.speech_start("mic", t=1.23456789, ts=TS),
        "speech_end": events.speech_end("mic", t=3.5, duration=2.27, reason="silence", ts=TS),
        "emotion": events.emotion_event(
            "mic", seq=7, kind="partial", utterance=2, t0=1.0, t1=4.0, labels=LABELS,
            probs=probs_array(4), avd=np.array([0.7, -0.5, 0.4]), smoothed=mood(),
            latency_ms=12.345678, ts=TS, gender=np.array([0.3, 0.7]), model="test-1",
        ),
        "emotion_minimal": events.emotion_event(
            "ws-2", seq=0, kind="final", utterance=0, t0=0.0, t1=0.5, labels=LABELS,
            probs=probs_array(3), avd=[0.0, 0.0, 0.0],
            smoothed={"label": "sad", "confidence": 0.65, "probs": dict(zip(LABELS, probs_array(3))),
                      "arousal": -0.4, "valence": -0.6, "dominance": -0.1},
            latency_ms=0.0, ts=TS,
        ),
        "stats": events.stats_event(
            uptime_s=12.5, streams=3, windows_per_s=5.25,
            batches={"count": 10, "mean_size": 1.5, "max_size": 4},
            queues={"inference": 1, "pending_windows": 0},
            drops={"audio_samples": 0, "events": 12},
            latency_ms={"p50": 20.0, "p95": 40.0, "p99": None, "count": 30},
            device="cpu", ts=TS,
        ),
        "error": events.error_event(
            "rtp-1", code="decode_error", message="bad RTP version 1\ndetails", count=1, ts=TS
        ),
        "file": events.file_event(
            "call.wav", file="/data/call.wav", labels=LABELS, probs=probs_array(0),
            avd=(0.1, 0.2, 0.3), segments=4, duration_s=61.25, ts=TS,
        ),
        "gap": events.gap_event("mic", reason="history", lost=12, since=40, resume_from=53, ts=TS),
        "numbered": {"id": 41, **events.speech_start("mic", t=1.0, ts=TS)},
    }


@pytest.mark.parametrize("name", list(sample_events()))
def test_constructors_validate(validator: jsonschema.Draft202012Validator, name: str) -> None:
    event = sample_events()[name]
    validator.validate(event)
    assert event["v"] == EVENT_SCHEMA_VERSION == events.SCHEMA_VERSION
    assert json.loads(events.dumps(event)) == event


def test_schema_covers_exactly_the_event_types() -> None:
    schema = events.load_schema()
    types = {
        schema["$defs"][ref["$ref"].split("/")[-1]]["properties"]["type"]["const"]
        for ref in schema["oneOf"]
    }
    assert types == set(events.EVENT_TYPES)
    assert {e["type"] for e in sample_events().values()} == set(events.EVENT_TYPES)
    assert events.schema_path().is_file()


def test_emotion_fields() -> None:
    e = sample_events()["emotion"]
    assert e["label"] == "angry"
    assert e["confidence"] == pytest.approx(0.65)
    assert list(e["probs"]) == list(LABELS)
    assert (e["arousal"], e["valence"], e["dominance"]) == (0.7, -0.5, 0.4)
    assert e["smoothed"]["label"] == "neutral" and list(e["smoothed"]["probs"]) == list(LABELS)
    assert e["latency_ms"] == 12.3457  # rounded to 4 decimals
    assert e["gender"] == {"female": 0.3, "male": 0.7}
    assert e["ts"] == round(TS, 4)


def test_messages_are_one_line() -> None:
    sample = sample_events()
    assert sample["error"]["message"] == "bad RTP version 1"
    assert sample["stream_closed"]["reason"] == "idle for 30 s"


def test_stats_fill_missing_percentiles_with_zero() -> None:
    e = sample_events()["stats"]
    assert e["stream"] == "*"
    assert e["latency_ms"] == {"p50": 20.0, "p95": 40.0, "p99": 0.0, "count": 30}


def test_dumps_is_compact_and_refuses_nan() -> None:
    text = events.dumps(sample_events()["speech_start"])
    assert " " not in text
    assert text.startswith('{"type":"speech","v":1,')
    with pytest.raises(ValueError):
        events.dumps({"type": "x", "value": float("nan")})


@pytest.mark.parametrize(
    "call",
    [
        lambda: events.speech_start("s", t=float("nan"), ts=TS),
        lambda: events.speech_end("s", t=1.0, duration=1.0, reason="bored", ts=TS),
        lambda: events.stream_opened("s", source="carrier pigeon", codec="x", sample_rate=1,
                                     channels=1, ts=TS),
        lambda: events.emotion_event(
            "s", seq=0, kind="sometimes", utterance=0, t0=0, t1=1, labels=LABELS,
            probs=probs_array(), avd=[0, 0, 0], smoothed=mood(), latency_ms=1, ts=TS),
        lambda: events.emotion_event(
            "s", seq=0, kind="final", utterance=0, t0=0, t1=1, labels=LABELS,
            probs=probs_array()[:5], avd=[0, 0, 0], smoothed=mood(), latency_ms=1, ts=TS),
        lambda: events.emotion_event(
            "s", seq=0, kind="final", utterance=0, t0=0, t1=1, labels=LABELS,
            probs=probs_array(), avd=[0, 0], smoothed=mood(), latency_ms=1, ts=TS),
        lambda: events.error_event("s", code="Bad Code", message="m", count=1, ts=TS),
        lambda: events.error_event("s", code="bad_samples", message="m", count=0, ts=TS),
        lambda: events.stats_event(uptime_s=1, streams=0, windows_per_s=0, batches={}, queues={},
                                   drops={}, latency_ms={}, device="tpu", ts=TS),
    ],
)
def test_constructors_refuse_bad_values(call: Any) -> None:
    with pytest.raises(ValueError):
        call()


def test_unit_values_are_clipped() -> None:
    e = events.file_event("f", file="f", labels=LABELS, probs=probs_array(), avd=[1.00001, -3, 0],
                          segments=0, duration_s=0, ts=TS)
    assert (e["arousal"], e["valence"]) == (1.0, -1.0)


def _mutations() -> list[tuple[str, str, Any]]:
    """(sample, dotted path, new value or DELETE) that must make the event invalid."""
    return [
        ("emotion", "kind", "sometimes"),
        ("emotion", "label", DELETE),
        ("emotion", "smoothed.probs", DELETE),
        ("emotion", "probs.angry", 1.5),
        ("emotion", "arousal", 1.2),
        ("emotion", "seq", 1.5),
        ("emotion", "v", 2),
        ("emotion", "ts", DELETE),
        ("emotion", "stream", 5),
        ("emotion", "gender", {"female": 0.5}),
        ("speech_end", "reason", DELETE),
        ("speech_end", "duration", DELETE),
        ("speech_start", "state", "middle"),
        ("stream_open", "source", "fax"),
        ("stream_open", "sample_rate", 8000.5),
        ("stats", "stream", "mic"),
        ("stats", "latency_ms.p99", DELETE),
        ("stats", "drops.events", -1),
        ("stats", "device", "tpu"),
        ("error", "message", "two\nlines"),
        ("error", "code", "Decode Error"),
        ("error", "count", 0),
        ("file", "segments", DELETE),
        ("file", "type", "files"),
    ]


DELETE = object()


@pytest.mark.parametrize(("sample", "path", "value"), _mutations())
def test_invalid_events_are_rejected(
    validator: jsonschema.Draft202012Validator, sample: str, path: str, value: Any
) -> None:
    event = copy.deepcopy(sample_events()[sample])
    *parents, leaf = path.split(".")
    target = event
    for key in parents:
        target = target[key]
    if value is DELETE:
        del target[leaf]
    else:
        target[leaf] = value
    assert not validator.is_valid(event)


def test_unknown_fields_are_allowed(validator: jsonschema.Draft202012Validator) -> None:
    event = sample_events()["emotion"]
    event["future_field"] = {"anything": [1, 2]}
    event["smoothed"]["trend"] = "rising"
    assert validator.is_valid(event)


def test_unknown_type_is_rejected(validator: jsonschema.Draft202012Validator) -> None:
    assert not validator.is_valid({"type": "hello", "v": 1, "stream": "s", "ts": TS})


def test_a_file_without_speech_has_null_figures_and_a_note(validator: jsonschema.Draft202012Validator) -> None:
    empty = events.file_event_no_speech("f", file="silence.wav", duration_s=2.0, ts=1.0)
    assert list(validator.iter_errors(empty)) == []
    assert empty["label"] is None and empty["segments"] == 0 and empty["note"]
    # Nulls are only allowed when nothing was heard.
    assert list(validator.iter_errors(dict(empty, segments=3)))
    assert list(validator.iter_errors(dict(empty, label="angry")))


def test_schema_refuses_bad_ids_and_gaps(validator: jsonschema.Draft202012Validator) -> None:
    numbered = sample_events()["numbered"]
    for bad_id in (0, -1, 1.5, "7"):
        with pytest.raises(jsonschema.ValidationError):
            validator.validate({**numbered, "id": bad_id})
    gap = sample_events()["gap"]
    for field, value in (("reason", "lag"), ("lost", -1), ("resume_from", 0)):
        with pytest.raises(jsonschema.ValidationError):
            validator.validate({**gap, field: value})
    with pytest.raises(ValueError, match="reason"):
        events.gap_event("*", reason="lag", lost=1, since=0, resume_from=2, ts=TS)
