"""The typed event model (serstream_client.model) against the JSON Schema, so the two cannot drift.

Every event class is built with its optional fields set and unset, sent through
``to_dict`` and validated; every field the schema requires of a type (and the
base's) is a field of its dataclass and every dataclass field is a schema
property; and parse_event reads back exactly what to_dict wrote.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jsonschema
import pytest
from serstream_client import model

from serstream import events

LABELS = ("angry", "happy", "neutral")
PROBS = {"angry": 0.2, "happy": 0.5, "neutral": 0.3}
MOOD = model.Mood(label="happy", confidence=0.5, probs=PROBS, arousal=0.1, valence=0.2, dominance=-0.1)

FULL: dict[str, model.BaseEvent] = {
    "stream": model.StreamEvent(stream="s", ts=1.0, state="closed", source="rtp", codec="pcmu", sample_rate=8000,
                                channels=1, detail="10.0.0.1:4000", reason="idle", id=7),
    "speech": model.SpeechEvent(stream="s", ts=1.0, state="end", t=2.5, duration=2.0, reason="silence", id=8),
    "emotion": model.EmotionEvent(stream="s", ts=1.0, seq=0, kind="final", utterance=0, t0=0.5, t1=2.5,
                                  label="happy", confidence=0.5, probs=PROBS, arousal=0.1, valence=0.2,
                                  dominance=-0.1, smoothed=MOOD, latency_ms=12.5,
                                  gender={"female": 0.4, "male": 0.6}, model="m-1"),
    "stats": model.StatsEvent(stream="*", ts=1.0, uptime_s=3.0, streams=1, windows_per_s=2.0,
                              batches={"count": 3, "mean_size": 1.5, "max_size": 2}, queues={"inference": 0},
                              drops={"overflow": 1}, latency_ms={"p50": 1.0, "p95": 2.0, "p99": 3.0, "count": 4},
                              device="cpu"),
    "error": model.ErrorEvent(stream="s", ts=1.0, code="bad_message", message="text ignored", count=1),
    "file": model.FileEvent(stream="f", ts=1.0, file="a.wav", label="happy", probs=PROBS, arousal=0.1,
                            valence=0.2, dominance=0.0, segments=2, duration_s=3.0),
    "gap": model.GapEvent(stream="*", ts=1.0, reason="history", lost=3, since=2, resume_from=6),
}
MINIMAL: dict[str, model.BaseEvent] = {
    "stream": model.StreamEvent(stream="s", ts=1.0, state="open", source="file", codec="pcm_f32",
                                sample_rate=16000, channels=2),
    "speech": model.SpeechEvent(stream="s", ts=1.0, state="start", t=0.0),
    "emotion": dataclasses.replace(FULL["emotion"], gender=None, model=None, kind="partial"),  # type: ignore[type-var]
    "file": model.FileEvent(stream="f", ts=1.0, file="quiet.wav", label=None, probs=None, arousal=None,
                            valence=None, dominance=None, segments=0, duration_s=1.0, note="no speech found"),
}


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return events.load_schema()


def test_every_event_type_on_the_wire_has_a_class(schema: dict[str, Any]) -> None:
    wire_types = {schema["$defs"][ref["$ref"].rsplit("/", 1)[1]]["properties"]["type"]["const"]
                  for ref in schema["oneOf"]}
    assert wire_types == set(model.EVENT_CLASSES) == set(events.EVENT_TYPES) == set(FULL)


@pytest.mark.parametrize("event", [*FULL.values(), *MINIMAL.values()], ids=lambda e: f"{e.TYPE}")
def test_every_event_the_model_makes_validates_and_parses_back(event: model.BaseEvent, schema: dict[str, Any]) -> None:
    wire = json.loads(events.dumps(event.to_dict()))
    jsonschema.Draft202012Validator(schema).validate(wire)
    assert list(wire)[:4] == ["type", "v", "stream", "ts"]
    back = model.parse_event(wire)
    assert back == event and back.to_dict() == wire


@pytest.mark.parametrize("kind", sorted(model.EVENT_CLASSES))
def test_schema_fields_and_dataclass_fields_are_the_same(kind: str, schema: dict[str, Any]) -> None:
    definition = schema["$defs"][f"{kind}_event"]
    cls = model.EVENT_CLASSES[kind]
    own = {f.name for f in dataclasses.fields(cls)} - {"stream", "ts", "v", "id", "raw"}
    assert set(definition["required"]) <= own, set(definition["required"]) - own
    assert set(definition["properties"]) - {"type", "stream"} == own
    base = schema["$defs"]["base"]
    assert set(base["properties"]) - {"type"} <= {f.name for f in dataclasses.fields(cls)}
    # Fields the schema requires have no default in the dataclass (so the model cannot leave them out).
    for f in dataclasses.fields(cls):
        if f.name in definition["required"]:
            assert f.default is dataclasses.MISSING, f.name


def test_mood_is_the_schema_mood(schema: dict[str, Any]) -> None:
    assert [f.name for f in dataclasses.fields(model.Mood)] == schema["$defs"]["mood"]["required"]


def test_the_monitors_constructors_send_the_models_dicts() -> None:
    built = events.emotion_event("s", seq=0, kind="final", utterance=0, t0=0.5, t1=2.5, labels=LABELS,
                                 probs=[0.2, 0.5, 0.3], avd=[0.1, 0.2, -0.1], smoothed=MOOD, latency_ms=12.5,
                                 ts=1.0, gender=[0.4, 0.6], model="m-1")
    assert built == FULL["emotion"].to_dict()
    assert events.dumps(built) == events.dumps(model.parse_event(built).to_dict())


@pytest.mark.parametrize("obj, says", [
    ({"type": "speech", "v": 1, "stream": "s", "ts": 1.0, "state": "start"}, "without 't'"),
    ({"type": "speech", "v": 1, "stream": "s", "ts": 1.0, "state": "start", "t": "soon"}, "'t' is not a finite"),
    ({"type": "telepathy", "v": 1, "stream": "s", "ts": 1.0}, "unknown event type"),
    ({"type": "gap", "v": "1", "stream": "s", "ts": 1.0}, "schema version"),
    ([1, 2], "JSON object"),
])
def test_malformed_objects_raise_one_clear_error(obj: Any, says: str) -> None:
    with pytest.raises(model.EventError, match=says) as info:
        model.parse_event(obj)
    assert "\n" not in str(info.value)


def test_unknown_fields_and_newer_versions_are_tolerated() -> None:
    wire = {**MINIMAL["speech"].to_dict(), "v": 2, "mood_ring": "blue", "id": 5}
    event = model.parse_event(wire)
    assert isinstance(event, model.SpeechEvent) and event.v == 2 and event.id == 5 and event.raw["mood_ring"] == "blue"
