"""Per-stream smoothing of emotion estimates over time, with a sticky mood label.

Each estimate moves the smoothed state towards itself by
``alpha = 1 - 2 ** (-dt / half_life_s)``, where ``dt`` is the stream time
since the previous estimate: a state left alone for one half-life is half
replaced by the next estimate, whatever the rate of estimates. A final
estimate counts ``final_weight`` times a partial one (its odds against the
old state are multiplied by the weight). The reported label changes only
when another label's smoothed probability beats the current one's by
``switch_margin``, so the mood does not flicker between close labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from serstream_client.model import Mood

__all__ = ["SmootherConfig", "MoodState", "MoodSmoother"]


@dataclass(frozen=True)
class SmootherConfig:
    """Smoothing settings; ``validate`` runs on construction."""

    half_life_s: float = 3.0
    switch_margin: float = 0.10
    final_weight: float = 2.0

    def __post_init__(self) -> None:
        if not self.half_life_s > 0:
            raise ValueError(f"smoother half_life_s must be > 0, got {self.half_life_s}")
        if not 0 <= self.switch_margin < 1:
            raise ValueError(f"smoother switch_margin must be within [0, 1), got {self.switch_margin}")
        if not self.final_weight > 0:
            raise ValueError(f"smoother final_weight must be > 0, got {self.final_weight}")


#: The smoothed state of one stream after an update: the event model's :class:`Mood`
#: (``serstream_client.model``), the ``smoothed`` field of emotion events, so the
#: monitor, the client and the Pipecat plugin share one type.
MoodState = Mood


class MoodSmoother:
    """Exponential smoothing in stream time with label hysteresis, one per stream."""

    def __init__(self, labels: Sequence[str], config: SmootherConfig = SmootherConfig()) -> None:
        self.labels = tuple(labels)
        if not self.labels or len(set(self.labels)) != len(self.labels):
            raise ValueError("smoother labels must be a non-empty sequence of distinct names")
        self.config = config
        self._probs: np.ndarray | None = None
        self._avd = np.zeros(3, dtype=np.float64)
        self._label = 0
        self._t = 0.0
        self.updates = 0

    @property
    def state(self) -> MoodState | None:
        """The current state, or None before the first update."""
        return None if self._probs is None else self._snapshot()

    def alpha(self, dt: float, final: bool) -> float:
        """Weight of a new estimate arriving ``dt`` seconds after the previous one."""
        base = 1.0 - 2.0 ** (-max(0.0, dt) / self.config.half_life_s)
        weight = self.config.final_weight if final else 1.0
        # Scale the odds new:old by the weight; for weight 1 this is `base` itself.
        return weight * base / (weight * base + (1.0 - base)) if base > 0 else 0.0

    def update(self, probs: np.ndarray, avd: np.ndarray, t: float, final: bool) -> MoodState:
        """Blend one estimate (``probs`` per label, ``avd`` = arousal, valence, dominance) made at ``t``."""
        p = np.asarray(probs, dtype=np.float64).reshape(-1)
        v = np.asarray(avd, dtype=np.float64).reshape(-1)
        if p.size != len(self.labels):
            raise ValueError(f"expected {len(self.labels)} probabilities, got {p.size}")
        if v.size != 3:
            raise ValueError(f"expected 3 values (arousal, valence, dominance), got {v.size}")
        if not (np.all(np.isfinite(p)) and np.all(np.isfinite(v)) and np.isfinite(t)):
            raise ValueError("estimate contains NaN or infinite values")
        if self._probs is None:
            self._probs = p.copy()
            self._avd = v.copy()
            self._label = int(np.argmax(p))
            self._t = float(t)
        else:
            a = self.alpha(t - self._t, final)
            self._probs += a * (p - self._probs)
            self._avd += a * (v - self._avd)
            # Out-of-order estimates still blend in, but never move the clock backwards.
            self._t = max(self._t, float(t))
            best = int(np.argmax(self._probs))
            if self._probs[best] - self._probs[self._label] > self.config.switch_margin:
                self._label = best
        self.updates += 1
        return self._snapshot()

    def _snapshot(self) -> MoodState:
        assert self._probs is not None
        return MoodState(
            label=self.labels[self._label],
            confidence=float(self._probs[self._label]),
            probs={name: float(x) for name, x in zip(self.labels, self._probs)},
            arousal=float(self._avd[0]),
            valence=float(self._avd[1]),
            dominance=float(self._avd[2]),
        )
