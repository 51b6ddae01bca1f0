"""Test audio: synthetic voiced signals (numpy) and real speech (espeak-ng + sox).

The synthetic signal is a harmonic tone with a wandering pitch and a syllable-
rate envelope: webrtcvad calls it speech, so the monitor's whole pipeline runs
on it without any external tool. espeak-ng gives real sentences for the end-to-
end tests; sox resamples and pads them.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Sequence

import numpy as np
import soundfile as sf

__all__ = [
    "SAMPLE_RATE",
    "voiced",
    "silence",
    "speech_with_pauses",
    "write_wav",
    "have_tools",
    "espeak_sentences",
]

SAMPLE_RATE = 16_000


def voiced(seconds: float, rate: int = SAMPLE_RATE, f0: float = 140.0, seed: int = 0) -> np.ndarray:
    """A speech-like voiced signal (float32, peak 0.3) that webrtcvad detects as speech."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * rate))
    t = np.arange(n) / rate
    pitch = f0 * (1.0 + 0.08 * np.sin(2 * np.pi * 3.0 * t))
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    harmonics = sum(np.sin(k * phase) / k for k in range(1, 20))
    syllables = 0.5 + 0.5 * np.sin(2 * np.pi * 4.0 * t - np.pi / 2) ** 2
    signal = harmonics * syllables + 0.02 * rng.standard_normal(n)
    peak = float(np.abs(signal).max()) or 1.0
    return (0.3 * signal / peak).astype(np.float32)


def silence(seconds: float, rate: int = SAMPLE_RATE) -> np.ndarray:
    """Digital silence (webrtcvad never calls it speech)."""
    return np.zeros(int(round(seconds * rate)), dtype=np.float32)


def speech_with_pauses(
    pattern: Sequence[tuple[float, float]] = ((0.5, 2.0), (1.0, 1.5)),
    tail_s: float = 1.0,
    rate: int = SAMPLE_RATE,
    seed: int = 0,
) -> np.ndarray:
    """(pause, speech) pairs in seconds, then ``tail_s`` of silence: one utterance per pair."""
    parts: list[np.ndarray] = []
    for i, (pause_s, speech_s) in enumerate(pattern):
        parts.append(silence(pause_s, rate))
        parts.append(voiced(speech_s, rate, f0=120.0 + 30.0 * i, seed=seed + i))
    parts.append(silence(tail_s, rate))
    return np.concatenate(parts)


def write_wav(path: Path, audio: np.ndarray, rate: int = SAMPLE_RATE, subtype: str = "PCM_16") -> Path:
    """Write float audio ([n] or [n, channels]) as a WAV file and return its path."""
    sf.write(str(path), audio, rate, subtype=subtype)
    return path


def have_tools(*names: str) -> list[str]:
    """The named executables that are missing from PATH (empty when all are there)."""
    return [name for name in names if shutil.which(name) is None]


def espeak_sentences(
    path: Path,
    sentences: Sequence[str],
    rate: int = SAMPLE_RATE,
    channels: int = 1,
    pause_s: float = 1.0,
    voice: str = "en",
) -> Path:
    """Speak each sentence with espeak-ng, join them with ``pause_s`` of silence, write ``path``.

    sox resamples to ``rate`` and duplicates to ``channels``, so tests can make
    the odd rates and channel counts a real device or file gives.
    """
    work = path.parent / f".{path.stem}-parts"
    work.mkdir(parents=True, exist_ok=True)
    parts: list[str] = []
    for i, sentence in enumerate(sentences):
        raw = work / f"{i}.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-w", str(raw), sentence], check=True)
        padded = work / f"{i}-padded.wav"
        subprocess.run(
            ["sox", str(raw), "-r", str(rate), "-c", str(channels), str(padded), "pad", str(pause_s), "0"],
            check=True,
        )
        parts.append(str(padded))
    # A trailing pause so the last utterance ends (VAD hangover) inside the file.
    subprocess.run(["sox", *parts, str(path), "pad", "0", str(pause_s)], check=True)
    shutil.rmtree(work, ignore_errors=True)
    return path
