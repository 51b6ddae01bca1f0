"""What every audio source offers the command line and the server.

A source turns audio from somewhere (a device, a file, UDP, a WebSocket) into
monitor streams through ``Monitor.open_stream`` and ``StreamHandle``; the
protocol decoding lives in a pure session object beside it (``rtp/session.py``
for RTP, ``sources/ingest_session.py`` for ``/ingest``), so the source itself
is a thin I/O adapter. ``cli.py`` holds sources as :class:`Source` and needs
nothing else from them. docs/extending.md shows how to add one.
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol, runtime_checkable

__all__ = ["SourceInfo", "Source"]


@runtime_checkable
class SourceInfo(Protocol):
    """What any source can say about itself, from any thread."""

    @property
    def description(self) -> str:
        """One line for the startup log, e.g. ``receiving RTP on 127.0.0.1:5004``."""
        ...

    @property
    def stream_ids(self) -> list[str]:
        """Ids of the monitor streams this source has open now."""
        ...

    def stats(self) -> Mapping[str, Any]:
        """This source's own counters (its drops are also in ``Monitor.stats()["drops"]``)."""
        ...


@runtime_checkable
class Source(SourceInfo, Protocol):
    """A source the command line starts and stops (microphone, file, RTP port).

    The ``/ingest`` handler is a :class:`SourceInfo` only: the WebSocket server
    starts it per connection and its streams end with their connections.
    """

    def start(self) -> None:
        """Open the stream(s) and start delivering audio; ``SourceError`` (one line) on failure."""
        ...

    def stop(self) -> None:
        """Stop delivering and close this source's streams; safe to call twice."""
        ...
