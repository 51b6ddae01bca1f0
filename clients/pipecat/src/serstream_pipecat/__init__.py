"""serstream speech emotion for Pipecat: a FrameProcessor that reads the user's emotion per turn.

The processor streams the user's audio to a running serstream monitor
(``serstream serve``) over its ``/ingest`` WebSocket and turns the estimates
it sends back into one :class:`EmotionFrame` per user turn, an
``on_emotion`` event, and optionally a note on the turn's
``TranscriptionFrame``. See clients/pipecat/README.md.
"""

from serstream_pipecat.processor import (
    SUPPORTED_SCHEMA_VERSION,
    TRANSCRIPTION_METADATA_KEY,
    EmotionFrame,
    SerstreamEmotionProcessor,
    SerstreamSettings,
)
from serstream_pipecat.turns import EmotionReading, TurnConfig, TurnTracker

__all__ = [
    "EmotionFrame",
    "EmotionReading",
    "SerstreamEmotionProcessor",
    "SerstreamSettings",
    "TurnConfig",
    "TurnTracker",
    "TRANSCRIPTION_METADATA_KEY",
    "SUPPORTED_SCHEMA_VERSION",
]
