"""Corpus readers on generated file trees: good names, bad names, skip reasons, bad audio."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from serstream.contract import LABELS
from tests.training.synthcorpus import (
    CREMA_D_BAD,
    CREMA_D_DEMOGRAPHICS,
    CREMA_D_GOOD,
    EMODB_BAD,
    EMODB_GOOD,
    SAVEE_BAD,
    SAVEE_GOOD,
    make_ravdess_like,
    make_tess_like,
    write_named_tree,
)
from training.datasets import (
    DatasetError,
    Utterance,
    load_audio,
    read_crema_d,
    read_emodb,
    read_ravdess,
    read_savee,
    read_tess,
    scan_corpora,
)


def _by_name(scan) -> dict[str, Utterance]:
    return {u.path.name: u for u in scan.utterances}


def _skip_reasons(scan) -> dict[str, str]:
    return {path.name: reason for path, reason in scan.skipped}


def test_ravdess_reads_every_take_with_speaker_gender_and_intensity(tmp_path: Path) -> None:
    root = make_ravdess_like(tmp_path / "ravdess", actors=(1, 2), n_per=2, seconds=0.1)
    scan = read_ravdess(root, check_audio=True)
    assert len(scan.utterances) == 2 * 8 * 2 and scan.skipped == []
    assert {u.label for u in scan.utterances} == set(LABELS)
    odd = [u for u in scan.utterances if u.speaker == "ravdess:01"]
    even = [u for u in scan.utterances if u.speaker == "ravdess:02"]
    assert {u.gender for u in odd} == {"male"} and {u.gender for u in even} == {"female"}
    assert {u.intensity for u in scan.utterances if u.label == "neutral"} == {"normal"}
    assert {u.intensity for u in scan.utterances if u.label == "angry"} == {"normal", "strong"}
    assert scan.label_counts()["neutral"] == 4


def test_ravdess_skips_song_video_and_bad_codes_with_reasons(tmp_path: Path) -> None:
    names = {
        "Actor_01/03-01-05-02-01-01-01.WAV": None,  # good, upper-case suffix
        "Actor_01/01-01-03-01-02-02-01.flac": None,  # audio-visual speech: good
        "Actor_01/03-02-05-01-01-01-01.wav": "song",
        "Actor_01/02-01-05-01-01-01-01.wav": "video only",
        "Actor_01/03-01-09-01-01-01-01.wav": "unknown code",
        "Actor_01/03-01-05-03-01-01-01.wav": "unknown code",
        "Actor_01/03-01-05-01-01-01-25.wav": "unknown code",
        "Actor_01/03-01-05-01-01-01.wav": "bad name",
        "Actor_01/notes.wav": "bad name",
    }
    write_named_tree(tmp_path, names)
    (tmp_path / "Actor_01" / "README.txt").write_text("not audio")
    scan = read_ravdess(tmp_path)
    assert len(scan.utterances) == 2
    reasons = _skip_reasons(scan)
    assert len(reasons) == 7
    for name, reason in names.items():
        if reason is not None:
            assert reasons[Path(name).name].startswith(reason), (name, reasons[Path(name).name])
    good = _by_name(scan)["03-01-05-02-01-01-01.WAV"]
    assert (good.label, good.intensity, good.text) == ("angry", "strong", "Kids are talking by the door")


def test_tess_reads_names_and_folders(tmp_path: Path) -> None:
    root = make_tess_like(tmp_path / "tess", seconds=0.1)
    scan = read_tess(root, check_audio=True)
    assert len(scan.utterances) == 2 * 7 * 2 and scan.skipped == []
    assert scan.speakers() == ["tess:OAF", "tess:YAF"]
    assert {u.gender for u in scan.utterances} == {"female"}
    counts = scan.label_counts()
    assert counts["calm"] == 0 and counts["surprised"] == 4 and counts["fearful"] == 4
    ps = _by_name(scan)["OAF_back_ps.flac"]
    assert (ps.label, ps.text, ps.intensity) == ("surprised", "Say the word back", None)


def test_tess_word_only_files_and_bad_names(tmp_path: Path) -> None:
    names = [
        "YAF_pleasant_surprised/youth.wav",  # label from the folder
        "OAF_Fear/OAF_dog_fear.wav",  # folder case ignored
        "YAF_sad/YAF_dog_happy.wav",  # name and folder disagree
        "OAF_angry/ZZZ_dog_angry.wav",  # unknown speaker: the folder does not overrule the name
        "misc/OAF_dog_bored.wav",  # unknown emotion
    ]
    write_named_tree(tmp_path, names)
    scan = read_tess(tmp_path)
    labels = {u.path.name: u.label for u in scan.utterances}
    assert labels == {"youth.wav": "surprised", "OAF_dog_fear.wav": "fearful"}
    reasons = _skip_reasons(scan)
    assert reasons["YAF_dog_happy.wav"].startswith("name and folder disagree")
    assert reasons["OAF_dog_bored.wav"].startswith("unknown emotion")
    assert reasons["ZZZ_dog_angry.wav"].startswith("unknown speaker")
    assert len(scan.skipped) == 3


def test_crema_d_with_demographics(tmp_path: Path) -> None:
    write_named_tree(tmp_path, [*CREMA_D_GOOD, *CREMA_D_BAD])
    (tmp_path / "VideoDemographics.csv").write_text(CREMA_D_DEMOGRAPHICS)
    scan = read_crema_d(tmp_path)
    found = {
        f"AudioWAV/{u.path.name}": (u.speaker, u.label, u.gender, u.intensity)
        for u in scan.utterances
    }
    assert found == dict(CREMA_D_GOOD)
    reasons = _skip_reasons(scan)
    assert len(reasons) == len(CREMA_D_BAD)
    for name, reason in CREMA_D_BAD.items():
        assert reasons[Path(name).name].startswith(reason)
    assert _by_name(scan)["1001_DFA_ANG_XX.wav"].text == "Don't forget a jacket"


def test_crema_d_without_demographics_has_no_gender(tmp_path: Path) -> None:
    write_named_tree(tmp_path, CREMA_D_GOOD)
    scan = read_crema_d(tmp_path)
    assert len(scan.utterances) == len(CREMA_D_GOOD)
    assert {u.gender for u in scan.utterances} == {None}


def test_crema_d_malformed_demographics_is_a_clear_error(tmp_path: Path) -> None:
    write_named_tree(tmp_path, CREMA_D_GOOD)
    (tmp_path / "VideoDemographics.csv").write_text("id,whatever\n1001,x\n")
    with pytest.raises(DatasetError, match="VideoDemographics.csv"):
        read_crema_d(tmp_path)


@pytest.mark.parametrize(
    ("reader", "good", "bad"),
    [(read_savee, SAVEE_GOOD, SAVEE_BAD), (read_emodb, EMODB_GOOD, EMODB_BAD)],
    ids=["savee", "emodb"],
)
def test_savee_and_emodb_names(tmp_path: Path, reader, good, bad) -> None:
    write_named_tree(tmp_path, [*good, *bad])
    scan = reader(tmp_path)
    found = {
        str(u.path.relative_to(tmp_path)): (u.speaker, u.label, u.gender, u.intensity)
        for u in scan.utterances
    }
    assert found == dict(good)
    reasons = {str(p.relative_to(tmp_path)): r for p, r in scan.skipped}
    assert set(reasons) == set(bad)
    for name, reason in bad.items():
        assert reasons[name].startswith(reason), (name, reasons[name])


def test_unreadable_and_too_short_audio_are_skipped_only_when_checking(tmp_path: Path) -> None:
    root = make_ravdess_like(
        tmp_path / "ravdess", actors=(3,), emotions=("sad",), n_per=1, seconds=0.2
    )
    folder = root / "Actor_03"
    (folder / "03-01-04-01-02-01-03.wav").write_bytes(b"RIFF....not a wave file")
    sf.write(str(folder / "03-01-04-01-01-02-03.wav"), np.zeros(10, dtype=np.float32), 16000)
    unchecked = read_ravdess(root)
    assert len(unchecked.utterances) == 3
    checked = read_ravdess(root, check_audio=True)
    assert len(checked.utterances) == 1
    reasons = _skip_reasons(checked)
    assert reasons["03-01-04-01-02-01-03.wav"].startswith("unreadable audio")
    assert reasons["03-01-04-01-01-02-03.wav"].startswith("too short")
    assert "skipped 2 files" in checked.summary()


def test_scan_corpora_merges_and_reports(tmp_path: Path) -> None:
    make_ravdess_like(tmp_path / "ravdess", actors=(1, 2), n_per=1, seconds=0.1)
    make_tess_like(tmp_path / "tess", seconds=0.1)
    scan = scan_corpora(tmp_path)
    assert len(scan.utterances) == 2 * 8 + 2 * 7 * 2
    assert len({u.speaker for u in scan.utterances}) == 4
    summary = scan.summary()
    assert "ravdess: 16 utterances, 2 speakers" in summary and "tess: 28 utterances, 2 speakers" in summary


def test_scan_corpora_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as missing_root:
        scan_corpora(tmp_path / "nowhere")
    with pytest.raises(DatasetError) as missing_corpus:
        scan_corpora(tmp_path, ("tess",))
    write_named_tree(tmp_path / "tess", ["junk.wav"])
    with pytest.raises(DatasetError) as empty:
        scan_corpora(tmp_path, ("tess",))
    with pytest.raises(DatasetError) as unknown:
        scan_corpora(tmp_path, ("iemocap",))
    for error in (missing_root, missing_corpus, empty, unknown):
        assert "\n" not in str(error.value)
    assert "no recognisable audio files" in str(empty.value) and "junk.wav" in str(empty.value)
    assert "does not exist" in str(missing_corpus.value)


def test_load_audio_resamples_to_16k_mono(tmp_path: Path) -> None:
    t = np.arange(44100) / 44100
    tone = 0.5 * np.sin(2 * np.pi * 440 * t)
    stereo = np.stack([tone, tone], axis=1)
    path = tmp_path / "tone.wav"
    sf.write(str(path), stereo, 44100)
    audio = load_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(audio.size - 16000) <= 1
    spectrum = np.abs(np.fft.rfft(audio))
    assert abs(np.argmax(spectrum) * 16000 / audio.size - 440) < 2


def test_load_audio_unreadable_is_a_dataset_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.flac"
    bad.write_bytes(b"fLaC garbage")
    with pytest.raises(DatasetError, match="cannot read audio"):
        load_audio(bad)


def test_utterance_rejects_labels_outside_the_label_space() -> None:
    with pytest.raises(ValueError, match="boredom"):
        Utterance(path=Path("x.wav"), corpus="emodb", speaker="emodb:03", label="boredom")
