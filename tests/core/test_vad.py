"""Tests for serstream.core.vad.VadSegmenter on synthetic voiced/unvoiced audio with the real webrtcvad."""

from __future__ import annotations

import numpy as np
import pytest
import webrtcvad
from hypothesis import given, settings
from hypothesis import strategies as st

from serstream.core.audio import float_to_pcm16
from serstream.core.vad import SpeechAudio, SpeechEnd, SpeechStart, VadConfig, VadSegmenter

SR = 16000
FRAME = 480  # 30 ms at 16 kHz


def voiced(seconds: float, seed: int = 0, rate: int = SR, amp: float = 0.3) -> np.ndarray:
    """Vowel-like sound: a 120-220 Hz harmonic complex shaped by three formants, 4 Hz amplitude modulation."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * rate))
    t = np.arange(n) / rate
    f0 = 170 + 50 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 2 * np.pi))
    phase = 2 * np.pi * np.cumsum(f0) / rate
    out = np.zeros(n)
    for k in range(1, 40):
        fk = k * f0
        gain = sum(np.exp(-0.5 * ((fk - fc) / bw) ** 2) for fc, bw in ((700, 130), (1220, 70), (2600, 160)))
        gain = np.where(fk < rate / 2 - 200, gain + 0.3 / k, 0.0)
        out += gain * np.sin(k * phase)
    out *= 0.65 + 0.35 * np.sin(2 * np.pi * 4 * t)
    return (amp * out / np.max(np.abs(out))).astype(np.float32)


def quiet(seconds: float, seed: int = 1, rate: int = SR) -> np.ndarray:
    """Low background noise (about -60 dBFS)."""
    return (1e-3 * np.random.default_rng(seed).standard_normal(int(round(seconds * rate)))).astype(np.float32)


def frame_flags(audio: np.ndarray, rate: int = SR, frame_ms: int = 30, aggressiveness: int = 2) -> np.ndarray:
    """webrtcvad's own verdict per frame (the ground truth the state machine works from)."""
    vad = webrtcvad.Vad(aggressiveness)
    frame = rate * frame_ms // 1000
    pcm = float_to_pcm16(audio).tobytes()
    return np.array([vad.is_speech(pcm[i * 2 * frame:(i + 1) * 2 * frame], rate) for i in range(audio.size // frame)])


def segments(events) -> list[tuple[int, int, str, bool, np.ndarray]]:
    """Collapse an event list to (start, end, reason, too_short, audio) per segment, checking the protocol."""
    out = []
    start = None
    pieces: list[np.ndarray] = []
    cursor = None
    for event in events:
        if isinstance(event, SpeechStart):
            assert start is None, "start inside an open segment"
            start = cursor = event.index
            pieces = []
        elif isinstance(event, SpeechAudio):
            assert start is not None and event.index == cursor, "audio not contiguous"
            assert event.samples.dtype == np.float32
            pieces.append(event.samples)
            cursor += event.samples.size
        else:
            assert start is not None and event.index == cursor, "end does not match the audio"
            audio = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
            out.append((start, event.index, event.reason, event.too_short, audio))
            start = None
    return out


def run(segmenter: VadSegmenter, audio: np.ndarray, chunk: int) -> list:
    events = []
    for i in range(0, audio.size, chunk):
        events.extend(segmenter.push(audio[i:i + chunk]))
    return events + segmenter.flush()


# quiet 1 s | voiced 1 s | quiet 1 s | voiced 0.5 s | quiet 1.5 s
SCENE = np.concatenate([quiet(1.0), voiced(1.0), quiet(1.0, seed=3), voiced(0.5, seed=4), quiet(1.5, seed=5)])
SPEECH = [(16000, 32000), (48000, 56000)]


def test_the_synthetic_signal_is_voiced_for_webrtcvad():
    assert frame_flags(voiced(2.0)).mean() > 0.95
    # webrtcvad calls a few frames voiced while it adapts at the start of a stream; none after that.
    assert frame_flags(quiet(2.0))[5:].mean() == 0.0


def test_segments_follow_the_speech_with_pre_roll_and_hangover():
    config = VadConfig()
    found = segments(VadSegmenter(config).push(SCENE))
    assert len(found) == 2
    flags = frame_flags(SCENE)
    hangover = 14 * FRAME  # 400 ms rounded up to whole 30 ms frames
    for (start, end, reason, too_short, audio), (true_start, true_end) in zip(found, SPEECH):
        voiced_frames = np.flatnonzero(flags[true_start // FRAME - 3:true_end // FRAME + 8]) + true_start // FRAME - 3
        first_voiced, last_voiced = voiced_frames[0] * FRAME, (voiced_frames[-1] + 1) * FRAME
        assert abs(first_voiced - true_start) <= FRAME
        assert 0 <= last_voiced - true_end <= 4 * FRAME  # webrtcvad trails by a few frames
        assert start == first_voiced - 4800  # 300 ms pre-roll
        assert end == last_voiced + hangover
        assert reason == "silence" and not too_short
        np.testing.assert_array_equal(audio, SCENE[start:end])


def test_pre_roll_setting_moves_the_start_and_is_clipped_at_the_stream_start():
    no_pre_roll = segments(VadSegmenter(VadConfig(pre_roll_ms=0)).push(SCENE))
    assert no_pre_roll[0][0] == 33 * FRAME  # first frame overlapping the voice at 1.0 s
    early = np.concatenate([quiet(0.1), voiced(1.0), quiet(1.0)])
    found = segments(VadSegmenter(VadConfig(pre_roll_ms=500, start_window_ms=300)).push(early))
    assert found[0][0] == 0


def test_longer_hangover_ends_later_and_bridges_pauses():
    short = segments(VadSegmenter(VadConfig(hangover_ms=210)).push(SCENE))
    long = segments(VadSegmenter(VadConfig(hangover_ms=600)).push(SCENE))
    assert long[0][1] - short[0][1] == (20 - 7) * FRAME
    paused = np.concatenate([quiet(0.5), voiced(1.0), quiet(0.3, seed=7), voiced(1.0, seed=8), quiet(1.0)])
    assert len(segments(VadSegmenter(VadConfig(hangover_ms=400)).push(paused))) == 1
    assert len(segments(VadSegmenter(VadConfig(hangover_ms=90)).push(paused))) == 2


def test_start_needs_start_ms_of_voiced_frames():
    blip = np.concatenate([quiet(0.5), voiced(0.03), quiet(1.0, seed=2)])
    assert frame_flags(blip).sum() - 3 == 4  # webrtcvad: 3 frames at the stream start, 4 for the blip
    assert segments(VadSegmenter(VadConfig(start_ms=150)).push(blip)) == []
    assert len(segments(VadSegmenter(VadConfig(start_ms=120)).push(blip))) == 1


def test_long_speech_is_split_at_max_length_not_lost():
    speech = np.concatenate([quiet(0.5), voiced(5.0), quiet(1.0, seed=2)])
    found = segments(VadSegmenter(VadConfig(max_segment_ms=2000)).push(speech))
    assert [reason for _, _, reason, _, _ in found] == ["max_length", "max_length", "silence"]
    for (_, end, _, _, _), (next_start, _, _, _, _) in zip(found, found[1:]):
        assert next_start == end
    assert all(end - start <= 32000 for start, end, _, _, _ in found)
    joined = np.concatenate([audio for *_, audio in found])
    np.testing.assert_array_equal(joined, speech[found[0][0]:found[-1][1]])
    assert found[0][0] <= 8000 - 4800 + FRAME and found[-1][1] >= 88000


def test_short_segments_are_marked_too_short():
    burst = np.concatenate([quiet(0.5), voiced(0.1), quiet(1.0, seed=2)])
    assert frame_flags(burst)[5:].sum() == 7  # 210 ms voiced, webrtcvad's own trailing frames included
    found = segments(VadSegmenter(VadConfig(min_segment_ms=300)).push(burst))
    assert len(found) == 1 and found[0][3] is True and found[0][2] == "silence"
    # Pre-roll and hangover make the segment itself long; only voiced time counts.
    assert found[0][1] - found[0][0] > 300 * 16
    found = segments(VadSegmenter(VadConfig(min_segment_ms=210)).push(burst))
    assert found[0][3] is False


def test_gap_ends_the_segment_at_the_last_contiguous_sample():
    segmenter = VadSegmenter()
    head = np.concatenate([quiet(0.5), voiced(1.0)])
    head = head[: head.size - 100]  # leave an unframed tail inside the segment
    first = segmenter.push(head)
    assert segmenter.in_speech
    resume = head.size + 16000
    events = segmenter.push(voiced(1.0, seed=9), index=resume)
    found = segments(first + events + segmenter.flush())
    assert found[0][1] == head.size and found[0][2] == "gap"
    np.testing.assert_array_equal(found[0][4], head[found[0][0]:])
    assert len(found) == 2 and found[1][0] == resume  # the pre-roll never reaches across the gap
    assert segmenter.gaps == 1 and segmenter.gap_samples == 16000


def test_gap_while_idle_ends_nothing_and_going_back_raises():
    segmenter = VadSegmenter(start_index=100)
    assert segmenter.push(quiet(0.2)) == []
    assert segmenter.push(quiet(0.2), index=segmenter.next_index + 50) == []
    with pytest.raises(ValueError, match="goes back"):
        segmenter.push(quiet(0.1), index=0)


def test_flush_closes_an_open_segment_with_its_tail():
    segmenter = VadSegmenter()
    audio = np.concatenate([quiet(0.3), voiced(0.8)])[:-7]
    events = segmenter.push(audio)
    assert segmenter.in_speech
    found = segments(events + segmenter.flush())
    assert found[-1][1] == audio.size and found[-1][2] == "flush"
    assert not segmenter.in_speech
    assert segmenter.flush() == []


def test_start_index_offsets_every_event():
    offset = 1_000_000
    base = segments(VadSegmenter().push(SCENE))
    shifted = segments(VadSegmenter(start_index=offset).push(SCENE))
    assert [(s + offset, e + offset) for s, e, *_ in base] == [(s, e) for s, e, *_ in shifted]


def _summary(events):
    return [(start, end, reason, short, audio.tobytes()) for start, end, reason, short, audio in segments(events)]


def test_chunk_size_does_not_change_the_segments():
    audio = SCENE[: 3 * SR]
    reference = _summary(run(VadSegmenter(), audio, SR))
    assert len(reference) == 1
    assert _summary(run(VadSegmenter(), audio, 7 * 16)) == reference
    assert _summary(run(VadSegmenter(), audio, 1)) == reference


def test_audio_is_merged_to_one_piece_per_push():
    events = run(VadSegmenter(), SCENE, SR)
    audio_events = [e for e in events if isinstance(e, SpeechAudio)]
    assert len(audio_events) <= 2 * len(SCENE) // SR  # not one per frame
    assert len(audio_events) < sum(1 for e in events if isinstance(e, SpeechEnd)) * 5


@settings(max_examples=15, deadline=None)
@given(cuts=st.lists(st.integers(0, SCENE.size), max_size=30))
def test_random_chunking_gives_the_same_segments(cuts):
    reference = _summary(run(VadSegmenter(), SCENE, SCENE.size))
    segmenter = VadSegmenter()
    events = []
    for part in np.split(SCENE, sorted(cuts)):
        events.extend(segmenter.push(part))
    assert _summary(events + segmenter.flush()) == reference


@pytest.mark.parametrize("rate", [8000, 32000, 48000])
def test_other_webrtcvad_rates_segment_the_same_speech(rate):
    audio = np.concatenate([quiet(1.0, rate=rate), voiced(1.0, rate=rate), quiet(1.0, seed=2, rate=rate)])
    found = segments(VadSegmenter(VadConfig(sample_rate=rate, frame_ms=20)).push(audio))
    assert len(found) == 1
    frame = rate // 50
    assert abs(found[0][0] - (rate - rate * 3 // 10)) <= 2 * frame


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sample_rate": 44100}, "sample rate"),
        ({"frame_ms": 25}, "frame length"),
        ({"aggressiveness": 4}, "aggressiveness"),
        ({"start_ms": 0}, "start_ms"),
        ({"start_window_ms": 100, "start_ms": 150}, "start_window_ms"),
        ({"max_segment_ms": 500}, "max_segment_ms"),
        ({"hangover_ms": -1}, "hangover_ms"),
    ],
)
def test_bad_config_raises_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VadConfig(**kwargs)


def test_bad_input_shape_raises():
    with pytest.raises(ValueError, match="1-D"):
        VadSegmenter().push(np.zeros((10, 2), dtype=np.float32))


def test_max_length_during_hangover_ends_without_restarting():
    speech = np.concatenate([quiet(0.5), voiced(1.5), quiet(1.5, seed=2)])
    found = segments(VadSegmenter(VadConfig(max_segment_ms=2000)).push(speech))
    assert [reason for _, _, reason, _, _ in found] == ["max_length"]
    start, end = found[0][:2]
    assert end - start <= 32000 and end > 32000  # cut inside the hangover, after the voice
