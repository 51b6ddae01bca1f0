"""Tests for serstream.sources.file: a real file replayed into a real monitor."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from serstream.inference.session import EmotionModel
from serstream.monitor import Monitor, MonitorConfig, SourceError
from serstream.sources.base import Source
from serstream.sources.file import FileSource


def test_the_same_file_twice_gets_the_suffix_rule_and_both_play_to_the_end(
    factory_model: Path, synthetic_wav: Path
) -> None:
    events: list[dict[str, Any]] = []
    lock = threading.Lock()

    def sink(event: dict[str, Any]) -> None:
        with lock:
            events.append(event)

    monitor = Monitor(EmotionModel.load(factory_model, device="cpu", threads=1), MonitorConfig(), sink)
    monitor.start()
    sources = [FileSource(monitor, synthetic_wav, realtime=False) for _ in range(2)]
    try:
        assert all(isinstance(s, Source) for s in sources)
        assert [s.stream_id for s in sources] == [f"file:{synthetic_wav.name}"] * 2  # the base, before start
        for source in sources:
            source.start()
        first, second = f"file:{synthetic_wav.name}", f"file:{synthetic_wav.name}-2"
        assert [s.stream_id for s in sources] == [first, second]
        assert sources[0].description == f"replaying {synthetic_wav} as fast as possible"
        assert all(s.join(timeout=60) for s in sources)
        assert monitor.wait_idle(timeout=60)
    finally:
        for source in sources:
            source.stop()
        monitor.stop()
    with lock:
        closed = {e["stream"]: e["reason"] for e in events if e["type"] == "stream" and e["state"] == "closed"}
        finals = {sid: sum(1 for e in events if e["stream"] == sid and e.get("kind") == "final")
                  for sid in (first, second)}
    assert closed == {first: "end", second: "end"}
    assert finals[first] >= 1 and finals[first] == finals[second]
    assert sources[0].stats()["frames_pushed"] == sources[1].stats()["frames_pushed"] > 0
    assert sources[0].stream_ids == []  # closed


def test_an_unreadable_file_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "not-audio.wav"
    bad.write_bytes(b"RIFF nonsense")
    with pytest.raises(SourceError, match="cannot read audio file") as info:
        FileSource(None, bad)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


def test_a_split_file_twice_moves_both_parties_to_the_next_base(
    factory_model: Path, speech_wav_44k_stereo: Path, synthetic_wav: Path
) -> None:
    events: list[dict[str, Any]] = []
    lock = threading.Lock()

    def sink(event: dict[str, Any]) -> None:
        with lock:
            events.append(event)

    monitor = Monitor(EmotionModel.load(factory_model, device="cpu", threads=1), MonitorConfig(), sink)
    monitor.start()
    name = f"file:{speech_wav_44k_stereo.name}"
    sources = [FileSource(monitor, speech_wav_44k_stereo, realtime=False, split=True, roles="a,b") for _ in range(2)]
    mono = FileSource(monitor, synthetic_wav, realtime=False, split=True)
    try:
        assert mono.split is None and mono.split_skipped and not sources[0].split_skipped
        for source in (*sources, mono):
            source.start()
        assert sources[0].stream_ids == [f"{name}:a", f"{name}:b"]
        assert sources[1].stream_ids == [f"{name}-2:a", f"{name}-2:b"]
        assert sources[1].stream_id == f"{name}-2" and mono.stream_ids == [f"file:{synthetic_wav.name}"]
        assert "as a call (a, b)" in sources[0].description
        assert all(s.join(timeout=90) for s in (*sources, mono))
        assert monitor.wait_idle(timeout=60)
    finally:
        for source in (*sources, mono):
            source.stop()
        monitor.stop()
    with lock:
        opened = {e["stream"]: e for e in events if e["type"] == "stream" and e["state"] == "open"}
        finals = {sid: [e["t0"] for e in events if e["stream"] == sid and e.get("kind") == "final"]
                  for sid in opened}
    assert {(e.get("call"), e.get("role"), e["channels"]) for sid, e in opened.items() if sid.startswith(name)} == {
        (name, "a", 1), (name, "b", 1), (f"{name}-2", "a", 1), (f"{name}-2", "b", 1)}
    # The fixture's channels are the same speech: each party hears it at the same stream times.
    assert finals[f"{name}:a"] and finals[f"{name}:a"] == finals[f"{name}:b"] == finals[f"{name}-2:b"]


def test_roles_that_do_not_fit_the_file_are_one_line(speech_wav_44k_stereo: Path) -> None:
    with pytest.raises(SourceError, match="3 roles") as info:
        FileSource(None, speech_wav_44k_stereo, split=True, roles="a,b,c")  # type: ignore[arg-type]
    assert "\n" not in str(info.value)
