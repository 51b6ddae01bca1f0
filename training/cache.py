"""Decode a corpus once into one in-memory array, cached on disk outside the repo.

Reading 4,000+ FLAC files and trimming their silences takes minutes on two
cores; every fold and every epoch needs the same audio. So the decoded,
silence-trimmed 16 kHz int16 audio of every utterance is concatenated into one
array with offsets and kept in ``~/.cache/serstream`` (never in the repo: it is
derived from licensed corpora). The key is a hash of the file list, sizes and
trimming parameters, so a changed corpus or setting makes a new cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from serstream.contract import LABELS, SAMPLE_RATE

__all__ = ["CachedCorpus", "build_cache", "trim_silence", "default_cache_dir", "save_npz_atomically"]

GENDERS = ("female", "male")
INTENSITIES = ("normal", "strong")


def default_cache_dir() -> Path:
    return Path(os.environ.get("SERSTREAM_CACHE", Path.home() / ".cache" / "serstream"))


def save_npz_atomically(target: Path, **arrays: Any) -> None:
    """Write ``target`` (.npz) so that a reader sees the old file or the new one, never half of one.

    The temporary file is named after this process: two runs started side by
    side (a cross-validation and a leave-one-corpus-out run on an empty cache)
    both decode and write the same cache, and with one shared temporary name
    the second rename found the file already moved and crashed its run.
    """
    tmp = target.with_name(f"{target.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, target)


def trim_silence(audio: np.ndarray, sample_rate: int = SAMPLE_RATE, threshold_db: float = 35.0, pad_s: float = 0.15) -> np.ndarray:
    """Cut leading/trailing frames quieter than ``threshold_db`` below the loudest frame.

    The monitor only ever sees what its VAD calls speech (plus a little
    pre-roll and hangover), so training on the corpora's long silent lead-ins
    would teach the model a context it never gets.
    """
    frame = int(0.02 * sample_rate)
    n = len(audio) // frame
    if n < 3:
        return audio
    energy = (audio[: n * frame].reshape(n, frame).astype(np.float64) ** 2).mean(axis=1) + 1e-12
    db = 10.0 * np.log10(energy)
    loud = np.flatnonzero(db > db.max() - threshold_db)
    pad = int(pad_s * sample_rate)
    start = max(0, loud[0] * frame - pad)
    end = min(len(audio), (loud[-1] + 1) * frame + pad)
    return audio[start:end]


@dataclass
class CachedCorpus:
    """All utterances' audio and labels, index-aligned."""

    audio: np.ndarray  # int16, concatenated
    offsets: np.ndarray  # int64 [n + 1]
    label: np.ndarray  # int64 index into LABELS
    speaker: np.ndarray  # str
    corpus: np.ndarray  # str
    gender: np.ndarray  # int64: 0 female, 1 male, -1 unknown
    intensity: np.ndarray  # int64: 0 normal, 1 strong, -1 unknown
    path: np.ndarray  # str (relative to the data root)
    # ASED's sentence number (1-7) and common-sentence flag (1 for SS 01-02);
    # -1 for corpora without them. Caches written before these existed lack
    # them: filled with -1 on load.
    sentence: np.ndarray | None = None  # int64
    common: np.ndarray | None = None  # int64: 1 common, 0 not, -1 unknown

    def __post_init__(self) -> None:
        for name in ("sentence", "common"):
            if getattr(self, name) is None:
                setattr(self, name, np.full(len(self.label), -1, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.label)

    def clip(self, i: int) -> np.ndarray:
        """Float32 audio of utterance ``i``."""
        return self.audio[self.offsets[i] : self.offsets[i + 1]].astype(np.float32) / 32768.0

    def indices(self, speakers: Sequence[str]) -> np.ndarray:
        return np.flatnonzero(np.isin(self.speaker, np.asarray(list(speakers))))


def _key(utterances: Sequence, data_root: Path) -> str:
    h = hashlib.sha256()
    h.update(b"trim35-pad0.15-v1")
    for u in utterances:
        p = Path(u.path)
        h.update(str(p.relative_to(data_root) if p.is_relative_to(data_root) else p).encode())
        h.update(str(p.stat().st_size).encode())
        h.update(f"{u.label}|{u.speaker}|{u.gender}|{u.intensity}".encode())
        sentence = getattr(u, "sentence", None)
        if sentence is not None:  # only ASED's entries: the RAVDESS/TESS caches keep their keys
            h.update(f"|s{sentence}|{getattr(u, 'common', None)}".encode())
    return h.hexdigest()[:16]


def build_cache(utterances: Sequence, data_root: Path, cache_dir: Path | None = None, progress: bool = True) -> CachedCorpus:
    """Decode, resample and trim ``utterances`` (objects with path/corpus/speaker/label/gender/intensity)."""
    from .datasets import load_audio  # soundfile + soxr; one reader for every corpus

    data_root = Path(data_root).resolve()
    cache_dir = Path(cache_dir or default_cache_dir())
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / f"corpus-{_key(utterances, data_root)}.npz"
    if target.exists():
        z = np.load(target, allow_pickle=False)
        return CachedCorpus(**{k: z[k] for k in z.files})
    clips: list[np.ndarray] = []
    try:
        from tqdm import tqdm

        it = tqdm(utterances, desc="decoding corpus", unit="file", disable=not progress, file=sys.stderr)
    except ImportError:  # tqdm is a training extra; without it there is just no bar
        it = utterances
    for u in it:
        audio = trim_silence(load_audio(u.path, SAMPLE_RATE))
        clips.append(np.clip(np.round(audio * 32767.0), -32768, 32767).astype(np.int16))
    offsets = np.zeros(len(clips) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(c) for c in clips])
    corpus = CachedCorpus(
        audio=np.concatenate(clips) if clips else np.zeros(0, np.int16),
        offsets=offsets,
        label=np.array([LABELS.index(u.label) for u in utterances], dtype=np.int64),
        speaker=np.array([u.speaker for u in utterances]),
        corpus=np.array([u.corpus for u in utterances]),
        gender=np.array([GENDERS.index(u.gender) if u.gender in GENDERS else -1 for u in utterances], dtype=np.int64),
        intensity=np.array(
            [INTENSITIES.index(u.intensity) if u.intensity in INTENSITIES else -1 for u in utterances], dtype=np.int64
        ),
        sentence=np.array([-1 if getattr(u, "sentence", None) is None else int(u.sentence) for u in utterances],
                          dtype=np.int64),
        common=np.array([-1 if getattr(u, "common", None) is None else int(bool(u.common)) for u in utterances],
                        dtype=np.int64),
        path=np.array([str(Path(u.path).resolve().relative_to(data_root)) if Path(u.path).resolve().is_relative_to(data_root) else str(u.path) for u in utterances]),
    )
    save_npz_atomically(target, **corpus.__dict__)
    (cache_dir / f"{target.stem}.json").write_text(json.dumps({"files": len(utterances), "data_root": str(data_root)}))
    return corpus
