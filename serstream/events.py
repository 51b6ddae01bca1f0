"""Constructors of the JSON events the monitor publishes (see docs/events.md).

Each function returns a plain ``dict`` ready for :func:`dumps`: floats are
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

from serstream import contract

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
EVENT_TYPES = ("stream", "speech", "emotion", "stats", "error", "file", "gap")
#: Why a ``gap`` event was sent: events left the server's history before the client
#: reconnected; the client's own buffer overflowed (it reads too slowly); the
#: client's ``since`` is from an earlier run of the server (it restarted); or
#: ``since`` is beyond the last id issued.
GAP_REASONS = ("history", "overflow", "restart", "future")
STREAM_SOURCES = ("microphone", "file", "rtp", "websocket")
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
)
#: ``stats`` events are about the whole monitor, not one stream.
STATS_STREAM = "*"
EMOTION_KINDS = ("partial", "final")
_DIGITS = 4
_CODE = re.compile(r"[a-z][a-z0-9_]*")


def schema_path() -> Path:
    """Path of the JSON Schema (draft 2020-12) of every event."""
    return Path(__file__).with_name("schema") / "events.schema.json"


def load_schema() -> dict[str, Any]:
    """The JSON Schema as a dict."""
    return json.loads(schema_path().read_text(encoding="utf-8"))


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


def _one_line(text: str) -> str:
    lines = str(text).strip().splitlines()
    return lines[0].strip() if lines else ""


def _choice(value: str, allowed: Sequence[str], name: str) -> str:
    if value not in allowed:
        raise ValueError(f"event field {name!r} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def _base(kind: str, stream: str, ts: float) -> dict[str, Any]:
    return {"type": kind, "v": SCHEMA_VERSION, "stream": str(stream), "ts": _num(ts, "ts")}


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
) -> dict[str, Any]:
    """A stream opened: where its audio comes from and in what native format."""
    event = _base("stream", stream, ts)
    event.update(
        state="open",
        source=_choice(source, STREAM_SOURCES, "source"),
        codec=str(codec),
        sample_rate=int(sample_rate),
        channels=int(channels),
    )
    if detail is not None:
        event["detail"] = str(detail)
    return event


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
) -> dict[str, Any]:
    """A stream closed; ``reason`` says why (e.g. "end of file", "client closed")."""
    event = stream_opened(
        stream, source=source, codec=codec, sample_rate=sample_rate, channels=channels,
        ts=ts, detail=detail,
    )
    event["state"] = "closed"
    if reason is not None:
        event["reason"] = _one_line(reason)
    return event


def speech_start(stream: str, *, t: float, ts: float) -> dict[str, Any]:
    """Speech started at stream time ``t`` (seconds, pre-roll included)."""
    event = _base("speech", stream, ts)
    event.update(state="start", t=_num(t, "t"))
    return event


def speech_end(
    stream: str, *, t: float, duration: float, reason: str, ts: float
) -> dict[str, Any]:
    """Speech ended at stream time ``t`` after ``duration`` seconds; ``reason`` as in the VAD."""
    event = _base("speech", stream, ts)
    event.update(
        state="end",
        t=_num(t, "t"),
        duration=_num(duration, "duration"),
        reason=_choice(reason, SPEECH_END_REASONS, "reason"),
    )
    return event


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
    event = _base("emotion", stream, ts)
    event.update(
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
        smoothed={
            "label": str(_field(smoothed, "label")),
            "confidence": _prob(_field(smoothed, "confidence"), "smoothed.confidence"),
            "probs": smoothed_probs,
            "arousal": _unit(_field(smoothed, "arousal"), "smoothed.arousal"),
            "valence": _unit(_field(smoothed, "valence"), "smoothed.valence"),
            "dominance": _unit(_field(smoothed, "dominance"), "smoothed.dominance"),
        },
        latency_ms=_num(max(0.0, float(latency_ms)), "latency_ms"),
    )
    if gender is not None:
        event["gender"] = probs_dict(("female", "male"), gender)
    if model is not None:
        event["model"] = str(model)
    return event


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
    event = _base("stats", STATS_STREAM, ts)
    event.update(
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
    )
    return event


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
    event = _base("error", stream, ts)
    event.update(code=code, message=_one_line(message) or code, count=int(count))
    return event


def file_event_no_speech(stream: str, *, file: str, duration_s: float, ts: float) -> dict[str, Any]:
    """The summary of a file in which the VAD found no speech: nothing to average, so nulls and a note."""
    event = _base("file", stream, ts)
    event.update(
        file=str(file), label=None, probs=None, arousal=None, valence=None, dominance=None,
        segments=0, duration_s=_num(duration_s, "duration_s"), note="no speech found",
    )
    return event


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
    event = _base("file", stream, ts)
    event.update(
        file=str(file),
        label=label,
        probs=p,
        arousal=arousal,
        valence=valence,
        dominance=dominance,
        segments=int(segments),
        duration_s=_num(duration_s, "duration_s"),
    )
    return event


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
    event = _base("gap", stream, ts)
    event.update(
        reason=_choice(reason, GAP_REASONS, "reason"), lost=int(lost), since=int(since),
        resume_from=int(resume_from),
    )
    return event
