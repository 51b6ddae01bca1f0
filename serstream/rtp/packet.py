"""RTP packet parsing and building (RFC 3550 §5.1 and §5.3.1), no sockets.

``parse_rtp`` turns one UDP datagram into an :class:`RtpPacket` or raises
:class:`RtpError` with a stable ``cause`` id, so callers can count rejects per
cause and report each cause once instead of once per packet. ``build_rtp`` is
the inverse, used by the tests and by the tests' own sender.

Reject causes raised here:

``truncated``           fewer than the 12 bytes of the fixed header
``bad_version``         version field is not 2
``rtcp``                an RTCP packet on a muxed port (RFC 5761 §4): second
                        byte 192-223, i.e. marker set and payload type 64-95;
                        this covers SR/RR/SDES/BYE/APP (200-204) and the
                        feedback and XR types (205-207) senders also mux
``csrc_overflow``       the CSRC list (4 bytes per CSRC count) runs past the end
``extension_overflow``  the header extension (its 4-byte header or its data)
                        runs past the end
``bad_padding``         padding flag set and the padding count is 0, larger
                        than what follows the header, or missing altogether
``empty_payload``       nothing left once header, extension and padding are gone
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from serstream.errors import RtpError

__all__ = [
    "RTP_VERSION",
    "RTP_HEADER_SIZE",
    "RtpError",
    "RtpPacket",
    "parse_rtp",
    "build_rtp",
    "is_rtcp",
]

RTP_VERSION = 2
RTP_HEADER_SIZE = 12

# RFC 5761 §4: with RTP and RTCP on one port, RTP avoids payload types 64-95 so
# that the second byte of an RTCP packet (its packet type, 192-223) can never be
# a marker bit plus an RTP payload type.
_RTCP_SECOND_BYTE_MIN = 192
_RTCP_SECOND_BYTE_MAX = 223

_FIXED_HEADER = struct.Struct("!BBHII")
_EXTENSION_HEADER = struct.Struct("!HH")


@dataclass(frozen=True)
class RtpPacket:
    """One parsed RTP packet. ``payload`` excludes header, extension and padding.

    The payload is ``bytes`` (a copy), not a view: socket adapters reuse their
    receive buffer, and a jitter buffer may hold the packet for a while.
    """

    version: int
    padding: bool
    extension: bool
    marker: bool
    payload_type: int
    sequence: int
    timestamp: int
    ssrc: int
    csrcs: tuple[int, ...]
    extension_profile: int | None
    extension_data: bytes
    payload: bytes


def is_rtcp(data: bytes | bytearray | memoryview) -> bool:
    """True when ``data`` looks like RTCP on a muxed RTP port (RFC 5761 §4)."""
    return (
        len(data) >= 2
        and data[0] >> 6 == RTP_VERSION
        and _RTCP_SECOND_BYTE_MIN <= data[1] <= _RTCP_SECOND_BYTE_MAX
    )


def parse_rtp(data: bytes | bytearray | memoryview) -> RtpPacket:
    """Parse one datagram as RTP; raise :class:`RtpError` when it is not usable."""
    size = len(data)
    if size < RTP_HEADER_SIZE:
        raise RtpError("truncated", f"{size} bytes, the RTP header alone is {RTP_HEADER_SIZE}")
    first, second, sequence, timestamp, ssrc = _FIXED_HEADER.unpack_from(data, 0)
    version = first >> 6
    if version != RTP_VERSION:
        raise RtpError("bad_version", f"RTP version {version}, expected {RTP_VERSION}")
    if _RTCP_SECOND_BYTE_MIN <= second <= _RTCP_SECOND_BYTE_MAX:
        raise RtpError("rtcp", f"RTCP packet type {second} on the RTP port, ignored")
    has_padding = bool(first & 0x20)
    has_extension = bool(first & 0x10)
    csrc_count = first & 0x0F

    offset = RTP_HEADER_SIZE
    csrc_end = offset + 4 * csrc_count
    if csrc_end > size:
        raise RtpError(
            "csrc_overflow",
            f"{csrc_count} CSRCs need {csrc_end} bytes, packet has {size}",
        )
    csrcs = struct.unpack_from(f"!{csrc_count}I", data, offset) if csrc_count else ()
    offset = csrc_end

    extension_profile: int | None = None
    extension_data = b""
    if has_extension:
        if offset + _EXTENSION_HEADER.size > size:
            raise RtpError(
                "extension_overflow",
                f"extension header needs {offset + _EXTENSION_HEADER.size} bytes, packet has {size}",
            )
        extension_profile, words = _EXTENSION_HEADER.unpack_from(data, offset)
        offset += _EXTENSION_HEADER.size
        extension_end = offset + 4 * words
        if extension_end > size:
            raise RtpError(
                "extension_overflow",
                f"extension of {words} words needs {extension_end} bytes, packet has {size}",
            )
        extension_data = bytes(data[offset:extension_end])
        offset = extension_end

    payload_end = size
    if has_padding:
        # The last byte counts the padding bytes, itself included (RFC 3550 §5.1).
        if offset >= size:
            raise RtpError("bad_padding", "padding flag set but no byte holds the padding count")
        pad = data[size - 1]
        if pad == 0 or pad > size - offset:
            raise RtpError(
                "bad_padding",
                f"padding count {pad} with {size - offset} bytes after the header",
            )
        payload_end = size - pad
    if payload_end <= offset:
        raise RtpError("empty_payload", "no payload after header, extension and padding")

    return RtpPacket(
        version=version,
        padding=has_padding,
        extension=has_extension,
        marker=bool(second & 0x80),
        payload_type=second & 0x7F,
        sequence=sequence,
        timestamp=timestamp,
        ssrc=ssrc,
        csrcs=tuple(csrcs),
        extension_profile=extension_profile,
        extension_data=extension_data,
        payload=bytes(data[offset:payload_end]),
    )


def build_rtp(
    payload: bytes,
    *,
    payload_type: int,
    sequence: int,
    timestamp: int,
    ssrc: int,
    marker: bool = False,
    csrcs: tuple[int, ...] = (),
    extension: tuple[int, bytes] | None = None,
    padding: int = 0,
) -> bytes:
    """Serialise an RTP packet; ``extension`` is ``(profile, data)``, ``data`` a multiple of 4 bytes.

    ``padding`` is the number of padding bytes to append (0 for none; the last
    one carries the count). Raises ``ValueError`` for fields out of range.
    """
    if not 0 <= payload_type <= 0x7F:
        raise ValueError(f"payload type {payload_type} is outside 0-127")
    if not 0 <= sequence <= 0xFFFF:
        raise ValueError(f"sequence {sequence} is outside 0-65535")
    if not 0 <= timestamp <= 0xFFFFFFFF:
        raise ValueError(f"timestamp {timestamp} is outside 32 bits")
    if not 0 <= ssrc <= 0xFFFFFFFF:
        raise ValueError(f"ssrc {ssrc} is outside 32 bits")
    if len(csrcs) > 15:
        raise ValueError(f"{len(csrcs)} CSRCs, at most 15 fit")
    if not 0 <= padding <= 0xFF:
        raise ValueError(f"padding {padding} is outside 0-255")
    first = RTP_VERSION << 6 | len(csrcs)
    if padding:
        first |= 0x20
    if extension is not None:
        first |= 0x10
    second = (0x80 if marker else 0) | payload_type
    parts = [_FIXED_HEADER.pack(first, second, sequence, timestamp, ssrc)]
    if csrcs:
        parts.append(struct.pack(f"!{len(csrcs)}I", *csrcs))
    if extension is not None:
        profile, data = extension
        if len(data) % 4:
            raise ValueError(f"extension data of {len(data)} bytes is not a multiple of 4")
        parts.append(_EXTENSION_HEADER.pack(profile, len(data) // 4))
        parts.append(bytes(data))
    parts.append(bytes(payload))
    if padding:
        parts.append(bytes(padding - 1) + bytes([padding]))
    return b"".join(parts)
