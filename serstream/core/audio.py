"""Sample-format helpers: sanitising, down-mixing and PCM conversion.

Everything here is vectorised numpy; nothing loops over samples in Python,
because these functions sit on the path of every block of every stream.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "sanitize",
    "to_mono",
    "pcm16_to_float",
    "float_to_pcm16",
    "pcm_u8_to_float",
]

_PCM16_SCALE = 32768.0
# Full-scale positive float maps to 32767, not 32768, so +1.0 does not wrap.
_PCM16_MAX = 32767.0


def sanitize(block: np.ndarray) -> tuple[np.ndarray, int]:
    """Return ``(clean, n_bad)``: float32 copy with NaN/±inf set to 0 and values clipped to [-1, 1].

    ``n_bad`` counts the non-finite samples that were replaced, so the caller
    can report them; the caller's array is never modified.
    """
    data = np.asarray(block)
    if data.dtype.kind != "f":
        # Integer PCM must be scaled first (pcm16_to_float); clipping raw ints would destroy it.
        raise ValueError(f"audio block must be floating point, got dtype {data.dtype}")
    clean = np.array(data, dtype=np.float32, copy=True)
    finite = np.isfinite(clean)
    n_bad = int(clean.size - np.count_nonzero(finite))
    if n_bad:
        clean[~finite] = 0.0
    np.clip(clean, -1.0, 1.0, out=clean)
    return clean, n_bad


def to_mono(block: np.ndarray) -> np.ndarray:
    """Average the channels of a ``[frames, channels]`` block; 1-D blocks pass through as float32."""
    data = np.asarray(block)
    if data.ndim == 1:
        return data.astype(np.float32, copy=False)
    if data.ndim != 2:
        raise ValueError(f"audio block must be 1-D or [frames, channels], got shape {data.shape}")
    if data.shape[1] == 0:
        raise ValueError("audio block has zero channels")
    if data.shape[1] == 1:
        return data[:, 0].astype(np.float32, copy=True)
    mixed: np.ndarray = data.mean(axis=1, dtype=np.float32)
    return mixed


def pcm16_to_float(pcm: bytes | bytearray | memoryview | np.ndarray) -> np.ndarray:
    """Little-endian signed 16-bit PCM (bytes or an int16 array) to float32 in [-1, 1)."""
    if isinstance(pcm, np.ndarray):
        if pcm.dtype != np.int16:
            raise ValueError(f"expected an int16 array, got dtype {pcm.dtype}")
        ints = pcm
    else:
        raw = memoryview(pcm).cast("B")
        if raw.nbytes % 2:
            raise ValueError(f"16-bit PCM needs an even number of bytes, got {raw.nbytes}")
        ints = np.frombuffer(raw, dtype="<i2")
    return ints.astype(np.float32) * np.float32(1.0 / _PCM16_SCALE)


def float_to_pcm16(samples: np.ndarray) -> np.ndarray:
    """Float samples in [-1, 1] to int16 (clipped; NaN becomes 0)."""
    # In-place ufuncs on one scratch array: this runs on every VAD frame of every stream.
    scaled = np.multiply(np.asarray(samples, dtype=np.float32), np.float32(_PCM16_SCALE))
    np.clip(scaled, -_PCM16_SCALE, _PCM16_MAX, out=scaled)  # also maps ±inf to full scale
    np.rint(scaled, out=scaled)
    nan = np.isnan(scaled)
    if nan.any():
        scaled[nan] = 0.0
    return scaled.astype(np.int16)


def pcm_u8_to_float(pcm: bytes | bytearray | memoryview | np.ndarray) -> np.ndarray:
    """Unsigned 8-bit PCM (128 = silence, as in WAV) to float32 in [-1, 1)."""
    if isinstance(pcm, np.ndarray):
        if pcm.dtype != np.uint8:
            raise ValueError(f"expected a uint8 array, got dtype {pcm.dtype}")
        ints = pcm
    else:
        ints = np.frombuffer(memoryview(pcm).cast("B"), dtype=np.uint8)
    return (ints.astype(np.float32) - np.float32(128.0)) * np.float32(1.0 / 128.0)
