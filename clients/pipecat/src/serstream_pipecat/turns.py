"""The turn matcher now lives in the client distribution (``serstream_client.turns``).

It is pure (no Pipecat, no I/O) and shared with the LiveKit plugin
(clients/livekit); this module keeps the old import path working.
"""

from serstream_client.turns import EmotionReading, TurnConfig, TurnTracker

__all__ = ["TurnConfig", "EmotionReading", "TurnTracker"]
