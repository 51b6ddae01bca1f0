"""RTP payload formats: the payload type map and payload -> float32 mono samples.

Static payload types follow RFC 3551 table 4 (PCMU 0, PCMA 8, L16 10 and 11);
dynamic ones come from SDP-style ``rtpmap`` strings such as
``"96=L16/16000/1"`` (``"96 L16/16000"`` and ``"a=rtpmap:96 L16/16000/1"``
are accepted too). Supported encodings: PCMU, PCMA (G.711) and L16 (big-endian
signed 16-bit, RFC 3551 §4.5.11), all decoded by the one codec registry in
``serstream/codecs.py``. Multi-channel payloads are interleaved and are
averaged to mono.

Durations are in RTP timestamp units: for audio that is sample frames (one
sample per channel) at the format's clock rate.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np
import numpy.typing as npt

from serstream.codecs import rtp_codec, rtp_encodings
from serstream.rtp.packet import RtpError

__all__ = [
    "PayloadFormat",
    "SUPPORTED_ENCODINGS",
    "STATIC_PAYLOAD_TYPES",
    "parse_rtp_map",
    "build_payload_map",
    "payload_frames",
    "check_payload",
    "decode_payload",
]

#: Encoding name -> bytes per sample (a view of the codec registry).
SUPPORTED_ENCODINGS: Mapping[str, int] = {name: rtp_codec(name).bytes_per_sample for name in rtp_encodings()}

# RFC 5761 §4: these payload types collide with RTCP packet types when RTP and
# RTCP share a port (the parser classifies such packets as RTCP).
_RTCP_CONFLICT = range(64, 96)
_MAX_CHANNELS = 8
_MAX_RATE = 384_000


@dataclass(frozen=True)
class PayloadFormat:
    """An audio payload format: encoding name, clock rate (Hz) and channel count."""

    encoding: str
    rate: int
    channels: int = 1

    def __str__(self) -> str:
        return f"{self.encoding}/{self.rate}/{self.channels}"


#: RFC 3551 static audio payload types that serstream decodes.
STATIC_PAYLOAD_TYPES: Mapping[int, PayloadFormat] = {
    0: PayloadFormat("PCMU", 8000, 1),
    8: PayloadFormat("PCMA", 8000, 1),
    10: PayloadFormat("L16", 44100, 2),
    11: PayloadFormat("L16", 44100, 1),
}

_RTP_MAP = re.compile(
    r"^\s*(?:a=rtpmap:)?\s*(?P<pt>\d+)\s*[=\s]\s*(?P<enc>[A-Za-z0-9_.-]+)"
    r"/(?P<rate>\d+)(?:/(?P<channels>\d+))?\s*$"
)


def parse_rtp_map(text: str) -> tuple[int, PayloadFormat]:
    """Parse ``"PT=ENCODING/RATE[/CHANNELS]"``; raise ``ValueError`` with a one-line reason."""
    match = _RTP_MAP.match(text)
    if match is None:
        raise ValueError(
            f"bad RTP payload map {text!r}: expected PT=ENCODING/RATE[/CHANNELS], e.g. 96=L16/16000/1"
        )
    payload_type = int(match["pt"])
    encoding = match["enc"].upper()
    rate = int(match["rate"])
    channels = int(match["channels"]) if match["channels"] else 1
    if payload_type > 127:
        raise ValueError(f"bad RTP payload map {text!r}: payload type {payload_type} is outside 0-127")
    if payload_type in _RTCP_CONFLICT:
        raise ValueError(
            f"bad RTP payload map {text!r}: payload types 64-95 clash with RTCP on a shared port "
            "(RFC 5761); use 96-127"
        )
    if encoding not in SUPPORTED_ENCODINGS:
        raise ValueError(
            f"bad RTP payload map {text!r}: encoding {encoding} is not supported "
            f"(supported: {', '.join(SUPPORTED_ENCODINGS)})"
        )
    if not 1 <= rate <= _MAX_RATE:
        raise ValueError(f"bad RTP payload map {text!r}: rate {rate} is outside 1-{_MAX_RATE} Hz")
    if not 1 <= channels <= _MAX_CHANNELS:
        raise ValueError(
            f"bad RTP payload map {text!r}: {channels} channels, expected 1-{_MAX_CHANNELS}"
        )
    return payload_type, PayloadFormat(encoding, rate, channels)


def build_payload_map(rtp_maps: Iterable[str] = ()) -> dict[int, PayloadFormat]:
    """The static payload types plus the given ``rtpmap`` strings (which override them)."""
    payload_map = dict(STATIC_PAYLOAD_TYPES)
    for text in rtp_maps:
        payload_type, fmt = parse_rtp_map(text)
        payload_map[payload_type] = fmt
    return payload_map


def payload_frames(fmt: PayloadFormat, n_bytes: int) -> int:
    """Sample frames (RTP timestamp units) in a payload of ``n_bytes``."""
    return rtp_codec(fmt.encoding).frames(n_bytes, fmt.channels)


def check_payload(fmt: PayloadFormat, payload: bytes | bytearray | memoryview) -> None:
    """Raise ``RtpError("bad_payload")`` unless ``payload`` holds whole sample frames."""
    frame_bytes = rtp_codec(fmt.encoding).bytes_per_sample * fmt.channels
    if len(payload) % frame_bytes:
        raise RtpError(
            "bad_payload",
            f"{len(payload)} payload bytes is not a whole number of {fmt} frames "
            f"({frame_bytes} bytes each)",
        )


def decode_payload(
    fmt: PayloadFormat, payload: bytes | bytearray | memoryview
) -> npt.NDArray[np.float32]:
    """Payload -> float32 mono samples in [-1, 1] at ``fmt.rate``."""
    check_payload(fmt, payload)
    samples = rtp_codec(fmt.encoding).decode(payload)
    if fmt.channels > 1:
        samples = samples.reshape(-1, fmt.channels).mean(axis=1, dtype=np.float32)
    return samples
