"""ITU-T G.711 u-law and A-law codecs, vectorised with numpy.

Decoding is a lookup in a 256-entry table per law, computed once at import
from the G.711 segment definitions (Python's ``audioop`` is gone in 3.13).
Linear values follow the usual 16-bit scaling of G.711 (u-law peaks at
+-32124, A-law at +-32256); the float functions divide by 32768, so every
decoded sample lies in [-1, 1].

Encoders take float samples in [-1, 1] (NaN is encoded as 0, values beyond
full scale are clipped) and return one byte per sample. The telephony
augmentation in ``training/`` may import them.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = [
    "ULAW_TO_LINEAR",
    "ALAW_TO_LINEAR",
    "decode_ulaw",
    "decode_alaw",
    "encode_ulaw",
    "encode_alaw",
]

_FULL_SCALE = 32768.0

# u-law works on magnitudes with a bias of 0x84 (33 in 14-bit units) added, so
# every segment boundary falls on a power of two; 32635 + 0x84 is the largest
# biased magnitude that still fits the top segment.
_ULAW_BIAS = 0x84
_ULAW_CLIP = 32635


def _ulaw_table() -> npt.NDArray[np.int16]:
    codes = np.arange(256, dtype=np.int32)
    inverted = ~codes & 0xFF  # u-law transmits every bit inverted
    exponent = (inverted >> 4) & 0x07
    mantissa = inverted & 0x0F
    magnitude = (((mantissa << 3) + _ULAW_BIAS) << exponent) - _ULAW_BIAS
    return np.where(inverted & 0x80, -magnitude, magnitude).astype(np.int16)


def _alaw_table() -> npt.NDArray[np.int16]:
    codes = np.arange(256, dtype=np.int32)
    toggled = codes ^ 0x55  # A-law transmits the even bits inverted
    exponent = (toggled >> 4) & 0x07
    mantissa = toggled & 0x0F
    # Segment 0 is linear (step 16); segment e >= 1 has an implicit leading one
    # and step 16 << (e - 1). Each value is the middle of its decision interval.
    segment0 = (mantissa << 4) + 8
    upper = ((mantissa << 4) + 0x108) << np.maximum(exponent - 1, 0)
    magnitude = np.where(exponent == 0, segment0, upper)
    # In A-law the sign bit set means positive.
    return np.where(toggled & 0x80, magnitude, -magnitude).astype(np.int16)


#: Code -> 16-bit linear value, per G.711 (read-only).
ULAW_TO_LINEAR: npt.NDArray[np.int16] = _ulaw_table()
ALAW_TO_LINEAR: npt.NDArray[np.int16] = _alaw_table()
ULAW_TO_LINEAR.flags.writeable = False
ALAW_TO_LINEAR.flags.writeable = False

_ULAW_TO_FLOAT = (ULAW_TO_LINEAR / _FULL_SCALE).astype(np.float32)
_ALAW_TO_FLOAT = (ALAW_TO_LINEAR / _FULL_SCALE).astype(np.float32)


def decode_ulaw(data: bytes | bytearray | memoryview) -> npt.NDArray[np.float32]:
    """u-law bytes -> float32 samples in [-1, 1], one per byte."""
    return _ULAW_TO_FLOAT[np.frombuffer(data, dtype=np.uint8)]


def decode_alaw(data: bytes | bytearray | memoryview) -> npt.NDArray[np.float32]:
    """A-law bytes -> float32 samples in [-1, 1], one per byte."""
    return _ALAW_TO_FLOAT[np.frombuffer(data, dtype=np.uint8)]


def _to_linear(samples: npt.ArrayLike) -> npt.NDArray[np.int32]:
    """Float samples -> signed 16-bit linear values (as int32, for the bit work)."""
    x = np.nan_to_num(np.asarray(samples, dtype=np.float64).ravel(), nan=0.0, posinf=1.0, neginf=-1.0)
    x = np.clip(x, -1.0, 1.0)
    return np.clip(np.rint(x * _FULL_SCALE), -_FULL_SCALE, _FULL_SCALE - 1).astype(np.int32)


def _bit_length(values: npt.NDArray[np.int32]) -> npt.NDArray[np.int32]:
    """Number of significant bits of each non-negative value (0 for 0)."""
    return np.frexp(values.astype(np.float64))[1].astype(np.int32)


def encode_ulaw(samples: npt.ArrayLike) -> bytes:
    """Float samples in [-1, 1] -> u-law bytes, one per sample."""
    linear = _to_linear(samples)
    sign = np.where(linear < 0, 0x80, 0)
    biased = np.minimum(np.abs(linear), _ULAW_CLIP) + _ULAW_BIAS
    # biased lies in [2**7, 2**15): its top bit picks the segment 0..7.
    exponent = _bit_length(biased) - 8
    mantissa = (biased >> (exponent + 3)) & 0x0F
    code = ~(sign | (exponent << 4) | mantissa) & 0xFF
    encoded: bytes = code.astype(np.uint8).tobytes()
    return encoded


def encode_alaw(samples: npt.ArrayLike) -> bytes:
    """Float samples in [-1, 1] -> A-law bytes, one per sample."""
    linear = _to_linear(samples)
    sign = np.where(linear >= 0, 0x80, 0)
    magnitude = np.minimum(np.abs(linear), 32767)
    # Below 256 the segment is linear; above, the top bit picks segments 1..7.
    exponent = np.maximum(_bit_length(magnitude) - 8, 0)
    shift = np.where(exponent == 0, 4, exponent + 3)
    mantissa = (magnitude >> shift) & 0x0F
    code = (sign | (exponent << 4) | mantissa) ^ 0x55
    encoded: bytes = code.astype(np.uint8).tobytes()
    return encoded
