"""ASED reader on generated trees: good names, bad names, the capital S4, two gender codes, too-short clips."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.training.synthcorpus import ASED_BAD, ASED_GOOD, make_ased_like, write_named_tree
from training.__main__ import main
from training.cache import build_cache
from training.datasets import DatasetError, read_ased, scan_corpora


def test_ased_reads_good_names_and_skips_bad_ones_with_reasons(tmp_path: Path) -> None:
    root = write_named_tree(tmp_path / "ased", [*ASED_GOOD, *ASED_BAD])
    scan = read_ased(root)
    got = {f"{u.path.parent.name}/{u.path.name}": u for u in scan.utterances}
    assert set(got) == set(ASED_GOOD)
    for name, (speaker, label, gender, sentence) in ASED_GOOD.items():
        u = got[name]
        assert (u.corpus, u.speaker, u.label, u.gender, u.sentence) == ("ased", speaker, label, gender, sentence), name
        assert u.common is (sentence in (1, 2)) and u.intensity is None
    reasons = {f"{p.parent.name}/{p.name}": r for p, r in scan.skipped}
    assert set(reasons) == set(ASED_BAD)
    for name, prefix in ASED_BAD.items():
        assert reasons[name].startswith(prefix), (name, reasons[name])
    assert scan.skip_reasons()["unknown emotion"] == 2


def test_two_gender_codes_and_capital_letter_are_listed_anomalies(tmp_path: Path) -> None:
    scan = read_ased(write_named_tree(tmp_path / "ased", ASED_GOOD))
    assert len(scan.anomalies) == 3
    text = "\n".join(scan.anomalies)
    assert "ased:09 carries both gender codes (female 2, male 1 files): taken as female (majority)" in text
    assert "ased:11 carries both gender codes (female 1, male 1 files): taken as male (tie: first file's code)" in text
    assert "04Sad/S4-04-02-01-29.flac: upper-case emotion letter" in text
    # every file of a speaker carries the decided gender, whatever its own code said
    assert {u.gender for u in scan.utterances if u.speaker == "ased:09"} == {"female"}
    assert "3 anomalies" in scan.summary()
    assert scan.details().count("anomaly:") == 3


def test_too_short_clip_is_counted_and_listed_by_default(tmp_path: Path) -> None:
    root = make_ased_like(tmp_path / "ased", speakers=(1, 2), emotions=("sad",), sentences=(1,), seconds=0.3)
    write_named_tree(root, ["04Sad/s4-02-01-01-01.flac"], seconds=0.01)  # 10 ms: no 25 ms frame
    scan = read_ased(root)
    assert len(scan.utterances) == 2
    [(path, reason)] = scan.skipped
    assert path.name == "s4-02-01-01-01.flac" and reason.startswith("too short: 10.0 ms")
    assert "skipped 1 files (1 too short)" in scan.summary()
    assert "skipped 04Sad/s4-02-01-01-01.flac: too short" in scan.details()
    # scan_corpora leaves the check to the reader: ASED checks by default
    assert len(scan_corpora(tmp_path, ["ased"]).skipped) == 1
    assert len(read_ased(root, check_audio=False).utterances) == 3


def test_cache_carries_sentence_and_common_flag(tmp_path: Path) -> None:
    root = make_ased_like(tmp_path / "ased", speakers=(1, 2), emotions=("sad", "angry"), sentences=(1, 5), seconds=0.3)
    scan = read_ased(root)
    corpus = build_cache(scan.utterances, tmp_path, tmp_path / "cache", progress=False)
    assert sorted(set(corpus.sentence.tolist())) == [1, 5]
    assert all(c == int(s in (1, 2)) for s, c in zip(corpus.sentence, corpus.common))
    again = build_cache(scan.utterances, tmp_path, tmp_path / "cache", progress=False)  # from the cache file
    assert again.common.tolist() == corpus.common.tolist()


def test_bad_ased_tree_gives_one_clear_line_never_a_traceback(tmp_path: Path, capsys) -> None:
    write_named_tree(tmp_path / "ased", list(ASED_BAD))
    with pytest.raises(DatasetError, match=r"^ased: no recognisable audio files in .*; 7 skipped"):
        scan_corpora(tmp_path, ["ased"])
    rc = main(["ased-cv", "--data", str(tmp_path), "--corpora", "ased", "--out", str(tmp_path / "out"),
               "--cache", str(tmp_path / "cache"), "--epochs", "1", "--steps-per-epoch", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("training: error: ased: no recognisable audio files")
