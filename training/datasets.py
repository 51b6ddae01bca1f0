"""Corpus readers: emotional speech corpora found by their standard file naming.

Each reader walks a corpus folder, parses every ``.wav``/``.flac`` name (any
case) and returns a :class:`CorpusScan`: the utterances it understood, mapped
onto serstream's label space (:data:`serstream.contract.LABELS`), and every file
it skipped with the reason (bad name, unknown code, a label the label space has
no place for, unreadable or too-short audio). Nothing is dropped silently.

Readers: RAVDESS (``MM-VV-EE-II-SS-RR-AA``), TESS (``OAF_back_angry``),
ASED (``a5-03-01-02-50``), CREMA-D (``1001_DFA_ANG_XX``), SAVEE (``DC_a01`` or
``DC/a01``) and EmoDB (``03a01Fa``). Files a reader accepts but finds odd (an
upper-case ASED code, a speaker with two gender codes) are listed as
``anomalies`` with what was decided. :func:`scan_corpora` finds each corpus in its subfolder of a data
root; :func:`load_audio` reads one file as 16 kHz mono float32.
"""

from __future__ import annotations

import csv
import os
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import soundfile as sf
import soxr

from serstream.contract import LABELS, SAMPLE_RATE
from serstream.errors import one_line

__all__ = [
    "AUDIO_SUFFIXES",
    "CORPUS_FOLDERS",
    "MIN_DURATION_S",
    "CorpusScan",
    "canonical_corpus_name",
    "DatasetError",
    "Utterance",
    "load_audio",
    "read_ased",
    "read_crema_d",
    "read_emodb",
    "read_ravdess",
    "read_savee",
    "read_tess",
    "scan_corpora",
    "utterances_by_speaker",
]

AUDIO_SUFFIXES = frozenset({".wav", ".flac"})

#: Shortest clip worth keeping: one 25 ms analysis frame. Anything shorter has no
#: feature frame at all, so it is skipped (with the reason) rather than padded.
MIN_DURATION_S = 0.025

#: Corpus name -> its folder under the data root.
CORPUS_FOLDERS: Mapping[str, str] = {
    "ravdess": "ravdess",
    "tess": "tess",
    "ased": "ased",
    "crema-d": "crema-d",
    "savee": "savee",
    "emodb": "emodb",
}

_NAME_ALIASES = {"crema_d": "crema-d", "cremad": "crema-d", "emo-db": "emodb", "emo_db": "emodb"}

GENDERS = ("female", "male")
INTENSITIES = ("normal", "strong")


class DatasetError(Exception):
    """A corpus cannot be read; the message is one line meant for the user."""


@dataclass(frozen=True)
class Utterance:
    """One labelled recording.

    ``speaker`` is unique across corpora (``"ravdess:01"``, ``"tess:OAF"``), so
    folds can be built over speakers of every corpus at once.
    """

    path: Path
    corpus: str
    speaker: str
    label: str
    gender: str | None = None
    intensity: str | None = None
    text: str | None = None
    #: ASED: the sentence number SS (1-7, numbered within each emotion), and
    #: whether it is one of the two common sentences (SS 01-02) read in all five
    #: emotions, where only the voice carries the emotion. None elsewhere.
    sentence: int | None = None
    common: bool | None = None

    def __post_init__(self) -> None:
        if self.label not in LABELS:
            raise ValueError(f"label {self.label!r} is not one of {LABELS}")
        if self.gender not in (None, *GENDERS):
            raise ValueError(f"gender {self.gender!r} is not one of {GENDERS} or None")
        if self.intensity not in (None, *INTENSITIES):
            raise ValueError(f"intensity {self.intensity!r} is not one of {INTENSITIES} or None")


@dataclass
class CorpusScan:
    """What a reader found: utterances, and each skipped file with its reason."""

    utterances: list[Utterance] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    #: Files kept although something about them is odd, each with the decision taken.
    anomalies: list[str] = field(default_factory=list)

    def extend(self, other: CorpusScan) -> None:
        self.utterances.extend(other.utterances)
        self.skipped.extend(other.skipped)
        self.anomalies.extend(other.anomalies)

    def label_counts(self) -> dict[str, int]:
        counts = Counter(u.label for u in self.utterances)
        return {label: counts.get(label, 0) for label in LABELS}

    def speakers(self) -> list[str]:
        return sorted({u.speaker for u in self.utterances})

    def skip_reasons(self) -> dict[str, int]:
        """Skipped files counted by reason (the part of the reason before any ':')."""
        return dict(Counter(reason.split(":")[0] for _, reason in self.skipped))

    def summary(self) -> str:
        """One line per corpus: utterances, speakers and skipped files by reason."""
        lines = []
        by_corpus: dict[str, list[Utterance]] = {}
        for u in self.utterances:
            by_corpus.setdefault(u.corpus, []).append(u)
        for corpus, utts in sorted(by_corpus.items()):
            n_speakers = len({u.speaker for u in utts})
            lines.append(f"{corpus}: {len(utts)} utterances, {n_speakers} speakers")
        if self.skipped:
            reasons = ", ".join(f"{n} {r}" for r, n in sorted(self.skip_reasons().items()))
            lines.append(f"skipped {len(self.skipped)} files ({reasons})")
        if self.anomalies:
            lines.append(f"{len(self.anomalies)} anomalies kept with a decision (listed by details())")
        return "\n".join(lines) if lines else "no utterances"

    def details(self, limit: int = 50) -> str:
        """Every skipped file with its reason and every anomaly, one per line (at most ``limit`` each)."""
        lines = []
        for path, reason in self.skipped[:limit]:
            lines.append(f"skipped {path.parent.name}/{path.name}: {reason}")
        if len(self.skipped) > limit:
            lines.append(f"... and {len(self.skipped) - limit} more skipped files")
        for note in self.anomalies[:limit]:
            lines.append(f"anomaly: {note}")
        if len(self.anomalies) > limit:
            lines.append(f"... and {len(self.anomalies) - limit} more anomalies")
        return "\n".join(lines)


class _Skip(Exception):
    """Raised by a name parser: the file is skipped with this reason."""


# A parser turns (path relative to the corpus root) into the utterance fields.
_Parser = Callable[[Path, Path], Utterance]


def _audio_files(root: Path) -> Iterator[Path]:
    """Every .wav/.flac under ``root`` (any case), in a stable order."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if Path(name).suffix.lower() in AUDIO_SUFFIXES:
                yield Path(dirpath) / name


def _check_audio(path: Path, min_duration_s: float) -> None:
    try:
        info = sf.info(str(path))
    except Exception as exc:  # soundfile raises several types for corrupt headers
        raise _Skip(f"unreadable audio: {one_line(exc, first_line=True, limit=None)}") from None
    if info.frames <= 0 or info.samplerate <= 0:
        raise _Skip("unreadable audio: no samples")
    duration = info.frames / info.samplerate
    if duration < min_duration_s:
        raise _Skip(f"too short: {duration * 1000:.1f} ms < {min_duration_s * 1000:.0f} ms")


def _scan(
    root: Path | str, corpus: str, parse: _Parser, check_audio: bool, min_duration_s: float
) -> CorpusScan:
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{corpus}: corpus folder {root} does not exist or is not a folder")
    scan = CorpusScan()
    for path in _audio_files(root):
        try:
            utterance = parse(path, root)
            if check_audio:
                _check_audio(path, min_duration_s)
        except _Skip as skip:
            scan.skipped.append((path, str(skip)))
            continue
        scan.utterances.append(utterance)
    return scan


# --------------------------------------------------------------------------- RAVDESS

_RAVDESS_NAME = re.compile(r"^(\d{2})-(\d{2})-(\d{2})-(\d{2})-(\d{2})-(\d{2})-(\d{2})$")
_RAVDESS_EMOTIONS = {f"{i + 1:02d}": label for i, label in enumerate(LABELS)}
_RAVDESS_INTENSITY = {"01": "normal", "02": "strong"}
_RAVDESS_TEXT = {"01": "Kids are talking by the door", "02": "Dogs are sitting by the door"}


def _parse_ravdess(path: Path, root: Path) -> Utterance:
    match = _RAVDESS_NAME.match(path.stem)
    if not match:
        raise _Skip("bad name: expected MM-VV-EE-II-SS-RR-AA")
    modality, channel, emotion, intensity, statement, repetition, actor = match.groups()
    if modality == "02":
        raise _Skip("video only: modality 02 has no audio")
    if modality not in ("01", "03"):
        raise _Skip(f"unknown code: modality {modality}")
    if channel == "02":
        raise _Skip("song: vocal channel 02 is song, not speech")
    if channel != "01":
        raise _Skip(f"unknown code: vocal channel {channel}")
    if emotion not in _RAVDESS_EMOTIONS:
        raise _Skip(f"unknown code: emotion {emotion}")
    if intensity not in _RAVDESS_INTENSITY:
        raise _Skip(f"unknown code: intensity {intensity}")
    if statement not in _RAVDESS_TEXT:
        raise _Skip(f"unknown code: statement {statement}")
    if repetition not in ("01", "02"):
        raise _Skip(f"unknown code: repetition {repetition}")
    actor_id = int(actor)
    if not 1 <= actor_id <= 24:
        raise _Skip(f"unknown code: actor {actor}")
    return Utterance(
        path=path,
        corpus="ravdess",
        speaker=f"ravdess:{actor}",
        label=_RAVDESS_EMOTIONS[emotion],
        gender="male" if actor_id % 2 == 1 else "female",
        intensity=_RAVDESS_INTENSITY[intensity],
        text=_RAVDESS_TEXT[statement],
    )


def read_ravdess(
    root: Path | str, check_audio: bool = False, min_duration_s: float = MIN_DURATION_S
) -> CorpusScan:
    """RAVDESS speech (``03-01-06-01-02-01-12``): 24 actors, odd id = male.

    Audio-only (03) and audio-visual (01) files are read; song (vocal channel
    02) and video-only (modality 02) files are skipped with the reason.
    """
    return _scan(root, "ravdess", _parse_ravdess, check_audio, min_duration_s)


# --------------------------------------------------------------------------- TESS

_TESS_SPEAKERS = {"OAF": "OAF", "YAF": "YAF", "OA": "OAF", "YA": "YAF"}
_TESS_EMOTIONS = {
    "angry": "angry",
    "anger": "angry",
    "disgust": "disgust",
    "disgusted": "disgust",
    "fear": "fearful",
    "fearful": "fearful",
    "happy": "happy",
    "happiness": "happy",
    "neutral": "neutral",
    "sad": "sad",
    "sadness": "sad",
    "ps": "surprised",
    "pleasant_surprise": "surprised",
    "pleasant_surprised": "surprised",
    "surprise": "surprised",
    "surprised": "surprised",
}


def _tess_emotion(tokens: list[str]) -> tuple[str, int] | None:
    """(label, number of trailing tokens it used) for a name split on '_'."""
    if len(tokens) >= 2 and "_".join(tokens[-2:]) in _TESS_EMOTIONS:
        return _TESS_EMOTIONS["_".join(tokens[-2:])], 2
    if tokens and tokens[-1] in _TESS_EMOTIONS:
        return _TESS_EMOTIONS[tokens[-1]], 1
    return None


def _parse_tess(path: Path, root: Path) -> Utterance:
    tokens = path.stem.lower().split("_")
    folder_tokens = path.parent.name.lower().split("_")
    folder_speaker = _TESS_SPEAKERS.get(folder_tokens[0].upper())
    from_folder = _tess_emotion(folder_tokens[1:]) if folder_speaker else None

    if len(tokens) == 1:
        # A file named by the word alone inside a <SPEAKER>_<emotion>/ folder.
        if from_folder is None or folder_speaker is None:
            raise _Skip("bad name: a bare word needs a <SPEAKER>_<emotion> folder")
        speaker, label, word = folder_speaker, from_folder[0], tokens[0]
    else:
        named_speaker = _TESS_SPEAKERS.get(tokens[0].upper())
        if named_speaker is None:
            raise _Skip(f"unknown speaker: {tokens[0].upper()!r} (TESS has OAF and YAF)")
        speaker = named_speaker
        from_name = _tess_emotion(tokens[1:])
        if from_name is None:
            raise _Skip(f"unknown emotion: {tokens[-1]!r}")
        label, used = from_name
        word = "_".join(tokens[1 : len(tokens) - used])
        if not word:
            raise _Skip("bad name: expected <SPEAKER>_<word>_<emotion>")
        if from_folder is not None and (from_folder[0] != label or folder_speaker != speaker):
            raise _Skip(
                f"name and folder disagree: file says {speaker}/{label}, "
                f"folder {path.parent.name} says {folder_speaker}/{from_folder[0]}"
            )
    return Utterance(
        path=path,
        corpus="tess",
        speaker=f"tess:{speaker}",
        label=label,
        gender="female",
        intensity=None,
        text=f"Say the word {word}",
    )


def read_tess(
    root: Path | str, check_audio: bool = False, min_duration_s: float = MIN_DURATION_S
) -> CorpusScan:
    """TESS (``OAF_back_angry``, ``YAF_back_ps``): two female speakers, OAF and YAF.

    Emotion comes from the file name, or from a ``<SPEAKER>_<emotion>`` folder
    when files are named by the word alone; ``ps``/``pleasant_surprise`` is
    surprised and ``fear`` is fearful. TESS has no calm.
    """
    return _scan(root, "tess", _parse_tess, check_audio, min_duration_s)


# --------------------------------------------------------------------------- ASED

_ASED_NAME = re.compile(r"^([A-Za-z])(\d)-(\d{2})-(\d{2})-(\d{2})-(\d{2})$")
#: Emotion letter + folder number -> label (n1 neutral ... a5 angry).
_ASED_EMOTIONS = {"n1": "neutral", "f2": "fearful", "h3": "happy", "s4": "sad", "a5": "angry"}
_ASED_GENDERS = {"01": "female", "02": "male"}
_ASED_FOLDER = re.compile(r"^0?([1-9])[A-Za-z]+$")
#: Sentences read in all five emotions (the others fix the emotion by their words).
ASED_COMMON_SENTENCES = frozenset({1, 2})


def _parse_ased(path: Path, root: Path) -> Utterance:
    match = _ASED_NAME.match(path.stem)
    if not match:
        raise _Skip("bad name: expected xN-SS-RR-GG-PP (e.g. a5-03-01-02-50)")
    letter, number, sentence, repetition, gender, speaker = match.groups()
    code = f"{letter.lower()}{number}"
    if code not in _ASED_EMOTIONS:
        raise _Skip(f"unknown emotion: {letter}{number!s} (ASED has n1, f2, h3, s4, a5)")
    folder = _ASED_FOLDER.match(path.parent.name)
    if folder is not None and folder.group(1) != number:
        raise _Skip(f"name and folder disagree: {code} in folder {path.parent.name}")
    if not 1 <= int(sentence) <= 7:
        raise _Skip(f"unknown code: sentence {sentence}")
    if int(repetition) < 1:
        raise _Skip(f"unknown code: repetition {repetition}")
    if gender not in _ASED_GENDERS:
        raise _Skip(f"unknown code: gender {gender}")
    if int(speaker) < 1:
        raise _Skip(f"unknown code: speaker {speaker}")
    return Utterance(
        path=path,
        corpus="ased",
        speaker=f"ased:{speaker}",
        label=_ASED_EMOTIONS[code],
        gender=_ASED_GENDERS[gender],
        intensity=None,
        text=None,
        sentence=int(sentence),
        common=int(sentence) in ASED_COMMON_SENTENCES,
    )


def _resolve_ased_genders(scan: CorpusScan) -> None:
    """One gender per speaker: the majority of their files' GG codes, the first file's on a tie.

    ASED's speakers 09, 15, 21, 23 and 25 carry both codes in different files;
    a speaker has one voice, so every file of theirs gets the decided gender and
    each such speaker is listed as an anomaly with the counts.
    """
    codes: dict[str, list[str]] = {}
    for u in scan.utterances:
        codes.setdefault(u.speaker, []).append(u.gender or "")
    decided: dict[str, str] = {}
    for speaker, genders in codes.items():
        counts = Counter(genders)
        if len(counts) == 1:
            continue
        top = max(counts.values())
        winner = next(g for g in genders if counts[g] == top)  # first in file order among the most common
        decided[speaker] = winner
        how = "majority" if list(counts.values()).count(top) == 1 else "tie: first file's code"
        tally = ", ".join(f"{g} {n}" for g, n in sorted(counts.items()))
        scan.anomalies.append(f"{speaker} carries both gender codes ({tally} files): taken as {winner} ({how})")
    if decided:
        scan.utterances = [replace(u, gender=decided[u.speaker]) if u.speaker in decided else u
                           for u in scan.utterances]


def read_ased(
    root: Path | str, check_audio: bool = True, min_duration_s: float = MIN_DURATION_S
) -> CorpusScan:
    """ASED, the Amharic Speech Emotion Dataset (``a5-03-01-02-50``): 65 speakers, five emotions.

    Reads ``{01Neutral,...,05Angry}/xN-SS-RR-GG-PP`` in .flac or the original
    .wav. The emotion letter is read in any case (the corpus has one
    ``S4-`` file; it is kept and listed as an anomaly); a letter/number pair that
    is not n1/f2/h3/s4/a5, or one that disagrees with its ``0N<Emotion>``
    folder, is skipped with the reason. A speaker's gender is the majority of
    their files' GG codes (see :func:`_resolve_ased_genders`). Audio is checked
    by default: a clip too short for one analysis frame is skipped and listed.
    ASED has no calm, disgust or surprised.
    """
    scan = _scan(root, "ased", _parse_ased, check_audio, min_duration_s)
    for u in scan.utterances:
        if u.path.stem[:1].isupper():
            scan.anomalies.append(f"{u.path.parent.name}/{u.path.name}: upper-case emotion letter, read as "
                                  f"{u.path.stem[:1].lower()}")
    _resolve_ased_genders(scan)
    return scan


# --------------------------------------------------------------------------- CREMA-D

_CREMA_NAME = re.compile(r"^(\d{4})_([A-Za-z]{3})_([A-Za-z]{3})_([A-Za-z]{2})$")
_CREMA_EMOTIONS = {
    "ANG": "angry",
    "DIS": "disgust",
    "FEA": "fearful",
    "HAP": "happy",
    "NEU": "neutral",
    "SAD": "sad",
}
# Low and medium intensity both count as "normal"; only high is "strong";
# XX means the intensity was not specified.
_CREMA_INTENSITY = {"LO": "normal", "MD": "normal", "HI": "strong", "XX": None}
_CREMA_SENTENCES = {
    "IEO": "It's eleven o'clock",
    "TIE": "That is exactly what happened",
    "IOM": "I'm on my way to the meeting",
    "IWW": "I wonder what this is about",
    "TAI": "The airplane is almost full",
    "MTI": "Maybe tomorrow it will be cold",
    "IWL": "I would like a new alarm clock",
    "ITH": "I think I have a doctor's appointment",
    "DFA": "Don't forget a jacket",
    "ITS": "I think I've seen this before",
    "TSI": "The surface is slick",
    "WSI": "We'll stop in a couple of minutes",
}
CREMA_DEMOGRAPHICS = "VideoDemographics.csv"


def _read_crema_genders(path: Path) -> dict[str, str]:
    """ActorID -> 'female'/'male' from CREMA-D's VideoDemographics.csv."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"crema-d: cannot read {path}: {one_line(exc, first_line=True, limit=None)}") from None
    genders: dict[str, str] = {}
    for row in rows:
        actor = (row.get("ActorID") or "").strip()
        sex = (row.get("Sex") or "").strip().lower()
        if actor and sex in GENDERS:
            genders[actor] = sex
    if rows and not genders:
        raise DatasetError(f"crema-d: {path} has no ActorID/Sex columns with Male/Female values")
    return genders


def _find_crema_demographics(root: Path) -> Path | None:
    """The demographics CSV beside the audio: in the root or any folder below it."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            if name.lower() == CREMA_DEMOGRAPHICS.lower():
                return Path(dirpath) / name
    return None


def read_crema_d(
    root: Path | str, check_audio: bool = False, min_duration_s: float = MIN_DURATION_S
) -> CorpusScan:
    """CREMA-D (``1001_DFA_ANG_XX``): 91 actors, six emotions, no calm or surprised.

    Intensity LO/MD -> normal, HI -> strong, XX -> None. Gender comes from
    ``VideoDemographics.csv`` when it lies in the corpus folder, else None.
    """
    root_path = Path(root)
    csv_path = _find_crema_demographics(root_path) if root_path.is_dir() else None
    genders = _read_crema_genders(csv_path) if csv_path is not None else {}

    def parse(path: Path, _root: Path) -> Utterance:
        match = _CREMA_NAME.match(path.stem)
        if not match:
            raise _Skip("bad name: expected <actor>_<sentence>_<emotion>_<intensity>")
        actor, sentence, emotion, intensity = (g.upper() for g in match.groups())
        if emotion not in _CREMA_EMOTIONS:
            raise _Skip(f"unknown code: emotion {emotion}")
        if intensity not in _CREMA_INTENSITY:
            raise _Skip(f"unknown code: intensity {intensity}")
        if sentence not in _CREMA_SENTENCES:
            raise _Skip(f"unknown code: sentence {sentence}")
        return Utterance(
            path=path,
            corpus="crema-d",
            speaker=f"crema-d:{actor}",
            label=_CREMA_EMOTIONS[emotion],
            gender=genders.get(actor),
            intensity=_CREMA_INTENSITY[intensity],
            text=_CREMA_SENTENCES[sentence],
        )

    return _scan(root_path, "crema-d", parse, check_audio, min_duration_s)


# --------------------------------------------------------------------------- SAVEE

_SAVEE_SPEAKERS = ("DC", "JE", "JK", "KL")
_SAVEE_NAME = re.compile(r"^(?:([A-Za-z]{2})_)?(sa|su|a|d|f|h|n)(\d{2})$", re.IGNORECASE)
_SAVEE_EMOTIONS = {
    "a": "angry",
    "d": "disgust",
    "f": "fearful",
    "h": "happy",
    "n": "neutral",
    "sa": "sad",
    "su": "surprised",
}


def _parse_savee(path: Path, root: Path) -> Utterance:
    match = _SAVEE_NAME.match(path.stem)
    if not match:
        raise _Skip("bad name: expected <SPEAKER>_<emotion><NN> or <SPEAKER>/<emotion><NN>")
    speaker, emotion, _number = match.groups()
    if speaker is None:
        speaker = path.parent.name
    speaker = speaker.upper()
    if speaker not in _SAVEE_SPEAKERS:
        raise _Skip(f"unknown speaker: {speaker!r} (SAVEE has DC, JE, JK, KL)")
    return Utterance(
        path=path,
        corpus="savee",
        speaker=f"savee:{speaker}",
        label=_SAVEE_EMOTIONS[emotion.lower()],
        gender="male",
        intensity=None,
        text=None,
    )


def read_savee(
    root: Path | str, check_audio: bool = False, min_duration_s: float = MIN_DURATION_S
) -> CorpusScan:
    """SAVEE (``DC_a01`` or ``DC/a01``): four male speakers, seven emotions, no calm."""
    return _scan(root, "savee", _parse_savee, check_audio, min_duration_s)


# --------------------------------------------------------------------------- EmoDB

_EMODB_NAME = re.compile(r"^(\d{2})([ab]\d{2})([A-Za-z])([A-Za-z])$")
_EMODB_EMOTIONS = {
    "W": "angry",  # Wut
    "E": "disgust",  # Ekel
    "A": "fearful",  # Angst
    "F": "happy",  # Freude
    "T": "sad",  # Trauer
    "N": "neutral",
}
_EMODB_OUTSIDE = {"L": "boredom"}  # Langeweile
# From the corpus documentation (Burkhardt et al. 2005).
_EMODB_GENDERS = {
    **{speaker: "male" for speaker in ("03", "10", "11", "12", "15")},
    **{speaker: "female" for speaker in ("08", "09", "13", "14", "16")},
}


def _parse_emodb(path: Path, root: Path) -> Utterance:
    match = _EMODB_NAME.match(path.stem)
    if not match:
        raise _Skip("bad name: expected <speaker NN><text a01..b10><emotion><version>")
    speaker, _text, emotion, _version = match.groups()
    emotion = emotion.upper()
    if emotion in _EMODB_OUTSIDE:
        raise _Skip(f"label outside the label space: {_EMODB_OUTSIDE[emotion]} ({emotion})")
    if emotion not in _EMODB_EMOTIONS:
        raise _Skip(f"unknown code: emotion {emotion}")
    if speaker not in _EMODB_GENDERS:
        raise _Skip(f"unknown speaker: {speaker}")
    return Utterance(
        path=path,
        corpus="emodb",
        speaker=f"emodb:{speaker}",
        label=_EMODB_EMOTIONS[emotion],
        gender=_EMODB_GENDERS[speaker],
        intensity=None,
        text=None,
    )


def read_emodb(
    root: Path | str, check_audio: bool = False, min_duration_s: float = MIN_DURATION_S
) -> CorpusScan:
    """EmoDB (``03a01Fa``): ten German speakers; boredom (L) is skipped with the reason."""
    return _scan(root, "emodb", _parse_emodb, check_audio, min_duration_s)


# --------------------------------------------------------------------------- all corpora

_READERS: Mapping[str, Callable[..., CorpusScan]] = {
    "ravdess": read_ravdess,
    "tess": read_tess,
    "ased": read_ased,
    "crema-d": read_crema_d,
    "savee": read_savee,
    "emodb": read_emodb,
}


def canonical_corpus_name(name: str) -> str:
    """'CREMA_D' -> 'crema-d'; raises DatasetError for a corpus with no reader."""
    key = name.strip().lower()
    key = _NAME_ALIASES.get(key, key)
    if key not in _READERS:
        raise DatasetError(f"unknown corpus {name!r}; known: {', '.join(_READERS)}")
    return key


def scan_corpora(
    data_root: Path | str,
    names: Iterable[str] = ("ravdess", "tess"),
    check_audio: bool | None = None,
    min_duration_s: float = MIN_DURATION_S,
) -> CorpusScan:
    """Read each named corpus from its subfolder of ``data_root`` (see CORPUS_FOLDERS).

    ``check_audio`` None leaves it to each reader's default (ASED checks its
    clips' durations, the others do not unless asked).

    Raises DatasetError (one line) when a corpus folder is missing or holds no
    recognisable files. The result merges all corpora; ``summary()`` describes it.
    """
    data_root = Path(data_root)
    if not data_root.is_dir():
        raise DatasetError(f"data folder {data_root} does not exist or is not a folder")
    merged = CorpusScan()
    for name in names:
        corpus = canonical_corpus_name(name)
        folder = data_root / CORPUS_FOLDERS[corpus]
        if not folder.is_dir():
            raise DatasetError(f"{corpus}: expected its files in {folder}, which does not exist")
        kwargs = {"min_duration_s": min_duration_s} if check_audio is None else {
            "check_audio": check_audio, "min_duration_s": min_duration_s}
        scan = _READERS[corpus](folder, **kwargs)
        if not scan.utterances:
            detail = ""
            if scan.skipped:
                first_path, first_reason = scan.skipped[0]
                detail = f"; {len(scan.skipped)} skipped, e.g. {first_path.name}: {first_reason}"
            raise DatasetError(f"{corpus}: no recognisable audio files in {folder}{detail}")
        merged.extend(scan)
    return merged


def load_audio(path: Path | str, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Read a file as float32 mono at ``sample_rate`` (soxr when the rate differs).

    Raises DatasetError with a one-line message for unreadable or empty files.
    """
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises LibsndfileError, RuntimeError, OSError...
        raise DatasetError(f"cannot read audio {path}: {one_line(exc, first_line=True, limit=None)}") from None
    if data.shape[0] == 0:
        raise DatasetError(f"audio file {path} has no samples")
    mono = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    mono = np.nan_to_num(mono, nan=0.0, posinf=0.0, neginf=0.0)
    if rate != sample_rate:
        mono = soxr.resample(mono, rate, sample_rate, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


def utterances_by_speaker(utterances: Sequence[Utterance]) -> dict[str, list[Utterance]]:
    """Group utterances by speaker id, preserving order."""
    groups: dict[str, list[Utterance]] = {}
    for u in utterances:
        groups.setdefault(u.speaker, []).append(u)
    return groups
