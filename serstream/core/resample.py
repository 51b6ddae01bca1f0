"""Streaming sample-rate conversion of one mono stream to the model rate.

One :class:`StreamResampler` per stream keeps the filter state between
blocks, so block boundaries leave no clicks and the output length tracks the
input length exactly over time.

Integer ratios (8 kHz telephony up to 16 kHz, 32/48 kHz down) go through a
short linear-phase FIR from scipy with its state carried across blocks: it
holds back about 1.5 ms. soxr's stream resampler, used for every other ratio,
holds back 75-90 ms at 8 kHz in 20 ms blocks (measured), which is most of an
RTP stream's latency budget.
"""

from __future__ import annotations

import numpy as np
import soxr
from scipy.signal import firwin, kaiserord

from serstream.contract import SAMPLE_RATE

__all__ = ["MIN_RATE", "MAX_RATE", "StreamResampler", "validate_rate"]

MIN_RATE = 8_000
MAX_RATE = 384_000
_QUALITIES = ("HQ", "MQ")
#: Kaiser design: 60 dB stop band, 1 kHz transition below the lower Nyquist.
_FIR_ATTENUATION_DB = 60.0
_FIR_TRANSITION_HZ = 1000.0


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
        self._fir: _IntegerRatioFir | None = None
        if self.in_rate != self.out_rate and _IntegerRatioFir.fits(self.in_rate, self.out_rate):
            self._fir = _IntegerRatioFir(self.in_rate, self.out_rate)
        elif self.in_rate != self.out_rate:
            self._stream = soxr.ResampleStream(
                self.in_rate, self.out_rate, 1, dtype="float32", quality=quality
            )

    @property
    def passthrough(self) -> bool:
        """True when the rates are equal and blocks are returned unchanged."""
        return self._stream is None and self._fir is None

    def process(self, block: np.ndarray) -> np.ndarray:
        """Resample one 1-D block; the result may be empty while the filter fills."""
        data = np.asarray(block)
        if data.ndim != 1:
            raise ValueError(f"resampler takes 1-D mono blocks, got shape {data.shape}")
        data = data.astype(np.float32, copy=False)
        self.samples_in += data.size
        out: np.ndarray  # soxr is untyped: its results are Any
        if self._fir is not None:
            out = self._fir.process(data)
            self.samples_out += out.size
            return out
        if self._stream is None:
            self.samples_out += data.size
            return data
        out = self._stream.resample_chunk(np.ascontiguousarray(data), last=False)
        self.samples_out += out.size
        return out

    def flush(self) -> np.ndarray:
        """Return the samples still held in the filter and reset it for a new stream."""
        out: np.ndarray  # soxr is untyped: its results are Any
        if self._fir is not None:
            out = self._fir.flush()
            self.samples_out += out.size
            return out
        if self._stream is None:
            return np.zeros(0, dtype=np.float32)
        out = self._stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
        self._stream.clear()
        self.samples_out += out.size
        return out


class _IntegerRatioFir:
    """Upsample by L or downsample by M with one Kaiser low-pass and carried state.

    The filter's group delay is dropped from the start of the output and
    flushed out with zeros at the end, so output sample k lines up with input
    time k / out_rate and the total length is exactly in_length * ratio.

    Upsampling runs polyphase, never multiplying the stuffed zeros: output
    phase p of each input sample is the input convolved with taps p, p + L,
    .... Each call is ``np.convolve`` over the carried input history plus the
    block: 8 -> 16 kHz in 45 ms blocks takes 35 us against scipy ``lfilter``'s
    95 us (its per-call overhead was the largest cost of the pipeline thread
    at 150 RTP streams; py-spy, benchmarks/bench_network.py).
    """

    @staticmethod
    def fits(in_rate: int, out_rate: int) -> bool:
        return max(in_rate, out_rate) % min(in_rate, out_rate) == 0

    def __init__(self, in_rate: int, out_rate: int) -> None:
        self.up = out_rate // in_rate if out_rate > in_rate else 1
        self.down = in_rate // out_rate if in_rate > out_rate else 1
        fast_rate = max(in_rate, out_rate)  # the filter runs at the higher rate
        cutoff = min(in_rate, out_rate) / 2.0 - _FIR_TRANSITION_HZ / 2.0

        numtaps, beta = kaiserord(_FIR_ATTENUATION_DB, _FIR_TRANSITION_HZ / (fast_rate / 2.0))
        numtaps |= 1  # odd: an integer group delay
        # Gain ``up`` restores the level lost to zero stuffing.
        self.taps = (firwin(numtaps, cutoff, window=("kaiser", beta), fs=fast_rate) * self.up).astype(np.float64)
        self.delay = (numtaps - 1) // 2  # in fast-rate samples
        # Phase p of the upsampler: taps p, p + up, ..., zero-padded to one length.
        per_phase = -(-numtaps // self.up)
        padded = np.zeros(per_phase * self.up)
        padded[:numtaps] = self.taps
        self._phases = [padded[p :: self.up].copy() for p in range(self.up)]
        #: Input samples the filter still needs from earlier blocks.
        self._history_len = per_phase - 1
        self.reset()

    def reset(self) -> None:
        self._history = np.zeros(self._history_len)
        self._to_skip = self.delay
        self._phase = 0  # fast-rate samples until the next kept one (downsampling)
        self._fast_in = 0

    def _filter(self, data: np.ndarray) -> np.ndarray:
        """Fast-rate filter output for ``data`` (input rate): before the delay skip and decimation."""
        joined = np.concatenate((self._history, data.astype(np.float64, copy=False)))
        if self._history_len:
            self._history = joined[-self._history_len :]
        if self.up == 1:
            return np.convolve(joined, self.taps, mode="valid")
        fast = np.empty(data.size * self.up)
        for p, taps in enumerate(self._phases):
            fast[p :: self.up] = np.convolve(joined, taps, mode="valid")
        return fast

    def _run(self, data: np.ndarray) -> np.ndarray:
        filtered = self._filter(data)
        if self._to_skip:
            skip = min(self._to_skip, filtered.size)
            filtered = filtered[skip:]
            self._to_skip -= skip
        if self.down > 1:
            kept = filtered[self._phase :: self.down]
            self._phase = (self._phase - filtered.size) % self.down
            filtered = kept
        result: np.ndarray = filtered.astype(np.float32)
        return result

    def process(self, data: np.ndarray) -> np.ndarray:
        self._fast_in += data.size * self.up
        return self._run(data)

    def flush(self) -> np.ndarray:
        expected = self._fast_in // self.down
        emitted_before = (self._fast_in - self.delay + self.down - 1) // self.down if self._fast_in > self.delay else 0
        # Zeros enough to push the delayed samples out (at least ``delay`` at the fast rate).
        tail = self._run(np.zeros(-(-self.delay // self.up)))
        out = tail[: max(0, expected - emitted_before)]
        self.reset()
        return out
