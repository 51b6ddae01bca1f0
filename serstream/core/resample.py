"""Streaming sample-rate conversion of one mono stream to the model rate.

One :class:`StreamResampler` per stream keeps the soxr filter state between
blocks, so block boundaries leave no clicks and the output length tracks the
input length exactly over time.
"""

from __future__ import annotations

import numpy as np
import soxr

from serstream.contract import SAMPLE_RATE

__all__ = ["MIN_RATE", "MAX_RATE", "StreamResampler", "validate_rate"]

MIN_RATE = 8_000
MAX_RATE = 384_000
_QUALITIES = ("HQ", "MQ")


def validate_rate(rate: object, what: str = "sample rate") -> int:
    """Return ``rate`` as an int, or raise ValueError with a one-line reason."""
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)):
        raise ValueError(f"{what} must be an integer number of Hz, got {rate!r}")
    value = int(rate)
    if not MIN_RATE <= value <= MAX_RATE:
        raise ValueError(f"{what} {value} Hz is outside the supported range {MIN_RATE}..{MAX_RATE} Hz")
    return value


class StreamResampler:
    """Convert float32 mono blocks from ``in_rate`` to ``out_rate`` across calls.

    ``process`` returns what the filter can emit so far (the filter delay holds
    back a few milliseconds); ``flush`` returns the rest at end of stream, after
    which the resampler starts afresh.
    """

    def __init__(self, in_rate: int, out_rate: int = SAMPLE_RATE, quality: str = "HQ") -> None:
        self.in_rate = validate_rate(in_rate, "input sample rate")
        self.out_rate = validate_rate(out_rate, "output sample rate")
        if quality not in _QUALITIES:
            raise ValueError(f"resampler quality must be one of {_QUALITIES}, got {quality!r}")
        self.quality = quality
        self.samples_in = 0
        self.samples_out = 0
        self._stream: soxr.ResampleStream | None = None
        if self.in_rate != self.out_rate:
            self._stream = soxr.ResampleStream(
                self.in_rate, self.out_rate, 1, dtype="float32", quality=quality
            )

    @property
    def passthrough(self) -> bool:
        """True when the rates are equal and blocks are returned unchanged."""
        return self._stream is None

    def process(self, block: np.ndarray) -> np.ndarray:
        """Resample one 1-D block; the result may be empty while the filter fills."""
        data = np.asarray(block)
        if data.ndim != 1:
            raise ValueError(f"resampler takes 1-D mono blocks, got shape {data.shape}")
        data = data.astype(np.float32, copy=False)
        self.samples_in += data.size
        if self._stream is None:
            self.samples_out += data.size
            return data
        out = self._stream.resample_chunk(np.ascontiguousarray(data), last=False)
        self.samples_out += out.size
        return out

    def flush(self) -> np.ndarray:
        """Return the samples still held in the filter and reset it for a new stream."""
        if self._stream is None:
            return np.zeros(0, dtype=np.float32)
        out = self._stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
        self._stream.clear()
        self.samples_out += out.size
        return out
