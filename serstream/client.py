"""Compatibility home of the Python client: it lives in the ``serstream-client`` distribution.

``serstream`` depends on ``serstream-client`` (clients/python, import name
:mod:`serstream_client`: the typed event model and the ``/events`` and
``/ingest`` clients, depending only on ``websockets``); this module
re-exports it so ``from serstream.client import ...`` keeps working. New
code imports :mod:`serstream_client`.

One difference kept for compatibility: here :func:`parse_event` is the
lenient reader (:func:`serstream_client.read_event`: never raises, gives an
:class:`UnknownEvent` for what it cannot read), while
:func:`serstream_client.parse_event` is the model's strict parser.
"""

from __future__ import annotations

from serstream_client import (
    DEFAULT_EVENTS_URL,
    DEFAULT_INGEST_URL,
    EVENT_CLASSES,
    SCHEMA_VERSION,
    AccessDenied,
    AnyEvent,
    BadURL,
    BaseEvent,
    ClientError,
    EmotionEvent,
    ErrorEvent,
    Event,
    EventError,
    FileEvent,
    GapEvent,
    IngestClient,
    IngestRefused,
    MonitorUnavailable,
    Mood,
    SpeechEvent,
    StatsEvent,
    StreamEvent,
    TLSFailed,
    UnknownEvent,
    client_ssl_context,
    events,
    push_file,
    read_event,
)

#: The lenient reader, under the name this module always gave it.
parse_event = read_event

__all__ = [
    "DEFAULT_EVENTS_URL",
    "DEFAULT_INGEST_URL",
    "SCHEMA_VERSION",
    "EVENT_CLASSES",
    "ClientError",
    "MonitorUnavailable",
    "BadURL",
    "IngestRefused",
    "AccessDenied",
    "TLSFailed",
    "client_ssl_context",
    "Mood",
    "BaseEvent",
    "EmotionEvent",
    "SpeechEvent",
    "StreamEvent",
    "StatsEvent",
    "ErrorEvent",
    "FileEvent",
    "GapEvent",
    "UnknownEvent",
    "Event",
    "AnyEvent",
    "EventError",
    "read_event",
    "events",
    "IngestClient",
    "push_file",
    "parse_event",
]
