"""Stream ids: the one suffix rule every source follows (pure).

A source proposes a base id (``file:NAME``, ``mic:DEVICE``, ``rtp:SSRC``, an
``/ingest`` hello's name). If no live stream has it, the stream gets it as it
is; otherwise the first free of ``BASE-2``, ``BASE-3``, ... ``BASE-100``. So
two files with the same name, a client that reconnects while its old stream
is still closing, or one SSRC seen on two ports all get distinct ids, and the
id says which came first. ``Monitor.open_stream(..., unique=True)`` applies the
rule under the registry lock; the ``/ingest`` handler walks
:func:`candidates` itself (it subscribes to the id before opening it) and
moves on when ``open_stream`` raises ``StreamIdTaken``.
"""

from __future__ import annotations

from typing import Container, Iterator

__all__ = ["MAX_SUFFIX", "candidates", "allocate"]

#: The largest suffix tried: ``BASE-100``; beyond it the open is refused.
MAX_SUFFIX = 100


def candidates(base: str, max_suffix: int = MAX_SUFFIX) -> Iterator[str]:
    """``base``, then ``base-2`` ... ``base-{max_suffix}``, in the order they are tried."""
    yield base
    for n in range(2, max_suffix + 1):
        yield f"{base}-{n}"


def allocate(base: str, taken: Container[str], max_suffix: int = MAX_SUFFIX) -> str | None:
    """The first id of :func:`candidates` not in ``taken``; None when all are."""
    for stream_id in candidates(base, max_suffix):
        if stream_id not in taken:
            return stream_id
    return None
