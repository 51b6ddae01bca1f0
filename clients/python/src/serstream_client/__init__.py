"""serstream-client: the typed events of a serstream monitor and the clients that read and feed it.

Depends only on ``websockets``. :mod:`serstream_client.model` is the event
model (one frozen dataclass per event type, ``to_dict()``, ``parse_event``);
:mod:`serstream_client.client` reads ``/events`` (:func:`events`, with
reconnect, ``since``, token and ``ca_file``) and pushes audio to ``/ingest``
(:class:`IngestClient`, :func:`push_file`). See docs/python-client.md.
"""

from serstream_client.client import (
    DEFAULT_EVENTS_URL,
    DEFAULT_INGEST_URL,
    AccessDenied,
    AnyEvent,
    BadURL,
    ClientError,
    IngestClient,
    IngestRefused,
    MonitorUnavailable,
    TLSFailed,
    client_ssl_context,
    events,
    push_file,
    read_event,
)
from serstream_client.model import (
    EVENT_CLASSES,
    SCHEMA_VERSION,
    BaseEvent,
    EmotionEvent,
    ErrorEvent,
    Event,
    EventError,
    FileEvent,
    GapEvent,
    Mood,
    SpeechEvent,
    StatsEvent,
    StreamEvent,
    UnknownEvent,
    parse_event,
)

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
    "parse_event",
    "read_event",
    "events",
    "IngestClient",
    "push_file",
]
