"""Which serstream estimates belong to which user turn, and when a turn's reading is settled.

Pure logic, no I/O and no clock, shared by the voice-agent plugins
(clients/pipecat, clients/livekit): the plugin feeds it the audio it sent
(as seconds), the user-turn boundaries its framework signalled, the
monitor's events, and the time ``now`` (seconds, any monotonic clock).

Both sides share one clock: the monitor's *stream clock* of the ingest
connection, which starts at 0 when the connection opens and advances by the
audio the plugin sends (stream seconds = samples sent / sample rate). A user
turn is recorded on that clock from the audio that had passed the plugin
when its start and stop were signalled; the monitor's ``emotion`` events carry
``t0``/``t1`` on the same clock, its ``speech`` events ``t``. A new
connection starts a new clock (an *epoch*); a turn never mixes epochs.

A turn's reading is *settled* once the turn has ended and every monitor
speech segment overlapping it has closed and delivered its final estimate;
if that does not happen within ``settle_timeout_s`` of the turn's end
(monitor lost, an estimate dropped, no speech detected), the turn gives
whatever it has (its finals, else its latest partial), or no reading at all.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from serstream_client.model import Mood

__all__ = ["TurnConfig", "EmotionReading", "TurnTracker"]

#: How close a final's ``t1`` and a speech end's ``t`` must be to be the same instant (4-decimal rounding).
_SAME_TIME_S = 0.01


@dataclass(frozen=True)
class TurnConfig:
    """How estimates are matched to turns."""

    #: The turn's start frame comes after the speech it starts (the VAD confirms
    #: speech late), so estimates reaching this far before it still count.
    pre_slack_s: float = 0.6
    #: How long after a turn ends to wait for the monitor's final estimates.
    settle_timeout_s: float = 2.5
    #: Monitor speech segments remembered (older ones are forgotten).
    max_segments: int = 64


@dataclass(frozen=True, kw_only=True)
class EmotionReading(Mood):
    """The emotion of one user turn, from the serstream estimates that cover it.

    A :class:`serstream_client.model.Mood` (label, confidence, probs,
    arousal, valence, dominance: the same fields as an emotion event's
    ``smoothed`` state), plus where and what it covers.
    """

    stream: str
    turn: int
    #: Stream time (seconds) of the audio the estimates cover.
    t0: float
    t1: float
    #: How many estimates were combined.
    estimates: int
    #: True when made from final estimates; False when only a partial was there.
    final: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Segment:
    start: float
    end: float | None = None
    final_seen: bool = False


@dataclass
class _Turn:
    index: int
    epoch: int
    start: float
    end: float | None = None
    ended_at: float | None = None
    finals: list[Mapping[str, Any]] = field(default_factory=list)
    partial: Mapping[str, Any] | None = None
    done: bool = False


class TurnTracker:
    """Collects monitor estimates per user turn and says when each turn's reading is ready."""

    def __init__(self, stream: str, config: TurnConfig = TurnConfig()) -> None:
        self.stream = stream
        self.config = config
        self.epoch = 0
        #: Stream seconds sent on the current connection.
        self.clock = 0.0
        self.turns_started = 0
        self.turns_without_reading = 0
        self.estimates_unmatched = 0
        self._turns: list[_Turn] = []
        self._segments: list[_Segment] = []

    # ------------------------------------------------------------ inputs

    def new_connection(self) -> None:
        """A new ingest connection: its stream clock starts at 0."""
        self.epoch += 1
        self.clock = 0.0
        self._segments.clear()
        for turn in self._turns:
            if turn.end is None and not turn.done:
                # The monitor hears this turn only from now on.
                turn.epoch = self.epoch
                turn.start = 0.0

    def audio(self, seconds: float) -> None:
        """``seconds`` of audio were sent to the monitor on the current connection."""
        if seconds > 0:
            self.clock += seconds

    def user_started(self, now: float) -> bool:
        """The user's turn started; False (ignored) when one is already open."""
        if self._open_turn() is not None:
            return False
        self._turns.append(_Turn(index=self.turns_started, epoch=self.epoch, start=self.clock))
        self.turns_started += 1
        return True

    def user_stopped(self, now: float) -> bool:
        """The user's turn ended; False (ignored) when none is open."""
        turn = self._open_turn()
        if turn is None:
            return False
        turn.end = max(self.clock, turn.start)
        turn.ended_at = now
        return True

    def monitor_event(self, event: Mapping[str, Any]) -> None:
        """One event the monitor sent for this stream (``speech`` and ``emotion`` matter)."""
        kind = event.get("type")
        if kind == "speech":
            self._speech(event)
        elif kind == "emotion":
            self._emotion(event)

    # ------------------------------------------------------------ outputs

    def due(self, now: float) -> list[EmotionReading]:
        """Readings of turns that are settled or timed out; each turn is given once."""
        readings: list[EmotionReading] = []
        for turn in self._turns:
            if turn.done or turn.end is None or turn.ended_at is None:
                continue
            timed_out = now - turn.ended_at >= self.config.settle_timeout_s
            if not (timed_out or self._settled(turn)):
                continue
            turn.done = True
            reading = self._reading(turn)
            if reading is None:
                self.turns_without_reading += 1
            else:
                readings.append(reading)
        # Finished turns are kept one step, so a late estimate is not misattributed to the next turn.
        while len(self._turns) > 2 and self._turns[0].done:
            self._turns.pop(0)
        return readings

    def pending(self) -> bool:
        """A turn has ended and its reading is not given yet."""
        return any(t.end is not None and not t.done for t in self._turns)

    def current(self) -> EmotionReading | None:
        """The reading of the latest turn so far (open or not), or None without any estimate."""
        return self._reading(self._turns[-1]) if self._turns else None

    # ------------------------------------------------------------ internals

    def _open_turn(self) -> _Turn | None:
        if self._turns and self._turns[-1].end is None:
            return self._turns[-1]
        return None

    def _speech(self, event: Mapping[str, Any]) -> None:
        t = _number(event.get("t"))
        if t is None:
            return
        if event.get("state") == "start":
            self._segments.append(_Segment(start=t))
            if len(self._segments) > self.config.max_segments:
                self._segments.pop(0)
        elif event.get("state") == "end":
            for seg in reversed(self._segments):
                if seg.end is None:
                    seg.end = t
                    return
            duration = _number(event.get("duration")) or 0.0
            self._segments.append(_Segment(start=max(0.0, t - duration), end=t))

    def _emotion(self, event: Mapping[str, Any]) -> None:
        t0, t1 = _number(event.get("t0")), _number(event.get("t1"))
        if t0 is None or t1 is None or not isinstance(event.get("probs"), Mapping):
            return
        final = event.get("kind") == "final"
        if final:
            for seg in self._segments:
                if seg.end is not None and abs(seg.end - t1) <= _SAME_TIME_S:
                    seg.final_seen = True
        turn = self._best_turn(t0, t1)
        if turn is None:
            self.estimates_unmatched += 1
            return
        if final:
            turn.finals.append(event)
        else:
            turn.partial = event

    def _window(self, turn: _Turn) -> tuple[float, float]:
        end = turn.end if turn.end is not None else float("inf")
        return turn.start - self.config.pre_slack_s, end

    def _best_turn(self, t0: float, t1: float) -> _Turn | None:
        best, best_overlap = None, 0.0
        for turn in self._turns:
            if turn.epoch != self.epoch or turn.done:
                continue
            lo, hi = self._window(turn)
            overlap = min(t1, hi) - max(t0, lo)
            if overlap > best_overlap:
                best, best_overlap = turn, overlap
        return best

    def _settled(self, turn: _Turn) -> bool:
        if turn.epoch != self.epoch or not turn.finals:
            return False
        lo, hi = self._window(turn)
        overlapping = [s for s in self._segments if s.start < hi and (s.end is None or s.end > lo)]
        return bool(overlapping) and all(s.end is not None and s.final_seen for s in overlapping)

    def _reading(self, turn: _Turn) -> EmotionReading | None:
        estimates = list(turn.finals) or ([turn.partial] if turn.partial is not None else [])
        if not estimates:
            return None
        # Weighted by the audio each estimate covers: a long utterance counts more than a short one.
        weights = [max(1e-3, float(e["t1"]) - float(e["t0"])) for e in estimates]
        total = sum(weights)
        labels: list[str] = []
        for e in estimates:
            labels.extend(k for k in e["probs"] if k not in labels)
        probs = {
            label: sum(w * float(e["probs"].get(label, 0.0)) for w, e in zip(weights, estimates)) / total
            for label in labels
        }

        def mean(key: str) -> float:
            return sum(w * float(e.get(key, 0.0) or 0.0) for w, e in zip(weights, estimates)) / total

        label = max(probs, key=lambda k: probs[k])
        return EmotionReading(
            stream=self.stream,
            turn=turn.index,
            label=label,
            confidence=probs[label],
            probs=probs,
            arousal=mean("arousal"),
            valence=mean("valence"),
            dominance=mean("dominance"),
            t0=min(float(e["t0"]) for e in estimates),
            t1=max(float(e["t1"]) for e in estimates),
            estimates=len(estimates),
            final=bool(turn.finals),
        )


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)
