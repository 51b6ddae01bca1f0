"""serstream speech emotion for LiveKit Agents: the user's emotion per turn, from a serstream monitor.

:class:`SerstreamEmotion` streams the user's audio (the frames an
``Agent.stt_node`` gets, passed on unchanged) to a running serstream
monitor's ``/ingest`` WebSocket and gives one :class:`EmotionReading` per
user turn: to ``on_emotion`` callbacks, as ``latest``, and into the user
message's ``extra["serstream_emotion"]`` for the LLM (``annotate``). See
clients/livekit/README.md and docs/livekit.md.
"""

from serstream_client.turns import EmotionReading, TurnConfig, TurnTracker

from serstream_livekit.emotion import METADATA_KEY, SUPPORTED_SCHEMA_VERSION, SerstreamEmotion, SerstreamSettings
from serstream_livekit.pure import combine_readings, user_state_edge

__all__ = [
    "SerstreamEmotion",
    "SerstreamSettings",
    "EmotionReading",
    "TurnConfig",
    "TurnTracker",
    "METADATA_KEY",
    "SUPPORTED_SCHEMA_VERSION",
    "combine_readings",
    "user_state_edge",
]
