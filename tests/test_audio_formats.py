"""Call recordings as recorders write them: M4A/AAC, MP4, Opus in WebM and Ogg, MP3, and folders of them.

The audio is made here (espeak-ng speech, numpy tones) and encoded with the
``ffmpeg`` command-line tool, the way a phone or meeting recorder would have
written it; serstream then decodes it through its own reader
(serstream/audiofile.py: libsndfile, else FFmpeg through PyAV).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from serstream.analyze import AnalyzeConfig, analyze, streams_from_args
from serstream.audiofile import AUDIO_EXTENSIONS, audio_files_under, expand_audio_paths, open_audio
from serstream.errors import SourceError
from serstream.inference.session import EmotionModel
from tests.audio import SAMPLE_RATE, write_wav
from tests.conftest import REPO, require_tools, serstream_command

#: ffmpeg encoder arguments per output name: what phones, meeting tools and browsers write.
ENCODINGS: dict[str, list[str]] = {
    "call.m4a": ["-c:a", "aac", "-b:a", "64k"],
    "call.mp4": ["-c:a", "aac", "-b:a", "64k"],
    "call.webm": ["-c:a", "libopus", "-b:a", "32k"],
    "call.opus": ["-c:a", "libopus", "-b:a", "32k"],  # Ogg Opus
    "call.mp3": ["-c:a", "libmp3lame", "-b:a", "64k"],
}


def encode(source: Path, target: Path, *codec: str) -> Path:
    """Encode ``source`` with the ffmpeg command-line tool (the test's stand-in for a recorder)."""
    require_tools("ffmpeg")
    subprocess.run(
        ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y", "-i", str(source), *codec, str(target)],
        check=True, timeout=120,
    )
    return target


def run_cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "SERSTREAM_MODEL"}
    return subprocess.run([*serstream_command(), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def tones(seconds: float, rate: int, left_hz: float, right_hz: float) -> np.ndarray:
    """Two channels that differ (frequency and level), so a swapped or mixed channel shows."""
    t = np.arange(int(round(seconds * rate))) / rate
    return np.stack([0.3 * np.sin(2 * np.pi * left_hz * t), 0.1 * np.sin(2 * np.pi * right_hz * t)],
                    axis=1).astype(np.float32)


def peak_hz(signal: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(signal * np.hanning(signal.size)))
    return float(np.fft.rfftfreq(signal.size, 1 / rate)[int(np.argmax(spectrum))])


@pytest.fixture(scope="module")
def recordings(speech_wav: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The espeak-ng speech WAV and the same speech in each of :data:`ENCODINGS`."""
    folder = tmp_path_factory.mktemp("recordings")
    out = {"call.wav": speech_wav}
    for name, codec in ENCODINGS.items():
        out[name] = encode(speech_wav, folder / name, *codec)
    return out


# ---------------------------------------------------------------- the reader itself


def test_a_stereo_44k_m4a_is_read_at_its_native_rate_and_channels_in_blocks(tmp_path: Path) -> None:
    rate, seconds = 44_100, 3.0
    wav = write_wav(tmp_path / "stereo.wav", tones(seconds, rate, 440.0, 1000.0), rate=rate)
    m4a = encode(wav, tmp_path / "stereo.m4a", "-c:a", "aac", "-b:a", "192k")
    block = 4410
    with open_audio(m4a) as reader:
        assert (reader.decoder, reader.codec, reader.sample_rate, reader.channels) == ("ffmpeg", "aac", rate, 2)
        blocks = []
        while True:
            data = reader.read(block)
            assert data.dtype == np.float32 and data.ndim == 2 and data.shape[1] == 2
            if data.shape[0] == 0:
                break
            blocks.append(data)
        # Every block but the last is exactly what was asked for: the reader re-blocks codec frames.
        assert all(b.shape[0] == block for b in blocks[:-1]) and 0 < blocks[-1].shape[0] <= block
        audio = np.concatenate(blocks)
        # The encoder's priming samples are trimmed (the container's edit list): the length is the WAV's.
        assert abs(audio.shape[0] - seconds * rate) <= 1024, audio.shape
        assert reader.frames == audio.shape[0]  # exact once the end is reached
        reader.rewind()
        again = reader.read(block)
    np.testing.assert_array_equal(again, blocks[0])
    middle = audio[rate // 2: rate // 2 + rate]  # one second away from the edges
    # Channel order, rate and level survive: a swapped, mixed, resampled or silent decode fails here.
    assert peak_hz(middle[:, 0], rate) == pytest.approx(440.0, abs=2.0)
    assert peak_hz(middle[:, 1], rate) == pytest.approx(1000.0, abs=2.0)
    rms = np.sqrt(np.mean(middle.astype(np.float64) ** 2, axis=0))
    assert rms[0] == pytest.approx(0.3 / np.sqrt(2), rel=0.05)
    assert rms[1] == pytest.approx(0.1 / np.sqrt(2), rel=0.05)


@pytest.mark.parametrize(("codec", "tolerance"), [
    ("pcm_s16le", 1 / 32768), ("pcm_s32le", 1e-6), ("pcm_u8", 1 / 128), ("pcm_f64le", 1e-7),
])
def test_every_sample_format_ffmpeg_gives_becomes_the_same_float_samples(
    tmp_path: Path, codec: str, tolerance: float
) -> None:
    """PCM in Matroska (libsndfile cannot open it): packed integer, unsigned and double samples, interleaved."""
    rate = 22_050
    original = tones(0.5, rate, 440.0, 1000.0)
    wav = write_wav(tmp_path / "in.wav", original, rate=rate, subtype="FLOAT")
    with open_audio(encode(wav, tmp_path / f"{codec}.mka", "-c:a", codec)) as reader:
        assert (reader.decoder, reader.codec, reader.sample_rate, reader.channels) == ("ffmpeg", codec, rate, 2)
        decoded = reader.read(rate)
        assert reader.read(rate).shape == (0, 2)
    assert decoded.dtype == np.float32 and decoded.shape == original.shape
    assert float(np.abs(decoded - original).max()) <= tolerance


def test_a_long_recording_is_decoded_block_by_block_not_into_memory(tmp_path: Path) -> None:
    rate, seconds = 44_100, 60.0
    wav = write_wav(tmp_path / "long.wav", tones(seconds, rate, 300.0, 600.0), rate=rate)
    m4a = encode(wav, tmp_path / "long.m4a", "-c:a", "aac", "-b:a", "64k")
    wav.unlink()
    decoded_bytes = int(seconds * rate) * 2 * 4  # the whole file as float32 stereo: about 21 MB
    with open_audio(m4a) as reader:
        total = 0
        tracemalloc.start()
        try:
            while (data := reader.read(rate // 10)).shape[0]:
                total += data.shape[0]
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert abs(total - seconds * rate) <= 1024
    # Holding the decoded file (or even a few seconds of it) would show here; 0.1 s blocks are 35 KB.
    assert peak < decoded_bytes / 40, (peak, decoded_bytes)


def test_opus_is_decoded_at_its_own_rate(recordings: dict[str, Path]) -> None:
    """Opus decodes at 48 kHz whatever went in: the reader says so, and the pipeline resamples."""
    with open_audio(recordings["call.webm"]) as reader:
        assert (reader.decoder, reader.codec, reader.channels) == ("ffmpeg", "opus", 1)
        assert reader.sample_rate == 48_000
        audio = reader.read(10 * 48_000)
    with open_audio(recordings["call.wav"]) as reader:
        assert reader.decoder == "libsndfile" and reader.sample_rate == SAMPLE_RATE
        original = reader.read(10 * SAMPLE_RATE)
    # Same speech, same loudness (within a lossy codec's error), three times the samples per second.
    assert abs(audio.shape[0] / 48_000 - original.shape[0] / SAMPLE_RATE) < 0.05
    level, reference = float(np.sqrt(np.mean(audio**2))), float(np.sqrt(np.mean(original**2)))
    assert level == pytest.approx(reference, rel=0.15)


@pytest.mark.parametrize("content", [b"", b"\x00\x01junk" * 500, b"ftypM4A " + b"\xff" * 4000])
def test_an_undecodable_file_is_one_line_naming_it(tmp_path: Path, content: bytes) -> None:
    bad = tmp_path / "broken.m4a"
    bad.write_bytes(content)
    with pytest.raises(SourceError) as info:
        open_audio(bad)
    message = str(info.value)
    assert message.startswith(f"cannot read audio file {bad}: ") and "\n" not in message
    assert len(message) > len(f"cannot read audio file {bad}: ")  # a cause, not just the name


def test_a_truncated_m4a_is_refused_or_read_to_where_it_stops(recordings: dict[str, Path], tmp_path: Path) -> None:
    data = recordings["call.m4a"].read_bytes()
    # ffmpeg writes the index (moov) at the end: cut before it, the file cannot be opened.
    cut = tmp_path / "cut.m4a"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(SourceError, match="cannot read audio file .*cut.m4a: "):
        open_audio(cut)
    # With the index in front (as streaming recorders write), a cut file reads up to the cut, never past it.
    faststart = encode(recordings["call.wav"], tmp_path / "fast.m4a", "-c:a", "aac", "-movflags", "+faststart")
    whole = faststart.read_bytes()
    half = tmp_path / "half.m4a"
    half.write_bytes(whole[: len(whole) // 2])
    with open_audio(faststart) as reader:
        full = reader.read(10**8).shape[0]
    try:
        with open_audio(half) as reader:
            got = 0
            while (n := reader.read(SAMPLE_RATE).shape[0]):
                got += n
    except SourceError as exc:
        assert "half.m4a" in str(exc) and "\n" not in str(exc)
    else:
        assert 0.3 * full < got < 0.7 * full


def test_corrupt_audio_inside_an_m4a_fails_that_file_alone(
    factory_model: Path, recordings: dict[str, Path], tmp_path: Path
) -> None:
    fast = encode(recordings["call.wav"], tmp_path / "fast.m4a", "-c:a", "aac", "-movflags", "+faststart")
    data = bytearray(fast.read_bytes())
    middle = len(data) // 2  # inside the audio packets: the index is in front (+faststart)
    data[middle: middle + 4000] = np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes()
    bad = tmp_path / "bad.m4a"
    bad.write_bytes(bytes(data))
    pattern = rf"^cannot read audio file {re.escape(str(bad))}: corrupt audio data after \d+\.\d\d s \(FFmpeg: .+\)$"
    with pytest.raises(SourceError, match=pattern), open_audio(bad) as reader:
        while reader.read(SAMPLE_RATE).shape[0]:
            pass
    # In a batch the failure is that file's: an error event on its stream, the other file analysed whole.
    model = EmotionModel.load(factory_model, device="cpu", threads=1)
    out: list[dict[str, Any]] = []
    summary = analyze(model, streams_from_args([bad, recordings["call.m4a"]]), out.append, AnalyzeConfig())
    assert summary.failed == [str(bad)]
    errors = [e for e in out if e["type"] == "error"]
    assert len(errors) == 1 and errors[0]["stream"] == str(bad) and errors[0]["code"] == "decode_error"
    assert re.match(pattern, errors[0]["message"])
    files = [e for e in out if e["type"] == "file"]
    assert [e["file"] for e in files] == [str(recordings["call.m4a"])] and files[0]["segments"] >= 3


def test_a_folder_gives_its_audio_files_recursively_in_a_stable_order(tmp_path: Path) -> None:
    root = tmp_path / "recordings"
    names = ["b/call.wav", "a/call.m4a", "a/sub/z.opus", "a-b.webm", "A.MP3", "a/0.flac"]
    skipped = ["notes.txt", ".hidden.wav", ".git/x.wav", "a/.cache/y.m4a", "cover.jpg"]
    for name in names + skipped:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    found = [p.relative_to(root).as_posix() for p in audio_files_under(root)]
    # By relative path, folder by folder: "a/..." before "a-b.webm" (as parts, not as one string).
    assert found == ["A.MP3", "a/0.flac", "a/call.m4a", "a/sub/z.opus", "a-b.webm", "b/call.wav"]
    assert [str(p) for p in expand_audio_paths([str(root / "b"), "missing.wav"])] == [
        str(root / "b" / "call.wav"), "missing.wav"]
    assert {"wav", "flac", "ogg", "opus", "mp3", "m4a", "mp4", "aac", "webm", "mka"} <= set(AUDIO_EXTENSIONS)
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.txt").write_text("no audio here")
    with pytest.raises(SourceError, match=f"no audio files under {empty}"):
        expand_audio_paths([empty])


# ---------------------------------------------------------------- through the command line


def test_analyze_gives_the_same_utterances_for_every_encoding(
    factory_model: Path, recordings: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out.jsonl"
    proc = run_cli("analyze", "--model", str(factory_model), *map(str, recordings.values()), "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    finals: dict[str, list[dict[str, Any]]] = {str(p): [] for p in recordings.values()}
    summaries = {}
    for event in lines:
        if event["type"] == "emotion" and event["kind"] == "final":
            finals[event["file"]].append(event)
        elif event["type"] == "file":
            summaries[event["file"]] = event
    reference = finals[str(recordings["call.wav"])]
    assert len(reference) >= 3  # three sentences
    wav_duration = summaries[str(recordings["call.wav"])]["duration_s"]
    for name, path in recordings.items():
        mine = finals[str(path)]
        # Silence, a wrong rate or lost audio would change the count or move the times.
        assert len(mine) == len(reference), (name, [(e["t0"], e["t1"]) for e in mine])
        for event, ref in zip(mine, reference):
            assert event["t0"] == pytest.approx(ref["t0"], abs=0.1), name
            assert event["t1"] == pytest.approx(ref["t1"], abs=0.1), name
            assert max(abs(event["probs"][k] - ref["probs"][k]) for k in ref["probs"]) < 0.1, name
        labels = [e["label"] for e in mine]
        assert sum(a == b["label"] for a, b in zip(labels, reference)) >= len(reference) - 1, (name, labels)
        assert summaries[str(path)]["segments"] == len(reference)
        assert summaries[str(path)]["duration_s"] == pytest.approx(wav_duration, abs=0.1), name


def test_analyze_a_folder_reports_the_corrupt_file_and_analyses_the_rest(
    factory_model: Path, recordings: dict[str, Path], synthetic_wav: Path, tmp_path: Path
) -> None:
    root = tmp_path / "recordings"
    (root / "monday" / "late").mkdir(parents=True)
    (root / "tuesday").mkdir()
    layout = {
        "monday/call.m4a": recordings["call.m4a"],
        "monday/late/call.webm": recordings["call.webm"],
        "tuesday/call.m4a": recordings["call.m4a"],  # the same name in another folder
        "tuesday/synthetic.wav": synthetic_wav,
    }
    for name, source in layout.items():
        (root / name).write_bytes(source.read_bytes())
    (root / "monday" / "broken.m4a").write_bytes(b"\x00\x00\x00\x18ftypM4A " + b"\x13\x37" * 3000)
    (root / "tuesday" / "notes.txt").write_text("call notes, not audio\n")
    (root / ".trash").mkdir()
    (root / ".trash" / "old.wav").write_bytes(synthetic_wav.read_bytes())
    out = tmp_path / "out.jsonl"
    # --batch 1: one stream at a time, so the output follows the input order.
    proc = run_cli("analyze", "--model", str(factory_model), str(root), "--batch", "1", "--output", str(out))
    assert proc.returncode == 1, proc.stderr  # one file failed
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and str(root / "monday" / "broken.m4a") in errors[0], proc.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    # Files in sorted relative order, each with its summary or (the corrupt one) its error; a stream id is the path.
    done = [(e["type"], Path(e["file"] if e["type"] == "file" else e["stream"]).relative_to(root).as_posix())
            for e in lines if e["type"] in ("file", "error")]
    assert done == [("error", "monday/broken.m4a"), ("file", "monday/call.m4a"), ("file", "monday/late/call.webm"),
                    ("file", "tuesday/call.m4a"), ("file", "tuesday/synthetic.wav")]
    summaries = {Path(e["file"]).relative_to(root).as_posix(): e for e in lines if e["type"] == "file"}
    assert all(summaries[name]["segments"] >= 2 for name in summaries)
    # Stream ids are the paths, so the two call.m4a stay apart.
    streams = {e["stream"] for e in lines if e["type"] == "emotion"}
    assert {str(root / "monday" / "call.m4a"), str(root / "tuesday" / "call.m4a")} <= streams


def test_analyze_an_empty_folder_is_one_line(factory_model: Path, tmp_path: Path) -> None:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    proc = run_cli("analyze", "--model", str(factory_model), str(tmp_path / "empty"))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no audio files under" in lines[0] and str(tmp_path / "empty") in lines[0]


@pytest.mark.slow
def test_listen_replays_a_folder_of_m4a_and_webm_to_final_events(
    factory_model: Path, recordings: dict[str, Path], free_port: int, tmp_path: Path
) -> None:
    root = tmp_path / "calls"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    (root / "a" / "call.m4a").write_bytes(recordings["call.m4a"].read_bytes())
    (root / "b" / "call.m4a").write_bytes(recordings["call.m4a"].read_bytes())
    (root / "b" / "call.webm").write_bytes(recordings["call.webm"].read_bytes())
    proc = run_cli("listen", "--model", str(factory_model), "--file", str(root), "--fast", "--exit-when-done",
                   "--json", "--quiet", "--port", str(free_port))
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    opened = {e["stream"]: e for e in lines if e["type"] == "stream" and e["state"] == "open"}
    # Sorted order: a/call.m4a gets the name, b/call.m4a the suffix (core/stream_ids.py).
    assert opened["file:call.m4a"]["detail"] == str(root / "a" / "call.m4a")
    assert opened["file:call.m4a-2"]["detail"] == str(root / "b" / "call.m4a")
    assert opened["file:call.m4a"]["codec"] == "aac"
    assert (opened["file:call.webm"]["codec"], opened["file:call.webm"]["sample_rate"]) == ("opus", 48_000)
    closed = {e["stream"]: e["reason"] for e in lines if e["type"] == "stream" and e["state"] == "closed"}
    assert closed == {"file:call.m4a": "end", "file:call.m4a-2": "end", "file:call.webm": "end"}
    for stream in closed:
        finals = [e for e in lines if e["stream"] == stream and e["type"] == "emotion" and e["kind"] == "final"]
        assert len(finals) >= 3, stream
