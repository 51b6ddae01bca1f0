"""Arousal, valence and dominance targets derived from the emotion category words.

No corpus here has dimensional ratings, so each category gets the ratings of
its word in the NRC VAD Lexicon v1 (Saif M. Mohammad, "Obtaining Reliable
Human Ratings of Valence, Arousal, and Dominance for 20,000 English Words",
ACL 2018), mapped from [0, 1] to [-1, 1]. These are *derived* targets: they say
where the word sits, not how a listener rated the recording.

Intensity is derived too, not rated: "normal" moves the category's point 25 %
of the way toward neutral's point, "strong" 25 % away from it (clipped to
[-1, 1]); no intensity (TESS, SAVEE, EmoDB) leaves the point where the word is.

Output order is the model's ``avd`` output: (arousal, valence, dominance).
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Mapping, Sequence

import numpy as np

from serstream.contract import LABELS

__all__ = [
    "CATEGORY_AVD",
    "INTENSITY_STEP",
    "LEXICON_WORDS",
    "NRC_VAD_V1",
    "avd_target",
    "avd_targets",
]

#: The lexicon word used for each label. "fearful" is itself in the lexicon (the
#: brief's rule: "fear" only if "fearful" were absent); "disgust" likewise.
LEXICON_WORDS: Mapping[str, str] = MappingProxyType(
    {
        "neutral": "neutral",
        "calm": "calm",
        "happy": "happy",
        "sad": "sad",
        "angry": "angry",
        "fearful": "fearful",
        "disgust": "disgust",
        "surprised": "surprised",
    }
)

#: NRC VAD Lexicon v1 ratings, copied from the lexicon file for these words, in the
#: file's column order: (valence, arousal, dominance), each in [0, 1].
NRC_VAD_V1: Mapping[str, tuple[float, float, float]] = MappingProxyType(
    {
        "neutral": (0.469, 0.184, 0.357),
        "calm": (0.875, 0.100, 0.282),
        "happy": (1.000, 0.735, 0.772),
        "sad": (0.225, 0.333, 0.149),
        "angry": (0.122, 0.830, 0.604),
        "fearful": (0.083, 0.482, 0.278),
        "disgust": (0.052, 0.775, 0.317),
        "surprised": (0.784, 0.855, 0.539),
    }
)

#: Fraction of the way toward (normal) or away from (strong) neutral's point.
INTENSITY_STEP = 0.25


def _to_signed(rating: float) -> float:
    return 2.0 * rating - 1.0


def _category_table() -> Mapping[str, tuple[float, float, float]]:
    table = {}
    for label in LABELS:
        valence, arousal, dominance = NRC_VAD_V1[LEXICON_WORDS[label]]
        table[label] = (_to_signed(arousal), _to_signed(valence), _to_signed(dominance))
    # Fail loudly at import if the constants are ever edited out of shape.
    values = np.array(list(table.values()))
    if values.shape != (len(LABELS), 3) or not np.all(np.abs(values) <= 1.0):
        raise RuntimeError("targets: NRC VAD constants are malformed")
    return MappingProxyType(table)


#: label -> (arousal, valence, dominance) in [-1, 1], before any intensity shift.
CATEGORY_AVD: Mapping[str, tuple[float, float, float]] = _category_table()


def avd_target(label: str, intensity: str | None = None) -> tuple[float, float, float]:
    """(arousal, valence, dominance) in [-1, 1] for a category and an intensity.

    ``intensity`` is "normal", "strong" or None (point of the word itself).
    Raises ValueError for a label outside the label space or an unknown intensity.
    """
    if label not in CATEGORY_AVD:
        raise ValueError(f"label {label!r} is not one of {LABELS}")
    point = np.array(CATEGORY_AVD[label])
    neutral = np.array(CATEGORY_AVD["neutral"])
    if intensity is None:
        moved = point
    elif intensity == "normal":
        moved = point + INTENSITY_STEP * (neutral - point)
    elif intensity == "strong":
        moved = point + INTENSITY_STEP * (point - neutral)
    else:
        raise ValueError(f"intensity {intensity!r} is not 'normal', 'strong' or None")
    a, v, d = np.clip(moved, -1.0, 1.0)
    return (float(a), float(v), float(d))


def avd_targets(labels: Sequence[str], intensities: Sequence[str | None]) -> np.ndarray:
    """float32 [N, 3] targets for parallel sequences of labels and intensities."""
    if len(labels) != len(intensities):
        raise ValueError(f"{len(labels)} labels but {len(intensities)} intensities")
    out = np.zeros((len(labels), 3), dtype=np.float32)
    for i, (label, intensity) in enumerate(zip(labels, intensities)):
        out[i] = avd_target(label, intensity)
    return out
