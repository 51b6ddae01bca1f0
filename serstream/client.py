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

from serstream_client import *  # noqa: F403 - the re-export is the point
from serstream_client import __all__ as _client_all
from serstream_client import read_event as parse_event

__all__ = [name for name in _client_all if name != "read_event"]
