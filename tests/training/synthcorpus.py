"""Tiny synthetic corpora for tests: files named like the real corpora, content learnable by class.

Audio is a numpy harmonic signal (no speech engine needed): each emotion has
its own pitch level, pitch glide, loudness, brightness and syllable rate, each
speaker its own base pitch (male lower) and recording level, so a classifier
can learn the classes and folds still have to generalise across speakers.

``make_ravdess_like``, ``make_tess_like`` and ``make_ased_like`` write corpora with content;
``write_named_tree`` writes short clips under given names for reader tests,
with the name lists for CREMA-D, SAVEE and EmoDB (good and bad names, each bad
one with the reason its reader must give).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import soundfile as sf

from serstream.contract import LABELS

__all__ = [
    "CREMA_D_BAD",
    "CREMA_D_DEMOGRAPHICS",
    "CREMA_D_GOOD",
    "ASED_BAD",
    "ASED_GOOD",
    "EMODB_BAD",
    "EMODB_GOOD",
    "SAVEE_BAD",
    "SAVEE_GOOD",
    "emotion_signal",
    "make_ased_like",
    "make_ravdess_like",
    "make_tess_like",
    "write_clip",
    "write_named_tree",
]

SAMPLE_RATE = 16_000

# Per emotion: (pitch factor, glide in semitones over the clip, level dB, harmonic
# roll-off per harmonic (lower = brighter), syllables per second).
_EMOTION_STYLE: Mapping[str, tuple[float, float, float, float, float]] = {
    "neutral": (1.00, 0.0, -26.0, 0.55, 3.0),
    "calm": (0.92, -1.0, -30.0, 0.70, 2.2),
    "happy": (1.30, 3.0, -18.0, 0.35, 4.5),
    "sad": (0.85, -3.0, -32.0, 0.80, 1.8),
    "angry": (1.20, 0.0, -12.0, 0.20, 5.0),
    "fearful": (1.45, 1.0, -22.0, 0.45, 6.5),
    "disgust": (0.95, -2.0, -20.0, 0.50, 2.6),
    "surprised": (1.55, 6.0, -16.0, 0.40, 3.8),
}

_RAVDESS_CODE = {label: f"{i + 1:02d}" for i, label in enumerate(LABELS)}
_TESS_CODE = {
    "angry": "angry",
    "disgust": "disgust",
    "fearful": "fear",
    "happy": "happy",
    "neutral": "neutral",
    "sad": "sad",
    "surprised": "ps",
}
_TESS_FOLDER = {**_TESS_CODE, "surprised": "pleasant_surprise"}


def emotion_signal(
    emotion: str,
    base_f0: float,
    level_db: float,
    seconds: float,
    seed: int,
    sample_rate: int = SAMPLE_RATE,
) -> np.ndarray:
    """A voiced, syllable-modulated harmonic signal whose style depends on ``emotion``."""
    factor, glide, emotion_db, rolloff, syllable_rate = _EMOTION_STYLE[emotion]
    rng = np.random.default_rng(seed)
    n = int(round(seconds * sample_rate))
    t = np.arange(n) / sample_rate
    f0 = base_f0 * factor * 2.0 ** (glide * t / max(seconds, 1e-3) / 12.0)
    f0 = f0 * (1.0 + 0.01 * rng.standard_normal())
    phase = 2.0 * np.pi * np.cumsum(f0) / sample_rate
    signal = np.zeros(n)
    for k in range(1, 16):
        if (k * f0.max()) >= sample_rate / 2:
            break
        signal += (rolloff**k) * np.sin(k * phase + rng.uniform(0, 2 * np.pi))
    syllables = 0.5 * (1.0 - np.cos(2.0 * np.pi * syllable_rate * t + rng.uniform(0, np.pi)))
    signal = signal * (0.2 + 0.8 * syllables)
    signal += 0.02 * rng.standard_normal(n)
    signal /= np.sqrt(np.mean(signal**2)) + 1e-12
    signal *= 10.0 ** ((emotion_db + level_db) / 20.0)
    return np.clip(signal, -1.0, 1.0).astype(np.float32)


def write_clip(path: Path, audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    kind = "FLAC" if path.suffix.lower() == ".flac" else "WAV"
    sf.write(str(path), audio, sample_rate, format=kind, subtype="PCM_16")
    return path


def _ravdess_takes(emotion: str) -> list[tuple[str, str, str]]:
    """(intensity, statement, repetition) codes, alternating intensity; neutral has no strong."""
    intensities = ("01",) if emotion == "neutral" else ("01", "02")
    return [(i, s, r) for s in ("01", "02") for r in ("01", "02") for i in intensities]


def make_ravdess_like(
    root: Path,
    actors: Iterable[int] = (1, 2, 3, 4, 5, 6),
    emotions: Sequence[str] = LABELS,
    n_per: int = 2,
    seconds: float = 1.0,
    suffix: str = ".flac",
    sample_rate: int = SAMPLE_RATE,
) -> Path:
    """Write ``root/Actor_NN/03-01-EE-II-SS-RR-NN.flac``: ``n_per`` takes per actor and emotion."""
    root = Path(root)
    for actor in actors:
        male = actor % 2 == 1
        base_f0 = (115.0 if male else 205.0) * (1.0 + 0.04 * ((actor % 5) - 2))
        speaker_db = -4.0 * ((actor * 7) % 3)
        for emotion in emotions:
            takes = _ravdess_takes(emotion)[:n_per]
            for take, (intensity, statement, repetition) in enumerate(takes):
                strong_db = 4.0 if intensity == "02" else 0.0
                code = _RAVDESS_CODE[emotion]
                name = f"03-01-{code}-{intensity}-{statement}-{repetition}-{actor:02d}"
                seed = actor * 1000 + LABELS.index(emotion) * 10 + take
                audio = emotion_signal(
                    emotion, base_f0, speaker_db + strong_db, seconds, seed, sample_rate
                )
                write_clip(root / f"Actor_{actor:02d}" / f"{name}{suffix}", audio, sample_rate)
    return root


def make_tess_like(
    root: Path,
    speakers: Sequence[str] = ("OAF", "YAF"),
    emotions: Sequence[str] = tuple(_TESS_CODE),
    words: Sequence[str] = ("back", "bar"),
    seconds: float = 1.0,
    suffix: str = ".flac",
    sample_rate: int = SAMPLE_RATE,
) -> Path:
    """Write ``root/OAF_angry/OAF_back_angry.flac`` etc.

    Surprised is written as ``ps`` inside ``<SPEAKER>_pleasant_surprise/``, as in TESS.
    """
    root = Path(root)
    for s_index, speaker in enumerate(speakers):
        base_f0 = 190.0 if speaker == "OAF" else 230.0
        for emotion in emotions:
            folder = root / f"{speaker}_{_TESS_FOLDER[emotion]}"
            for w_index, word in enumerate(words):
                seed = 50_000 + s_index * 1000 + LABELS.index(emotion) * 10 + w_index
                # TESS is recorded about 10 dB louder than RAVDESS.
                audio = emotion_signal(emotion, base_f0, 8.0, seconds, seed, sample_rate)
                name = f"{speaker}_{word}_{_TESS_CODE[emotion]}{suffix}"
                write_clip(folder / name, audio, sample_rate)
    return root


_ASED_CODE = {"neutral": "n1", "fearful": "f2", "happy": "h3", "sad": "s4", "angry": "a5"}
_ASED_FOLDER = {"neutral": "01Neutral", "fearful": "02Fearful", "happy": "03Happy", "sad": "04Sad", "angry": "05Angry"}


def make_ased_like(
    root: Path,
    speakers: Iterable[int] = range(1, 7),
    emotions: Sequence[str] = tuple(_ASED_CODE),
    sentences: Sequence[int] = (1, 3),
    seconds: float = 1.0,
    suffix: str = ".flac",
    sample_rate: int = SAMPLE_RATE,
) -> Path:
    """Write ``root/05Angry/a5-SS-01-GG-PP.flac``: one take per speaker, emotion and sentence.

    Odd speaker numbers are female (GG 01), even male (GG 02); ASED's five classes only.
    """
    root = Path(root)
    for speaker in speakers:
        female = speaker % 2 == 1
        base_f0 = (210.0 if female else 120.0) * (1.0 + 0.03 * ((speaker % 4) - 1.5))
        for emotion in emotions:
            for sentence in sentences:
                seed = 90_000 + speaker * 100 + LABELS.index(emotion) * 10 + sentence
                audio = emotion_signal(emotion, base_f0, -2.0 * (speaker % 3), seconds, seed, sample_rate)
                name = f"{_ASED_CODE[emotion]}-{sentence:02d}-01-{'01' if female else '02'}-{speaker:02d}{suffix}"
                write_clip(root / _ASED_FOLDER[emotion] / name, audio, sample_rate)
    return root


def write_named_tree(
    root: Path, names: Iterable[str], seconds: float = 0.2, sample_rate: int = SAMPLE_RATE
) -> Path:
    """Write a short noise clip under each relative name (folders created as needed)."""
    root = Path(root)
    rng = np.random.default_rng(7)
    for name in names:
        audio = (0.05 * rng.standard_normal(int(seconds * sample_rate))).astype(np.float32)
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        kind = "FLAC" if path.suffix.lower() == ".flac" else "WAV"
        sf.write(str(path), audio, sample_rate, format=kind, subtype="PCM_16")
    return root


# Name lists for reader tests. GOOD: name -> (speaker, label, gender, intensity);
# BAD: name -> the reason prefix the reader must give.

CREMA_D_GOOD: Mapping[str, tuple[str, str, str | None, str | None]] = {
    "AudioWAV/1001_DFA_ANG_XX.wav": ("crema-d:1001", "angry", "male", None),
    "AudioWAV/1001_IEO_HAP_HI.wav": ("crema-d:1001", "happy", "male", "strong"),
    "AudioWAV/1002_TIE_SAD_LO.WAV": ("crema-d:1002", "sad", "female", "normal"),
    "AudioWAV/1002_IWW_FEA_MD.flac": ("crema-d:1002", "fearful", "female", "normal"),
    "AudioWAV/1003_TSI_DIS_XX.wav": ("crema-d:1003", "disgust", None, None),
    "AudioWAV/1003_WSI_NEU_XX.wav": ("crema-d:1003", "neutral", None, None),
}
CREMA_D_BAD: Mapping[str, str] = {
    "AudioWAV/1001_DFA_XYZ_XX.wav": "unknown code",  # emotion
    "AudioWAV/1001_DFA_ANG_ZZ.wav": "unknown code",  # intensity
    "AudioWAV/1001_QQQ_ANG_XX.wav": "unknown code",  # sentence
    "AudioWAV/1001-DFA-ANG-XX.wav": "bad name",
    "AudioWAV/readme.wav": "bad name",
}
#: VideoDemographics.csv content for the CREMA-D tree (actor 1003 deliberately absent).
CREMA_D_DEMOGRAPHICS = (
    "ActorID,Age,Sex,Race,Ethnicity\n1001,51,Male,Caucasian,Not Hispanic\n"
    "1002,21,Female,Caucasian,Not Hispanic\n"
)

SAVEE_GOOD: Mapping[str, tuple[str, str, str | None, str | None]] = {
    "DC_a01.wav": ("savee:DC", "angry", "male", None),
    "JE_sa03.wav": ("savee:JE", "sad", "male", None),
    "JK_su15.WAV": ("savee:JK", "surprised", "male", None),
    "KL/n30.wav": ("savee:KL", "neutral", "male", None),
    "KL/h02.flac": ("savee:KL", "happy", "male", None),
    "DC/f07.wav": ("savee:DC", "fearful", "male", None),
    "JE/d11.wav": ("savee:JE", "disgust", "male", None),
}
SAVEE_BAD: Mapping[str, str] = {
    "XX_a01.wav": "unknown speaker",
    "DC_x01.wav": "bad name",
    "DC_a1.wav": "bad name",
    "other/a01.wav": "unknown speaker",
}

EMODB_GOOD: Mapping[str, tuple[str, str, str | None, str | None]] = {
    "wav/03a01Fa.wav": ("emodb:03", "happy", "male", None),
    "wav/08a02Wb.wav": ("emodb:08", "angry", "female", None),
    "wav/09b01Ec.wav": ("emodb:09", "disgust", "female", None),
    "wav/10b03Ad.wav": ("emodb:10", "fearful", "male", None),
    "wav/13a05Ta.WAV": ("emodb:13", "sad", "female", None),
    "wav/16b10Nb.wav": ("emodb:16", "neutral", "female", None),
}
EMODB_BAD: Mapping[str, str] = {
    "wav/03a01La.wav": "label outside the label space",  # boredom
    "wav/03a01Xa.wav": "unknown code",
    "wav/99a01Wa.wav": "unknown speaker",
    "wav/03a1Wa.wav": "bad name",
}

#: ASED: name -> (speaker, label, gender after the majority rule, sentence). Speaker 09 has
#: two female files and one male file (decided: female); speaker 11 one of each (tie: the
#: first file's code, 01Neutral/... comes first: male). The capital S4 is read as sad.
ASED_GOOD: Mapping[str, tuple[str, str, str, int]] = {
    "01Neutral/n1-01-01-02-11.flac": ("ased:11", "neutral", "male", 1),
    "03Happy/h3-02-01-01-11.flac": ("ased:11", "happy", "male", 2),
    "02Fearful/f2-01-01-01-09.wav": ("ased:09", "fearful", "female", 1),
    "03Happy/h3-05-02-01-09.flac": ("ased:09", "happy", "female", 5),
    "05Angry/a5-07-01-02-09.flac": ("ased:09", "angry", "female", 7),
    "04Sad/S4-04-02-01-29.flac": ("ased:29", "sad", "female", 4),
    "05Angry/a5-03-01-02-50.FLAC": ("ased:50", "angry", "male", 3),
}
ASED_BAD: Mapping[str, str] = {
    "05Angry/x9-01-01-02-50.flac": "unknown emotion",  # unknown letter
    "01Neutral/n2-01-01-02-50.flac": "unknown emotion",  # letter and number disagree
    "03Happy/a5-01-01-02-50.flac": "name and folder disagree",
    "04Sad/s4-09-01-02-50.flac": "unknown code",  # sentence 09
    "04Sad/s4-01-01-03-50.flac": "unknown code",  # gender 03
    "04Sad/s4-01-01-02.flac": "bad name",
    "04Sad/notes.wav": "bad name",
}


def train_and_export_tiny(tmp_path: Path, *flags: str) -> tuple[int, Path, Path]:
    """`python -m training train ... --export` on six generated RAVDESS-like actors, one short epoch.

    Returns (exit code, the ONNX path, the run folder); ``flags`` add model options.
    """
    from training.__main__ import main

    data = tmp_path / "data"
    make_ravdess_like(data / "ravdess", actors=range(1, 7), n_per=1, seconds=0.6)
    path, run = tmp_path / "m.onnx", tmp_path / "final"
    rc = main(["train", "--data", str(data), "--corpora", "ravdess", "--out", str(run), "--cache", str(data / "cache"),
               "--epochs", "1", "--steps-per-epoch", "2", "--crop-s", "0.5", "--threads", "1", *flags,
               "--export", str(path), "--temperature", "1.2", "--version", "0.0.0-test"])
    return rc, path, run
