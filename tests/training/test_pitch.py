"""The in-graph pitch tracker (training/pitch.py) and the model's ``f0_stats`` option: what F0 it finds on
harmonic sounds, that noise is not voiced, that a gain changes nothing, the window statistics, the speaker
state columns, old configs, the flag, and train -> ONNX -> the runtime with its state."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from serstream.contract import LABELS
from training.frontend import stats_width
from training.model import EmotionNet, ModelConfig
from training.pitch import (
    PITCH_FEATURES,
    PITCH_STATE_WIDTH,
    PitchConfig,
    PitchTracker,
    hann_autocorrelation,
    pitch_features,
    window_pitch_sums,
)

RATE = 16_000
K = 6
TINY = ModelConfig(cnn_channels=(8, 8, 16, 16), embed_dim=32, attention_dim=16, cepstral_stats=K,
                   speaker_window_stats=True, f0_stats=True)


def _voice(f0: np.ndarray | float, seconds: float = 1.0, harmonics: int = 25) -> np.ndarray:
    """A harmonic sound (amplitudes 1/k) following ``f0`` (Hz, a constant or one value a sample)."""
    n = int(seconds * RATE)
    f = np.broadcast_to(np.asarray(f0, dtype=np.float64), (n,))
    phase = 2 * np.pi * np.cumsum(f) / RATE
    sig = sum(np.sin(k * phase) / k for k in range(1, harmonics + 1))
    return (0.05 * sig).astype(np.float32)


def _track(clips: list[np.ndarray]):
    n = max(c.size for c in clips)
    audio = torch.zeros(len(clips), n)
    for i, c in enumerate(clips):
        audio[i, : c.size] = torch.from_numpy(c)
    return PitchTracker()(audio, torch.tensor([c.size for c in clips]))


@pytest.mark.parametrize("f0", [80.0, 110.0, 165.0, 240.0, 360.0, 470.0])
def test_a_steady_harmonic_sound_is_voiced_at_its_f0(f0) -> None:
    track = _track([_voice(f0)])
    voiced = track.voiced[0] > 0
    assert voiced.float().mean() > 0.9
    found = track.semitones[0][voiced].numpy()
    assert np.abs(np.median(found) - 12 * np.log2(f0 / 100.0)) < 0.4  # within half a step of the 1/3-semitone grid


def test_a_voice_without_its_fundamental_is_still_heard_at_its_f0() -> None:
    n = RATE
    t = np.arange(n) / RATE
    missing = sum(np.sin(2 * np.pi * k * 120.0 * t) / k for k in range(2, 20)).astype(np.float32) * 0.05
    track = _track([missing])
    voiced = track.voiced[0] > 0
    assert voiced.float().mean() > 0.9
    assert abs(float(np.median(track.semitones[0][voiced].numpy())) - 12 * np.log2(1.2)) < 0.4


def test_noise_and_silence_are_not_voiced_and_padding_never_is() -> None:
    rng = np.random.default_rng(0)
    noise = (0.05 * rng.standard_normal(RATE)).astype(np.float32)
    short = _voice(200.0, seconds=0.3)
    track = _track([noise, np.zeros(RATE, np.float32), short])
    assert track.voiced[0].mean() < 0.1
    assert track.voiced[1].sum() == 0
    inside = int(track.inside[2].sum())
    assert inside == (short.size // 2 - 320) // 160 + 1  # 40 ms frames every 20 ms at 8 kHz
    assert track.voiced[2, inside:].sum() == 0 and track.voiced[2, :inside].mean() > 0.8


def test_a_gain_changes_no_pitch_statistic() -> None:
    clip = _voice(np.linspace(120.0, 180.0, RATE))
    quiet, loud = _track([clip]), _track([clip * 8.0])
    for track in (quiet, loud):
        assert track.voiced.sum() > 0
    a = pitch_features(quiet, window_pitch_sums(quiet), PitchConfig())
    b = pitch_features(loud, window_pitch_sums(loud), PitchConfig())
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-3)


def test_a_glide_gives_its_slope_spread_and_movement() -> None:
    seconds = 1.5
    glide = _voice(np.geomspace(100.0, 200.0, int(seconds * RATE)), seconds=seconds)  # one octave, evenly in log F0
    steady = _voice(150.0, seconds=seconds)
    track = _track([glide, steady])
    feats = pitch_features(track, window_pitch_sums(track), PitchConfig())
    columns = dict(zip(PITCH_FEATURES, feats.T))
    assert abs(float(columns["slope"][0]) - 12.0 / seconds) < 1.0  # semitones a second
    assert abs(float(columns["slope"][1])) < 0.3
    assert 3.0 < float(columns["std"][0]) < 4.0  # a uniform octave: 12 / sqrt(12) = 3.46
    assert float(columns["std"][1]) < 0.3
    assert float(columns["movement"][0]) > float(columns["movement"][1])
    assert float(columns["voiced_fraction"][0]) > 0.9 and float(columns["periodicity"][0]) > 0.6


def test_the_window_mean_is_scored_against_the_speakers_voiced_frames_so_far() -> None:
    low, high = _track([_voice(120.0)]), _track([_voice(120.0 * 2 ** (6 / 12))])  # six semitones up
    history = window_pitch_sums(low) * 5  # five windows of the speaker at 120 Hz
    alone = pitch_features(high, window_pitch_sums(high), PitchConfig())
    against = pitch_features(high, history + window_pitch_sums(high), PitchConfig())
    assert float(alone[0, 0]) == pytest.approx(0.0, abs=1e-4)  # no history: the window against itself
    # The speaker's spread is (mostly) the floor's 2 semitones: six semitones up over 5/6 of the frames.
    assert 1.5 < float(against[0, 0]) < 3.0
    lower = pitch_features(low, window_pitch_sums(high) * 5 + window_pitch_sums(low), PitchConfig())
    assert float(lower[0, 0]) < -1.5


def test_hann_autocorrelation_is_the_windows_own() -> None:
    n = 4000
    w = 0.5 - 0.5 * np.cos(2 * np.pi * (np.arange(n) + 0.5) / n)
    for lag in (0, 400, 1300, 2600):
        direct = float(np.dot(w[: n - lag], w[lag:]) / np.dot(w, w))
        assert hann_autocorrelation(np.array(lag / n), 1.0) == pytest.approx(direct, abs=2e-3)


def test_the_model_reads_pitch_through_its_state_and_heads() -> None:
    net = EmotionNet(TINY).eval()
    plain = EmotionNet(ModelConfig(**{**TINY.__dict__, "f0_stats": False})).eval()
    assert net.state_width == plain.state_width + PITCH_STATE_WIDTH
    clip = _voice(150.0)
    audio, lengths = torch.from_numpy(clip[None]), torch.tensor([clip.size])
    with torch.no_grad():
        logmel, mask = net.frontend.log_mel(audio, lengths)
        pitch = net.track_pitch(audio, lengths)
        own = net.own_stats(logmel, mask, pitch)
        np.testing.assert_allclose(own[0, -PITCH_STATE_WIDTH:].numpy(), window_pitch_sums(pitch)[0].numpy(), rtol=1e-5)
        np.testing.assert_allclose(own[:, : plain.state_width].numpy(), plain.own_stats(logmel, mask).numpy(), rtol=1e-5)
        normed, features = net.normalise(logmel, mask, own, torch.zeros_like(own), pitch)
        assert features is not None and features.shape == (1, 2 * K + len(PITCH_FEATURES))
        embedding = net.encode(normed, mask, window_features=features)
        assert embedding.shape[1] == plain.encode(normed, mask, window_features=features[:, : 2 * K]).shape[1] + 6
        outputs = net(audio, lengths, torch.zeros(1, net.state_width))
    assert outputs[0].shape == (1, len(LABELS)) and torch.equal(outputs[4], own)
    with pytest.raises(ValueError, match="reads pitch"):
        net.own_stats(logmel, mask)
    assert net.track_pitch(audio, lengths) is not None and plain.track_pitch(audio, lengths) is None


def test_the_prior_leaves_the_pitch_columns_alone() -> None:
    net = EmotionNet(ModelConfig(**{**TINY.__dict__, "prior_frames": 50.0, "prior_windows": 1.0})).eval()
    own = torch.rand(2, net.state_width) + 1.0
    prior = net.prior_stats(own, torch.zeros_like(own))
    assert isinstance(prior, torch.Tensor) and prior.shape == own.shape
    assert torch.equal(prior[:, -PITCH_STATE_WIDTH:], torch.zeros(2, PITCH_STATE_WIDTH))
    assert (prior[:, : stats_width(TINY.frontend)] != 0).any()


def test_off_by_default_and_configs_written_before_the_option_load_without_it() -> None:
    assert ModelConfig().f0_stats is False
    d = TINY.to_dict()
    del d["f0_stats"]
    assert ModelConfig.from_dict(d).f0_stats is False


def test_the_flag_sets_the_model_config_and_no_recipe_turns_it_on() -> None:
    from training.__main__ import _config, build_parser
    from training.train import RECIPES

    for command in ("cv", "train", "loco", "ased-cv", "crosscorpus"):
        assert _config(build_parser().parse_args([command, "--data", "x", "--f0-stats"])).model.f0_stats is True
        assert _config(build_parser().parse_args([command, "--data", "x"])).model.f0_stats is False
    assert all(recipe["model"]["f0_stats"] is False for recipe in RECIPES.values())


def test_trained_with_pitch_exports_and_the_runtime_carries_its_state(tmp_path) -> None:
    """train -> ONNX (parity checked on export) -> the runtime: three more state columns, filled by voiced speech."""
    pytest.importorskip("onnxruntime")
    from serstream.core.adaptation import SpeakerState
    from serstream.inference.session import EmotionModel
    from tests.training.synthcorpus import train_and_export_tiny

    rc, path, _ = train_and_export_tiny(tmp_path, "--f0-stats")
    assert rc == 0
    (spec,) = json.loads(path.with_suffix(".json").read_text())["state_inputs"]
    model = EmotionModel.load(path)
    (state_spec,) = model.info.state_inputs
    assert spec["width"] == state_spec.width
    state = SpeakerState(state_spec)
    # A little noise under the voice: in bands the voice leaves empty the log-mel's floor, not the gain, would rule.
    noise = 0.002 * np.random.default_rng(0).standard_normal(RATE).astype(np.float32)
    clip = _voice(np.linspace(140.0, 180.0, RATE)) + noise
    out = model.infer(clip[None], np.array([clip.size]), {state_spec.name: state.value()[None]})
    assert out.probs.shape == (1, len(LABELS)) and np.isfinite(out.probs).all()
    row = out.state_updates[state_spec.name][0]
    voiced = row[-1]
    assert voiced > 30  # 1 s of voice: about 48 frames of 20 ms
    mean_semitone = row[-PITCH_STATE_WIDTH] / voiced
    assert abs(mean_semitone - 12 * np.log2(160.0 / 100.0)) < 1.0
    loud = model.infer(clip[None] * 4.0, np.array([clip.size]), {state_spec.name: state.value()[None]})
    np.testing.assert_allclose(loud.probs, out.probs, atol=2e-3)


def test_the_check_against_pyin_agrees_on_a_steady_voice_and_a_missing_corpus_is_one_line(tmp_path, capsys) -> None:
    pytest.importorskip("librosa")
    from training.pitch_check import compare, main

    both, gross, ref, mine, extra = compare(_voice(150.0, seconds=1.5), PitchTracker())
    assert both > 50 and gross == 0 and extra <= 2 and both >= 0.9 * ref
    assert main(["--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pitch_check: error:") and err.count("\n") == 1 and "Traceback" not in err


def test_the_check_against_pyin_counts_an_unreadable_clip_and_goes_on(tmp_path, capsys) -> None:
    pytest.importorskip("librosa")
    import soundfile as sf

    from training.pitch_check import main

    actor = tmp_path / "ravdess" / "Actor_01"
    actor.mkdir(parents=True)
    sf.write(actor / "03-01-05-01-01-01-01.wav", _voice(130.0), RATE)
    (actor / "03-01-04-01-01-01-01.wav").write_bytes(b"RIFF not audio")
    assert main(["--data", str(tmp_path), "--per-speaker", "2"]) == 0
    captured = capsys.readouterr()
    assert "skipped 1 unreadable clip(s)" in captured.err and "Traceback" not in captured.err
    assert "1 clips of ravdess" in captured.out and "| male |" in captured.out
