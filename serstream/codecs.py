"""The one audio codec registry: wire bytes -> float32 samples, for RTP and WebSocket ingest.

Every source that receives encoded audio looks its codec up here, so a new
codec is one entry, not an ``if/elif`` in each source. Pure: no I/O, no state.

A :class:`Codec` decodes a whole number of samples (``bytes_per_sample``
each, channels interleaved) into float32 samples in [-1, 1], still
interleaved; the caller reshapes or mixes channels. Names:

* ``rtp_name`` is the SDP/RTP encoding name (``PCMU``, ``PCMA``, ``L16``) that
  ``--rtp-map`` and the static payload types use; None: not an RTP encoding.
* ``ingest_name`` is the ``format`` of an ``/ingest`` hello (``s16le``,
  ``f32le``); None: not offered on ``/ingest``.
* ``stream_codec`` is what the ``stream`` open event reports as ``codec``.

Registered: G.711 u-law (PCMU) and A-law (PCMA), L16 (big-endian signed
16-bit, network order, RFC 3551 §4.5.11), s16le and f32le (little-endian, the
``/ingest`` formats).

Extension point (not implemented): Opus and G.722. G.722 is sample-based but
its ADPCM decoder keeps state between packets, and Opus decodes whole frames
with packet-loss concealment, so neither fits the stateless ``decode`` here.
Adding one means a ``Codec`` whose ``decode`` is replaced by a per-stream
decoder factory, built when the stream opens (in ``serstream/rtp/session.py``),
and ``bytes_per_sample`` replaced by a frame duration from the payload;
docs/extending.md has the steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Final, Mapping

import numpy as np
import numpy.typing as npt

from serstream.errors import CodecError

__all__ = [
    "Codec",
    "CODECS",
    "Decoder",
    "CodecError",
    "rtp_encodings",
    "rtp_codec",
    "ingest_formats",
    "ingest_codec",
]

Bytes = bytes | bytearray | memoryview
#: Bytes (a whole number of samples) -> float32 samples in [-1, 1], channels still interleaved.
Decoder = Callable[[Bytes], npt.NDArray[np.float32]]

_PCM16_SCALE = np.float32(1 / 32768)


@dataclass(frozen=True)
class Codec:
    """One encoding: how many bytes a sample takes and how to decode it."""

    name: str
    bytes_per_sample: int
    decode: Decoder
    stream_codec: str
    rtp_name: str | None = None
    ingest_name: str | None = None

    def frames(self, n_bytes: int, channels: int = 1) -> int:
        """Whole sample frames (one sample per channel) in ``n_bytes``."""
        return n_bytes // (self.bytes_per_sample * channels)


# g711 is imported when first used: serstream.rtp imports this module, so a
# top-level import of serstream.rtp.g711 here would be circular.
def _ulaw(data: Bytes) -> npt.NDArray[np.float32]:
    from serstream.rtp.g711 import decode_ulaw

    return decode_ulaw(data)


def _alaw(data: Bytes) -> npt.NDArray[np.float32]:
    from serstream.rtp.g711 import decode_alaw

    return decode_alaw(data)


def _s16be(data: Bytes) -> npt.NDArray[np.float32]:
    return np.frombuffer(data, dtype=">i2").astype(np.float32) * _PCM16_SCALE


def _s16le(data: Bytes) -> npt.NDArray[np.float32]:
    return np.frombuffer(data, dtype="<i2").astype(np.float32) * _PCM16_SCALE


def _f32le(data: Bytes) -> npt.NDArray[np.float32]:
    samples = np.frombuffer(data, dtype="<f4")
    return samples if samples.dtype == np.float32 else samples.astype(np.float32)


#: Every codec, by name.
CODECS: Final[Mapping[str, Codec]] = {
    codec.name: codec
    for codec in (
        Codec("pcmu", 1, _ulaw, stream_codec="pcmu", rtp_name="PCMU"),
        Codec("pcma", 1, _alaw, stream_codec="pcma", rtp_name="PCMA"),
        Codec("l16", 2, _s16be, stream_codec="l16", rtp_name="L16"),
        Codec("s16le", 2, _s16le, stream_codec="pcm_s16le", ingest_name="s16le"),
        Codec("f32le", 4, _f32le, stream_codec="pcm_f32le", ingest_name="f32le"),
    )
}

_BY_RTP: Final[Mapping[str, Codec]] = {c.rtp_name: c for c in CODECS.values() if c.rtp_name}
_BY_INGEST: Final[Mapping[str, Codec]] = {c.ingest_name: c for c in CODECS.values() if c.ingest_name}


def rtp_encodings() -> tuple[str, ...]:
    """The RTP encoding names serstream decodes, e.g. ``("PCMU", "PCMA", "L16")``."""
    return tuple(_BY_RTP)


def rtp_codec(encoding: str) -> Codec:
    """The codec of an RTP encoding name (case-insensitive); CodecError if unknown."""
    codec = _BY_RTP.get(encoding.upper())
    if codec is None:
        raise CodecError(f"RTP encoding {encoding} is not supported (supported: {', '.join(_BY_RTP)})")
    return codec


def ingest_formats() -> tuple[str, ...]:
    """The ``/ingest`` hello formats, e.g. ``("s16le", "f32le")``."""
    return tuple(_BY_INGEST)


def ingest_codec(fmt: str) -> Codec:
    """The codec of an ``/ingest`` format (exact name); CodecError if unknown."""
    codec = _BY_INGEST.get(fmt)
    if codec is None:
        raise CodecError(f"format {fmt!r} is not supported (use {' or '.join(_BY_INGEST)})")
    return codec
