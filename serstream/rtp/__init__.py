"""Network audio ingest, pure part: RTP parsing, G.711, payload formats, jitter buffer, demux.

No sockets here (docs/architecture.md, "Pure interfaces"): the UDP and WebSocket
adapters in ``serstream.sources`` feed bytes and arrival times in and turn the
returned events into monitor streams.
"""

from serstream.rtp.g711 import decode_alaw, decode_ulaw, encode_alaw, encode_ulaw
from serstream.rtp.jitter import Frame, JitterBuffer, JitterConfig, JitterStats
from serstream.rtp.packet import RtpError, RtpPacket, build_rtp, is_rtcp, parse_rtp
from serstream.rtp.payload import (
    STATIC_PAYLOAD_TYPES,
    PayloadFormat,
    build_payload_map,
    check_payload,
    decode_payload,
    parse_rtp_map,
    payload_frames,
)
from serstream.rtp.session import (
    DemuxConfig,
    DemuxEvent,
    RejectNotice,
    RtpDemux,
    StreamAudio,
    StreamClosed,
    StreamOpened,
    stream_id_for,
)

__all__ = [
    "decode_alaw",
    "decode_ulaw",
    "encode_alaw",
    "encode_ulaw",
    "Frame",
    "JitterBuffer",
    "JitterConfig",
    "JitterStats",
    "RtpError",
    "RtpPacket",
    "build_rtp",
    "is_rtcp",
    "parse_rtp",
    "STATIC_PAYLOAD_TYPES",
    "PayloadFormat",
    "build_payload_map",
    "check_payload",
    "decode_payload",
    "parse_rtp_map",
    "payload_frames",
    "DemuxConfig",
    "DemuxEvent",
    "RejectNotice",
    "RtpDemux",
    "StreamAudio",
    "StreamClosed",
    "StreamOpened",
    "stream_id_for",
]
