"""A bounded float32 audio ring with absolute sample indices.

The writer (an audio callback) never blocks and never allocates: when the
reader falls behind, the oldest unread samples are overwritten and counted.
Each read reports the absolute index of its first sample, so a reader that
tracks where it stopped sees a dropped stretch as a jump in the index and can
keep the stream clock true to the source.
"""

from __future__ import annotations

import numpy as np

__all__ = ["AudioRing"]


class AudioRing:
    """Single-writer, single-reader ring of float32 samples.

    Not thread-safe by itself: the caller serialises ``write`` and ``read``
    (one short lock in the monitor).
    """

    def __init__(self, capacity: int) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) or capacity <= 0:
            raise ValueError(f"ring capacity must be a positive integer, got {capacity!r}")
        self._capacity = int(capacity)
        self._buffer = np.zeros(self._capacity, dtype=np.float32)
        self._written = 0  # absolute index one past the newest sample
        self._read = 0  # absolute index of the oldest unread sample
        self._dropped = 0

    @property
    def capacity(self) -> int:
        """Samples the ring holds."""
        return self._capacity

    @property
    def written(self) -> int:
        """Samples written since creation (also the absolute index of the next write)."""
        return self._written

    @property
    def dropped(self) -> int:
        """Unread samples overwritten (or never stored) since creation."""
        return self._dropped

    @property
    def available(self) -> int:
        """Unread samples held now."""
        return self._written - self._read

    @property
    def read_index(self) -> int:
        """Absolute index of the next sample ``read`` returns."""
        return self._read

    def write(self, samples: np.ndarray) -> int:
        """Append a 1-D block; return how many unread samples were lost to make room."""
        data = np.asarray(samples)
        if data.ndim != 1:
            raise ValueError(f"ring takes 1-D blocks, got shape {data.shape}")
        n = data.size
        if n == 0:
            return 0
        cap = self._capacity
        if n > cap:
            # Only the newest `capacity` samples can be kept; the head of the block is lost too.
            data = data[n - cap:]
        start = (self._written + n - data.size) % cap
        first = min(data.size, cap - start)
        self._buffer[start:start + first] = data[:first]
        if first < data.size:
            self._buffer[: data.size - first] = data[first:]
        self._written += n
        oldest_kept = self._written - cap
        lost = max(0, oldest_kept - self._read)
        if lost:
            self._read = oldest_kept
            self._dropped += lost
        return lost

    def read(self, max_samples: int | None = None) -> tuple[int, np.ndarray]:
        """Return ``(index, samples)``: a copy of up to ``max_samples`` unread samples and the index of the first."""
        count = self.available
        if max_samples is not None:
            if max_samples < 0:
                raise ValueError(f"max_samples must be >= 0, got {max_samples}")
            count = min(count, int(max_samples))
        index = self._read
        start = index % self._capacity
        first = min(count, self._capacity - start)
        out = np.empty(count, dtype=np.float32)
        out[:first] = self._buffer[start:start + first]
        if first < count:
            out[first:] = self._buffer[: count - first]
        self._read += count
        return index, out
