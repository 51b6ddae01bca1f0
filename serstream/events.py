"""Constructors of the JSON events the monitor publishes (see docs/events.md).

The events themselves are the typed model of :mod:`serstream_client.model`
(the ``serstream-client`` distribution, shared with the clients): each
constructor here checks and rounds what the monitor computed (numpy arrays
welcome), builds the model's dataclass and returns its ``to_dict()``, so
every event on the wire is one of the model's. Each returns a plain
``dict`` ready for :func:`dumps`: floats are
rounded to 4 decimals, probabilities are objects ``label -> probability``
in the model's label order, and every event carries ``type``, ``v`` (the
schema version), ``stream`` and ``ts`` (unix wall-clock seconds, passed in:
nothing here reads a clock). The JSON Schema in
``serstream/schema/events.schema.json`` (:func:`schema_path`) describes
exactly these events; the tests check one against the other.

Numbers must be finite: a NaN or infinity raises ``ValueError`` here rather
than reaching a client as invalid JSON.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from serstream_client import model as model
from serstream_client import (
    model as model_types,  # emotion_event has a parameter named `model`
)

from serstream import contract
from serstream.errors import one_line

__all__ = [
    "SCHEMA_VERSION",
    "EVENT_TYPES",
    "STREAM_SOURCES",
    "SPEECH_END_REASONS",
    "ERROR_CODES",
    "STATS_STREAM",
    "schema_path",
    "load_schema",
    "dumps",
    "stream_opened",
    "stream_closed",
    "speech_start",
    "speech_end",
    "emotion_event",
    "stats_event",
    "error_event",
    "file_event",
    "file_event_no_speech",
    "gap_event",
    "GAP_REASONS",
    "probs_dict",
]

SCHEMA_VERSION = contract.EVENT_SCHEMA_VERSION
if SCHEMA_VERSION != model.SCHEMA_VERSION:  # pragma: no cover - a release mistake, caught at import
    raise ImportError(f"serstream speaks event schema v{SCHEMA_VERSION}, its serstream-client "
                      f"v{model.SCHEMA_VERSION}; install the serstream-client of this checkout")
EVENT_TYPES = tuple(model.EVENT_CLASSES)
#: Why a ``gap`` event was sent: events left the server's history before the client
#: reconnected; the client's own buffer overflowed (it reads too slowly); the
#: client's ``since`` is from an earlier run of the server (it restarted); or
#: ``since`` is beyond the last id issued.
GAP_REASONS = ("history", "overflow", "restart", "future")
#: Where a stream's audio comes from: ``websocket`` is ``/ingest``; ``twilio`` Twilio Media
#: Streams (``/twilio``), ``fork`` FreeSWITCH mod_audio_fork (``/fork``), ``audiosocket``
#: Asterisk AudioSocket (TCP).
STREAM_SOURCES = ("microphone", "file", "rtp", "websocket", "twilio", "fork", "audiosocket")
SPEECH_END_REASONS = ("silence", "max_length", "flush", "gap")
#: The error codes in use. Codes are stable identifiers; new ones may be added.
ERROR_CODES = (
    "bad_samples",
    "decode_error",
    "device_error",
    "inference_error",
    "bad_message",
    "bad_packet",
    "overflow",
    "source_error",
    "stream_error",
    "worker_lost",
)
#: ``stats`` events are about the whole monitor, not one stream.
STATS_STREAM = model.STATS_STREAM
EMOTION_KINDS = ("partial", "final")
_DIGITS = 4
_CODE = re.compile(r"[a-z][a-z0-9_]*")


def schema_path() -> Path:
    """Path of the JSON Schema (draft 2020-12) of every event."""
    return Path(__file__).with_name("schema") / "events.schema.json"


def load_schema() -> dict[str, Any]:
    """The JSON Schema as a dict."""
    schema: dict[str, Any] = json.loads(schema_path().read_text(encoding="utf-8"))
    return schema


def dumps(event: Mapping[str, Any]) -> str:
    """Compact JSON of one event (no spaces, UTF-8 text, NaN refused)."""
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


# ---------------------------------------------------------------- helpers


def _num(value: Any, name: str) -> float:
    x = float(value)
    if not math.isfinite(x):
        raise ValueError(f"event field {name!r} is not finite: {x}")
    return round(x, _DIGITS)


def _unit(value: Any, name: str) -> float:
    """A number in [-1, 1] (arousal, valence, dominance); clipped after the finite check."""
    return min(1.0, max(-1.0, _num(value, name)))


def _prob(value: Any, name: str) -> float:
    return min(1.0, max(0.0, _num(value, name)))


def _choice(value: str, allowed: Sequence[str], name: str) -> str:
    if value not in allowed:
        raise ValueError(f"event field {name!r} must be one of {', '.join(allowed)}; got {value!r}")
    return value




def probs_dict(labels: Sequence[str], probs: np.ndarray | Sequence[float] | Mapping[str, float]) -> dict[str, float]:
    """``label -> probability`` (rounded) in label order, from an array or a mapping."""
    if isinstance(probs, Mapping):
        missing = [label for label in labels if label not in probs]
        if missing:
            raise ValueError(f"probabilities lack the labels {missing}")
        values = [probs[label] for label in labels]
    else:
        values = list(np.asarray(probs, dtype=np.float64).reshape(-1))
        if len(values) != len(labels):
            raise ValueError(f"{len(values)} probabilities for {len(labels)} labels")
    return {str(label): _prob(v, f"probs.{label}") for label, v in zip(labels, values)}


def _top(probs: Mapping[str, float]) -> tuple[str, float]:
    # Ties go to the earlier label, like numpy's argmax over the label order.
    label = max(probs, key=lambda k: probs[k])
    return label, probs[label]


def _avd(avd: Sequence[float] | np.ndarray) -> tuple[float, float, float]:
    values = np.asarray(avd, dtype=np.float64).reshape(-1)
    if values.size != 3:
        raise ValueError(f"avd needs 3 values (arousal, valence, dominance), got {values.size}")
    return (
        _unit(values[0], "arousal"),
        _unit(values[1], "valence"),
        _unit(values[2], "dominance"),
    )


def _opt_str(value: str | None) -> str | None:
    return None if value is None else str(value)


def _field(obj: Any, name: str) -> Any:
    return obj[name] if isinstance(obj, Mapping) else getattr(obj, name)


# ---------------------------------------------------------------- constructors


def stream_opened(
    stream: str,
    *,
    source: str,
    codec: str,
    sample_rate: int,
    channels: int,
    ts: float,
    detail: str | None = None,
    call: str | None = None,
    role: str | None = None,
    params: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """A stream opened: where its audio comes from, in what native format, and which party of which call."""
    return model.StreamEvent(
        stream=str(stream), ts=_num(ts, "ts"), state="open", source=_choice(source, STREAM_SOURCES, "source"),
        codec=str(codec), sample_rate=int(sample_rate), channels=int(channels),
        detail=None if detail is None else str(detail),
        call=_opt_str(call), role=_opt_str(role),
        params=None if params is None else {str(k): str(v) for k, v in params.items()},
    ).to_dict()


def stream_closed(
    stream: str,
    *,
    source: str,
    codec: str,
    sample_rate: int,
    channels: int,
    ts: float,
    detail: str | None = None,
    reason: str | None = None,
    call: str | None = None,
    role: str | None = None,
) -> dict[str, Any]:
    """A stream closed; ``reason`` says why (e.g. "end of file", "client closed")."""
    return model.StreamEvent(
        stream=str(stream), ts=_num(ts, "ts"), state="closed", source=_choice(source, STREAM_SOURCES, "source"),
        codec=str(codec), sample_rate=int(sample_rate), channels=int(channels),
        detail=None if detail is None else str(detail),
        reason=None if reason is None else one_line(reason, first_line=True, limit=None),
        call=_opt_str(call), role=_opt_str(role),
    ).to_dict()


def speech_start(stream: str, *, t: float, ts: float) -> dict[str, Any]:
    """Speech started at stream time ``t`` (seconds, pre-roll included)."""
    return model.SpeechEvent(stream=str(stream), ts=_num(ts, "ts"), state="start", t=_num(t, "t")).to_dict()


def speech_end(
    stream: str, *, t: float, duration: float, reason: str, ts: float
) -> dict[str, Any]:
    """Speech ended at stream time ``t`` after ``duration`` seconds; ``reason`` as in the VAD."""
    return model.SpeechEvent(
        stream=str(stream), ts=_num(ts, "ts"), state="end", t=_num(t, "t"), duration=_num(duration, "duration"),
        reason=_choice(reason, SPEECH_END_REASONS, "reason"),
    ).to_dict()


def emotion_event(
    stream: str,
    *,
    seq: int,
    kind: str,
    utterance: int,
    t0: float,
    t1: float,
    labels: Sequence[str],
    probs: np.ndarray | Sequence[float] | Mapping[str, float],
    avd: np.ndarray | Sequence[float],
    smoothed: Any,
    latency_ms: float,
    ts: float,
    gender: np.ndarray | Sequence[float] | Mapping[str, float] | None = None,
    model: str | None = None,
    call: str | None = None,
    role: str | None = None,
) -> dict[str, Any]:
    """One estimate for the window ``[t0, t1)`` (stream seconds).

    ``probs`` are the calibrated probabilities (array in label order, or a
    mapping); ``avd`` is (arousal, valence, dominance); ``smoothed`` is the
    stream's smoothed state, any object or mapping with ``label``,
    ``confidence``, ``probs`` (mapping), ``arousal``, ``valence`` and
    ``dominance`` (e.g. :class:`serstream.core.smoother.MoodState`);
    ``gender`` is (female, male) probabilities.
    """
    p = probs_dict(labels, probs)
    label, confidence = _top(p)
    arousal, valence, dominance = _avd(avd)
    smoothed_probs = probs_dict(labels, _field(smoothed, "probs"))
    return model_types.EmotionEvent(
        stream=str(stream),
        ts=_num(ts, "ts"),
        seq=int(seq),
        kind=_choice(kind, EMOTION_KINDS, "kind"),
        utterance=int(utterance),
        t0=_num(t0, "t0"),
        t1=_num(t1, "t1"),
        label=label,
        confidence=confidence,
        probs=p,
        arousal=arousal,
        valence=valence,
        dominance=dominance,
        smoothed=model_types.Mood(
            label=str(_field(smoothed, "label")),
            confidence=_prob(_field(smoothed, "confidence"), "smoothed.confidence"),
            probs=smoothed_probs,
            arousal=_unit(_field(smoothed, "arousal"), "smoothed.arousal"),
            valence=_unit(_field(smoothed, "valence"), "smoothed.valence"),
            dominance=_unit(_field(smoothed, "dominance"), "smoothed.dominance"),
        ),
        latency_ms=_num(max(0.0, float(latency_ms)), "latency_ms"),
        gender=None if gender is None else probs_dict(("female", "male"), gender),
        model=None if model is None else str(model),
        call=_opt_str(call), role=_opt_str(role),
    ).to_dict()


def stats_event(
    *,
    uptime_s: float,
    streams: int,
    windows_per_s: float,
    batches: Mapping[str, float],
    queues: Mapping[str, int],
    drops: Mapping[str, int],
    latency_ms: Mapping[str, float | None],
    device: str,
    ts: float,
) -> dict[str, Any]:
    """Periodic counters of the whole monitor (``stream`` is ``"*"``).

    ``batches``: count, mean_size, max_size. ``latency_ms``: p50, p95, p99
    (None while nothing is measured: sent as 0) and count.
    """
    return model.StatsEvent(
        stream=STATS_STREAM,
        ts=_num(ts, "ts"),
        uptime_s=_num(uptime_s, "uptime_s"),
        streams=int(streams),
        windows_per_s=_num(windows_per_s, "windows_per_s"),
        batches={
            "count": int(batches.get("count", 0)),
            "mean_size": _num(batches.get("mean_size", 0.0), "batches.mean_size"),
            "max_size": int(batches.get("max_size", 0)),
        },
        queues={str(k): int(v) for k, v in queues.items()},
        drops={str(k): int(v) for k, v in drops.items()},
        latency_ms={
            **{
                q: _num(latency_ms.get(q) or 0.0, f"latency_ms.{q}")
                for q in ("p50", "p95", "p99")
            },
            "count": int(latency_ms.get("count") or 0),
        },
        device=_choice(device, ("cpu", "cuda"), "device"),
    ).to_dict()


def error_event(
    stream: str, *, code: str, message: str, count: int, ts: float
) -> dict[str, Any]:
    """A cause of trouble on ``stream``, first reported (later: only counts in ``stats``).

    ``code`` is a stable identifier (see :data:`ERROR_CODES`), ``message``
    one line for people, ``count`` how often this cause occurred so far.
    """
    if not _CODE.fullmatch(code):
        raise ValueError(f"error code must be a lower-case identifier, got {code!r}")
    if int(count) < 1:
        raise ValueError(f"error count must be >= 1 (the event reports an occurrence), got {count}")
    return model.ErrorEvent(
        stream=str(stream), ts=_num(ts, "ts"), code=code,
        message=one_line(message, first_line=True, limit=None) or code, count=int(count),
    ).to_dict()


def file_event_no_speech(stream: str, *, file: str, duration_s: float, ts: float) -> dict[str, Any]:
    """The summary of a file in which the VAD found no speech: nothing to average, so nulls and a note."""
    return model.FileEvent(
        stream=str(stream), ts=_num(ts, "ts"),
        file=str(file), label=None, probs=None, arousal=None, valence=None, dominance=None,
        segments=0, duration_s=_num(duration_s, "duration_s"), note="no speech found",
    ).to_dict()


def file_event(
    stream: str,
    *,
    file: str,
    labels: Sequence[str],
    probs: np.ndarray | Sequence[float] | Mapping[str, float],
    avd: np.ndarray | Sequence[float],
    segments: int,
    duration_s: float,
    ts: float,
) -> dict[str, Any]:
    """The summary of one file from ``serstream analyze``."""
    p = probs_dict(labels, probs)
    label, _ = _top(p)
    arousal, valence, dominance = _avd(avd)
    return model.FileEvent(
        stream=str(stream),
        ts=_num(ts, "ts"),
        file=str(file),
        label=label,
        probs=p,
        arousal=arousal,
        valence=valence,
        dominance=dominance,
        segments=int(segments),
        duration_s=_num(duration_s, "duration_s"),
    ).to_dict()


def gap_event(
    stream: str, *, reason: str, lost: int, since: int, resume_from: int, ts: float
) -> dict[str, Any]:
    """Events this client will never receive: ``lost`` of them after id ``since``.

    Sent by the server to one ``/events`` client (it has no ``id`` of its own):
    ``resume_from`` is the first id the server still holds for it. ``stream``
    is the client's ``?stream=`` filter, ``"*"`` without one.
    """
    if int(lost) < 0 or int(since) < 0 or int(resume_from) < 1:
        raise ValueError(f"gap counts must be >= 0 (resume_from >= 1): {lost}, {since}, {resume_from}")
    return model.GapEvent(
        stream=str(stream), ts=_num(ts, "ts"), reason=_choice(reason, GAP_REASONS, "reason"), lost=int(lost),
        since=int(since), resume_from=int(resume_from),
    ).to_dict()
