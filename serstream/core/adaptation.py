"""Per-stream state for a model's state inputs (label-free speaker adaptation).

The shipped model's ``speaker_stats`` input is a running sum of the
speaker's log-mel frames, their squares and the frame count. Sums add, so the
state is just the total of the per-window sums the model returns. Past
``max_count`` frames the whole vector is scaled down by ``max_count / count``:
sum / count and sum of squares / count (the mean and second moment the model
normalises with) stay the same, while older speech weighs less from then on,
so the state follows a voice or channel that drifts.
"""

from __future__ import annotations

import numpy as np

from serstream.contract import StateInput

__all__ = ["SpeakerState"]


class SpeakerState:
    """Running state for one :class:`~serstream.contract.StateInput` of one stream."""

    def __init__(self, spec: StateInput) -> None:
        if spec.width <= 0:
            raise ValueError(f"state input {spec.name!r} has non-positive width {spec.width}")
        if spec.count_index is not None and not 0 <= spec.count_index < spec.width:
            raise ValueError(
                f"state input {spec.name!r}: count_index {spec.count_index} outside width {spec.width}"
            )
        if spec.max_count is not None and not spec.max_count > 0:
            raise ValueError(f"state input {spec.name!r}: max_count must be > 0, got {spec.max_count}")
        self.spec = spec
        # Sums are kept in float64 so that many small additions do not lose precision.
        self._sums = np.zeros(spec.width, dtype=np.float64)
        self.updates = 0
        self.rescales = 0

    @property
    def empty(self) -> bool:
        """True until the first update."""
        return self.updates == 0

    @property
    def count(self) -> float | None:
        """The accumulated count column, or None when the spec has none."""
        if self.spec.count_index is None:
            return None
        return float(self._sums[self.spec.count_index])

    def value(self) -> np.ndarray:
        """The model input row: float32 ``[width]``, ``spec.empty``-filled before any update."""
        if self.empty:
            return np.full(self.spec.width, self.spec.empty, dtype=np.float32)
        return self._sums.astype(np.float32)

    def update(self, window_sums: np.ndarray) -> None:
        """Add one window's sums (shape ``[width]`` or ``[1, width]``); ValueError on bad input."""
        sums = np.asarray(window_sums, dtype=np.float64)
        if sums.ndim == 2 and sums.shape[0] == 1:
            sums = sums[0]
        if sums.shape != (self.spec.width,):
            raise ValueError(
                f"state {self.spec.name!r} update has shape {np.shape(window_sums)}, "
                f"expected ({self.spec.width},)"
            )
        if not np.all(np.isfinite(sums)):
            raise ValueError(f"state {self.spec.name!r} update contains NaN or infinite values")
        self._sums += sums
        self.updates += 1
        limit, index = self.spec.max_count, self.spec.count_index
        if limit is not None and index is not None:
            count = self._sums[index]
            if count > limit:
                self._sums *= limit / count
                self.rescales += 1

    def reset(self) -> None:
        """Forget the speaker (e.g. the stream changed hands)."""
        self._sums[:] = 0.0
        self.updates = 0
