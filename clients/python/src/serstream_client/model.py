"""The typed model of every serstream event on the wire (docs/events.md).

One frozen dataclass per event ``type``; each has ``to_dict()``, the JSON
object the monitor sends (same field names and order as always: ``type``,
``v``, ``stream``, ``ts``, the type's own fields, then ``id`` when the event
bus numbered it), and :func:`parse_event` reads such an object back.
The monitor builds its events through these classes and the clients parse
with them, so there is one definition of what an event holds; the JSON
Schema (``serstream/schema/events.schema.json``) is checked against this
module by the tests, so the two cannot drift apart.

Pure and stdlib only: no I/O, no clock (``ts`` is passed in), no numpy.
Values are stored as given; rounding and range checks of what the monitor
computes happen where it builds them (``serstream.events``).

Parsing follows the rule docs/events.md gives clients: fields this model
does not know are ignored (kept in ``raw``), a newer schema version ``v`` is
read for the fields known here; anything else that does not fit (a missing
required field, a string where a number belongs, an unknown ``type``)
raises :class:`EventError` with one line saying what.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping

__all__ = [
    "SCHEMA_VERSION",
    "STATS_STREAM",
    "EventError",
    "Mood",
    "BaseEvent",
    "StreamEvent",
    "SpeechEvent",
    "EmotionEvent",
    "StatsEvent",
    "ErrorEvent",
    "FileEvent",
    "GapEvent",
    "UnknownEvent",
    "Event",
    "EVENT_CLASSES",
    "parse_event",
]

#: The event schema version this model describes (``v`` of every event). ``v`` changes only on
#: breaking changes; additive revisions keep it: 1.1 added ``id`` and ``gap``, 1.2 ``call``/``role``
#: (stream and emotion events) and ``params`` (stream events).
SCHEMA_VERSION = 1
#: ``stats`` events are about the whole monitor, not one stream.
STATS_STREAM = "*"


class EventError(ValueError):
    """A JSON object that is not a valid event of a known type; the message is one line."""


@dataclass(frozen=True)
class Mood:
    """A smoothed emotional state: the ``smoothed`` field of an emotion event.

    The monitor's smoother produces it (``serstream.core.smoother.MoodState``
    is this class) and the Pipecat plugin's per-turn ``EmotionReading``
    extends it, so the six fields mean the same everywhere.
    """

    label: str
    confidence: float
    probs: dict[str, float]
    arousal: float
    valence: float
    dominance: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label, "confidence": self.confidence, "probs": dict(self.probs),
            "arousal": self.arousal, "valence": self.valence, "dominance": self.dominance,
        }


@dataclass(frozen=True, kw_only=True)
class BaseEvent:
    """Fields every event has.

    ``id`` is the bus-wide event number (``/events`` only; None for ``gap``
    events and ``serstream analyze`` output); ``raw`` is the object an event
    was parsed from (every field, known or not; empty for events built here).
    """

    #: The wire ``type`` of the class (a class constant, not a field).
    TYPE: ClassVar[str] = ""
    #: Optional fields left out of ``to_dict()`` while None (the others are sent as null).
    OMIT_WHEN_NONE: ClassVar[frozenset[str]] = frozenset()

    stream: str
    ts: float
    v: int = SCHEMA_VERSION
    id: int | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def type(self) -> str:
        return self.TYPE

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of this event, as the monitor sends it."""
        out: dict[str, Any] = {"type": self.TYPE, "v": self.v, "stream": self.stream, "ts": self.ts}
        for f in dataclasses.fields(self):
            if f.name in _BASE_FIELDS:
                continue
            value = getattr(self, f.name)
            if value is None and f.name in self.OMIT_WHEN_NONE:
                continue
            out[f.name] = _plain(value)
        if self.id is not None:
            out["id"] = self.id
        return out


_BASE_FIELDS = frozenset({"stream", "ts", "v", "id", "raw"})


def _plain(value: Any) -> Any:
    if isinstance(value, Mood):
        return value.to_dict()
    if isinstance(value, dict):
        return dict(value)
    return value


@dataclass(frozen=True, kw_only=True)
class StreamEvent(BaseEvent):
    """A stream opened (``state`` "open") or closed ("closed", with a ``reason``)."""

    TYPE: ClassVar[str] = "stream"
    OMIT_WHEN_NONE: ClassVar[frozenset[str]] = frozenset({"detail", "reason", "call", "role", "params"})

    state: str
    source: str
    codec: str
    sample_rate: int
    channels: int
    detail: str | None = None
    reason: str | None = None
    #: The call this stream is one party of (e.g. a Twilio callSid); None for a lone stream.
    call: str | None = None
    #: The party within the call (e.g. ``caller``/``callee``, ``inbound``/``outbound``, ``left``/``right``).
    role: str | None = None
    #: Parameters the source was given for this stream (e.g. Twilio ``customParameters``).
    params: dict[str, str] | None = None


@dataclass(frozen=True, kw_only=True)
class SpeechEvent(BaseEvent):
    """Speech started (``state`` "start") or ended ("end", with ``duration`` and ``reason``) at stream time ``t``."""

    TYPE: ClassVar[str] = "speech"
    OMIT_WHEN_NONE: ClassVar[frozenset[str]] = frozenset({"duration", "reason"})

    state: str
    t: float
    duration: float | None = None
    reason: str | None = None


@dataclass(frozen=True, kw_only=True)
class EmotionEvent(BaseEvent):
    """One estimate for the stream audio ``[t0, t1)``; ``smoothed`` is the stream's state after it."""

    TYPE: ClassVar[str] = "emotion"
    OMIT_WHEN_NONE: ClassVar[frozenset[str]] = frozenset({"gender", "model", "call", "role"})

    seq: int
    kind: str
    utterance: int
    t0: float
    t1: float
    label: str
    confidence: float
    probs: dict[str, float]
    arousal: float
    valence: float
    dominance: float
    smoothed: Mood
    latency_ms: float
    gender: dict[str, float] | None = None
    model: str | None = None
    #: As on the stream's ``stream`` event: the call and the party this estimate is of.
    call: str | None = None
    role: str | None = None


@dataclass(frozen=True, kw_only=True)
class StatsEvent(BaseEvent):
    """Periodic counters of the whole monitor (``stream`` is ``"*"``)."""

    TYPE: ClassVar[str] = "stats"

    uptime_s: float
    streams: int
    windows_per_s: float
    batches: dict[str, float]
    queues: dict[str, int]
    drops: dict[str, int]
    latency_ms: dict[str, float]
    device: str


@dataclass(frozen=True, kw_only=True)
class ErrorEvent(BaseEvent):
    """A cause of trouble on a stream, first reported (later only counted in ``stats``)."""

    TYPE: ClassVar[str] = "error"

    code: str
    message: str
    count: int


@dataclass(frozen=True, kw_only=True)
class FileEvent(BaseEvent):
    """The summary of one file from ``serstream analyze``.

    A file without speech has ``segments`` 0, ``label``/``probs``/AVD None
    (sent as null) and a ``note``.
    """

    TYPE: ClassVar[str] = "file"
    OMIT_WHEN_NONE: ClassVar[frozenset[str]] = frozenset({"note"})

    file: str
    label: str | None
    probs: dict[str, float] | None
    arousal: float | None
    valence: float | None
    dominance: float | None
    segments: int
    duration_s: float
    note: str | None = None


@dataclass(frozen=True, kw_only=True)
class GapEvent(BaseEvent):
    """Events one ``/events`` client will never receive: ``lost`` of them after id ``since``.

    ``reason``: ``history`` (they left the server's history before the
    reconnect), ``overflow`` (this client read too slowly), ``restart`` (its
    last id is from an earlier run of the monitor) or ``future`` (beyond
    the ids issued). ``resume_from`` is the first id the server still holds.
    """

    TYPE: ClassVar[str] = "gap"

    reason: str
    lost: int
    since: int
    resume_from: int


@dataclass(frozen=True, kw_only=True)
class UnknownEvent:
    """What a client got that is not a known event (only the clients make these; never sent).

    ``problem`` says why in one line; ``malformed`` is False for a
    well-formed object of a type this model does not know (a newer
    monitor's), True for everything else (not JSON, not an object, a known
    type with bad fields).
    """

    type: str
    v: int
    stream: str
    ts: float
    id: int | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)
    problem: str
    malformed: bool = True


Event = StreamEvent | SpeechEvent | EmotionEvent | StatsEvent | ErrorEvent | FileEvent | GapEvent

#: The event classes by wire ``type``.
EVENT_CLASSES: dict[str, type[BaseEvent]] = {
    cls.TYPE: cls for cls in (StreamEvent, SpeechEvent, EmotionEvent, StatsEvent, ErrorEvent, FileEvent, GapEvent)
}


# --------------------------------------------------------------------------- parsing


class _Bad(Exception):
    """A value of the wrong kind; the message names the kind wanted."""


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise _Bad("a string")
    return value


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Bad("an integer")
    return value


def _num(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _Bad("a finite number")
    return value  # an int stays an int, so parse_event(e.to_dict()) sends the same JSON


def _numbers(value: Any) -> dict[str, float]:
    if not isinstance(value, Mapping):
        raise _Bad("an object of numbers")
    return {str(k): _num(v) for k, v in value.items()}


def _strings(value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise _Bad("an object of strings")
    return {str(k): _str(v) for k, v in value.items()}


def _counts(value: Any) -> dict[str, int]:
    if not isinstance(value, Mapping):
        raise _Bad("an object of integers")
    return {str(k): _int(v) for k, v in value.items()}


def _mood(value: Any) -> Mood:
    if not isinstance(value, Mapping):
        raise _Bad("an object")
    try:
        return Mood(
            label=_str(value["label"]), confidence=_num(value["confidence"]), probs=_numbers(value["probs"]),
            arousal=_num(value["arousal"]), valence=_num(value["valence"]), dominance=_num(value["dominance"]),
        )
    except KeyError as exc:
        raise _Bad(f"an object with {exc.args[0]!r}") from None


_Reader = Callable[[Any], Any]
# The reader of each field's annotation (the annotations are strings: `from __future__ import annotations`).
_READERS: dict[str, _Reader] = {
    "str": _str, "int": _int, "float": _num, "dict[str, float]": _numbers, "dict[str, int]": _counts,
    "dict[str, str]": _strings,
    "Mood": _mood,
}


def _reader(annotation: str) -> tuple[_Reader, bool]:
    """(reader, nullable) of one field's annotation."""
    nullable = annotation.endswith(" | None")
    base = annotation[: -len(" | None")] if nullable else annotation
    return _READERS[base], nullable


def _event_id(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else None


def parse_event(obj: Mapping[str, Any]) -> Event:
    """The typed event of one decoded JSON object; :class:`EventError` (one line) if it is none.

    Unknown fields are ignored (and kept in ``raw``); a newer ``v`` is read
    for the known fields; an ``id`` that is not an integer >= 1 is dropped.
    """
    if not isinstance(obj, Mapping):
        raise EventError(f"an event is a JSON object, not {type(obj).__name__}")
    kind = obj.get("type")
    cls = EVENT_CLASSES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise EventError(f"unknown event type {kind!r}")
    version = obj.get("v")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise EventError(f"a {kind} event without a valid schema version 'v' ({version!r})")
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in ("v", "id", "raw"):
            continue
        read, nullable = _reader(str(f.type))
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        value = obj.get(f.name)
        if value is None:
            if nullable and f.name in obj:
                values[f.name] = None
            elif required:
                raise EventError(f"a {kind} event without {f.name!r}")
            continue
        try:
            values[f.name] = read(value)
        except _Bad as exc:
            raise EventError(f"a {kind} event whose {f.name!r} is not {exc}") from None
    return cls(v=version, id=_event_id(obj.get("id")), raw=obj, **values)  # type: ignore[return-value]
