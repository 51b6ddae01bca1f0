"""The plugin's pure helpers: no LiveKit import, no I/O, no clock.

The turn matcher itself (:class:`serstream_client.turns.TurnTracker`) is
shared with the Pipecat plugin and lives in the client distribution; what is
here is what only the LiveKit side needs: which ``user_state_changed``
transitions open and close a turn, how a LiveKit user turn that spans several
speech spans gets one reading, the size of a PCM frame in seconds, and the
monitor's ingest URL.
"""

from __future__ import annotations

from typing import Literal, Sequence
from urllib.parse import urlsplit, urlunsplit

from serstream_client.turns import EmotionReading

__all__ = ["TurnEdge", "user_state_edge", "combine_readings", "pcm_seconds", "ingest_url"]

TurnEdge = Literal["start", "stop"]
BYTES_PER_SAMPLE = 2  # LiveKit audio frames are 16-bit PCM


def user_state_edge(old_state: str, new_state: str) -> TurnEdge | None:
    """What an ``AgentSession`` ``user_state_changed`` event means for the turn.

    LiveKit moves the user between ``listening``, ``speaking`` and ``away``;
    entering ``speaking`` opens a speech span, leaving it closes one. Other
    moves (``listening`` <-> ``away``) say nothing about speech.
    """
    if new_state == "speaking" and old_state != "speaking":
        return "start"
    if old_state == "speaking" and new_state != "speaking":
        return "stop"
    return None


def combine_readings(readings: Sequence[EmotionReading]) -> EmotionReading | None:
    """One reading for several speech spans of one LiveKit user turn (a pause splits a turn).

    Weighted by the audio each covers, as the tracker weighs estimates; the
    result keeps the first span's ``turn`` index and counts every estimate.
    Only when every part is made from finals is the result ``final``.
    """
    if not readings:
        return None
    if len(readings) == 1:
        return readings[0]
    weights = [max(1e-3, r.t1 - r.t0) for r in readings]
    total = sum(weights)
    labels: list[str] = []
    for r in readings:
        labels.extend(k for k in r.probs if k not in labels)
    probs = {label: sum(w * r.probs.get(label, 0.0) for w, r in zip(weights, readings)) / total
             for label in labels}
    label = max(probs, key=lambda k: probs[k])
    first = readings[0]
    return EmotionReading(
        stream=first.stream,
        turn=first.turn,
        label=label,
        confidence=probs[label],
        probs=probs,
        arousal=sum(w * r.arousal for w, r in zip(weights, readings)) / total,
        valence=sum(w * r.valence for w, r in zip(weights, readings)) / total,
        dominance=sum(w * r.dominance for w, r in zip(weights, readings)) / total,
        t0=min(r.t0 for r in readings),
        t1=max(r.t1 for r in readings),
        estimates=sum(r.estimates for r in readings),
        final=all(r.final for r in readings),
    )


def pcm_seconds(n_bytes: int, sample_rate: int, channels: int) -> float:
    """Seconds of 16-bit PCM in ``n_bytes`` (0 for a nonsense format, never a division by zero)."""
    if sample_rate <= 0 or channels <= 0 or n_bytes <= 0:
        return 0.0
    return n_bytes / (BYTES_PER_SAMPLE * channels * sample_rate)


def ingest_url(url: str) -> str:
    """``ws://HOST:PORT`` -> ``ws://HOST:PORT/ingest``; a URL with a path is kept as given."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("ws", "wss") or not parts.netloc:
        raise ValueError(f"serstream monitor URL must look like ws://HOST:PORT, got {url!r}")
    path = parts.path if parts.path not in ("", "/") else "/ingest"
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))
