"""The --speaker-window-stats model option: window statistics of the raw log-mel z-scored
against the speaker's earlier windows, carried in the speaker state; the std floor training
sets; the flag; export and the runtime's own state keeping."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.fft import dct

from serstream.contract import LABELS
from training.frontend import stats_width
from training.metrics import median_within_speaker_std
from training.model import EmotionNet, ModelConfig

K = 6
TINY = ModelConfig(cnn_channels=(8, 8, 16, 16), embed_dim=32, attention_dim=16, cepstral_stats=K,
                   speaker_window_stats=True)


def _clips(n: int, seconds: float = 0.8, seed: int = 0) -> list[np.ndarray]:
    """Harmonic sounds of one 'speaker' at different pitches and levels."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16_000)) / 16_000
    out = []
    for i in range(n):
        f0 = 140.0 * (1 + 0.15 * i)
        sig = sum(np.sin(2 * np.pi * k * f0 * t) / k for k in range(1, 6)) * (0.05 + 0.03 * i)
        out.append((sig + 0.003 * rng.standard_normal(t.size)).astype(np.float32))
    return out


def _raw_window_stats(net: EmotionNet, clip: np.ndarray) -> np.ndarray:
    """Mean and std over frames of the first K cepstra of the raw log-mel, with scipy's DCT."""
    logmel, _ = net.frontend.log_mel(torch.from_numpy(clip[None]), torch.tensor([clip.size]))
    cepstra = dct(logmel[0].double().numpy(), type=2, norm="ortho", axis=0)[:K]
    return np.concatenate([cepstra.mean(axis=1), cepstra.std(axis=1)])


def _window_z(net: EmotionNet, clip: np.ndarray, history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logmel, mask = net.frontend.log_mel(torch.from_numpy(clip[None]), torch.tensor([clip.size]))
    own = net.own_stats(logmel, mask)
    _, z = net.normalise(logmel, mask, own, history)
    assert z is not None
    return z[0], own


def test_state_row_is_frame_sums_then_window_sums_squares_and_count() -> None:
    net = EmotionNet(TINY).eval()
    assert net.state_width == stats_width(TINY.frontend) + 4 * K + 1
    assert EmotionNet(ModelConfig()).state_width == stats_width(TINY.frontend)  # v0.4.0's row, unchanged
    clip = _clips(1)[0]
    with torch.no_grad():
        own = net(torch.from_numpy(clip[None]), torch.tensor([clip.size]), torch.zeros(1, net.state_width))[4][0]
    frame = stats_width(TINY.frontend)
    window = _raw_window_stats(net, clip)
    np.testing.assert_allclose(own[frame:frame + 2 * K].numpy(), window, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(own[frame + 2 * K:frame + 4 * K].numpy(), window**2, rtol=2e-3, atol=1e-3)
    assert float(own[-1]) == 1.0


def test_window_z_is_each_window_against_the_speakers_windows_so_far_itself_included() -> None:
    net = EmotionNet(TINY).eval()
    floor = np.linspace(0.05, 2.0, 2 * K)  # some statistics floored, some not
    net.window_std_floor.copy_(torch.from_numpy(floor.astype(np.float32)))
    clips = _clips(5)
    raw = np.stack([_raw_window_stats(net, c) for c in clips])
    history = torch.zeros(1, net.state_width)
    floored = 0
    with torch.no_grad():
        for i, clip in enumerate(clips):
            z, own = _window_z(net, clip, history)
            seen = raw[: i + 1]
            std = seen.std(axis=0)
            floored += int((std < floor).sum())
            expected = (raw[i] - seen.mean(axis=0)) / np.maximum(std, floor)
            np.testing.assert_allclose(z.numpy(), expected, rtol=2e-3, atol=2e-3)
            if i == 0:  # a speaker's first window is compared with itself only: no evidence either way
                assert torch.count_nonzero(z) == 0
            history = history + own
    assert 0 < floored < 4 * 2 * K  # the floor bit on some statistics of the later windows, not on all


def test_the_head_sees_the_window_z_and_the_model_without_it_is_refused() -> None:
    net = EmotionNet(TINY).eval()
    plain = EmotionNet(ModelConfig(cnn_channels=(8, 8, 16, 16), embed_dim=32, attention_dim=16, cepstral_stats=K)).eval()
    normed, mask = torch.randn(2, 64, 40), torch.ones(2, 40)
    z = torch.randn(2, 2 * K)
    with torch.no_grad():
        embedding = net.encode(normed, mask, window_features=z)
        width = plain.encode(normed, mask).shape[1]
    assert embedding.shape == (2, width + 2 * K)
    assert torch.equal(embedding[:, width:], z)
    with pytest.raises(ValueError, match="window features"):
        net.encode(normed, mask)
    with pytest.raises(ValueError, match="needs cepstral_stats"):
        EmotionNet(ModelConfig(speaker_window_stats=True))


def test_configs_written_before_the_option_load_without_it() -> None:
    d = ModelConfig().to_dict()
    del d["speaker_window_stats"]
    assert ModelConfig.from_dict(d).speaker_window_stats is False


def test_median_within_speaker_std() -> None:
    features = np.array([[0.0, 1.0], [2.0, 1.0], [0.0, 0.0], [4.0, 0.0], [1.0, 5.0], [1.0, 7.0]])
    speakers = ["a", "a", "b", "b", "c", "c"]
    np.testing.assert_allclose(median_within_speaker_std(features, speakers), [1.0, 0.0])  # stds [1,0] [2,0] [0,1]
    with pytest.raises(ValueError, match="one speaker per row"):
        median_within_speaker_std(features, speakers[:-1])


def test_training_sets_the_floor_from_its_speakers(trained) -> None:
    from training.train import set_window_std_floor

    corpus, *_ = trained
    net = EmotionNet(TINY).eval()
    rows = np.flatnonzero(np.isin(corpus.speaker, ["ravdess:05", "ravdess:06", "ravdess:07"]))
    floor = set_window_std_floor(net, corpus, rows, seed=0, per_speaker=1000)  # every clip of each speaker
    raw = np.stack([_raw_window_stats(net, corpus.clip(int(i))) for i in rows])
    np.testing.assert_allclose(floor, median_within_speaker_std(raw, corpus.speaker[rows]), rtol=2e-3, atol=1e-4)
    np.testing.assert_allclose(net.window_std_floor.numpy(), floor, rtol=1e-6)


def test_the_flag_needs_cepstral_stats_and_sets_the_config(tmp_path, capsys) -> None:
    from training.__main__ import _config, build_parser, main

    def model_of(*argv: str):
        return _config(build_parser().parse_args(list(argv))).model

    model = model_of("loco", "--data", "x", "--recipe", "v0.4", "--cepstral-stats", "12", "--speaker-window-stats")
    assert model.cepstral_stats == 12 and model.speaker_window_stats is True
    assert model_of("cv", "--data", "x", "--recipe", "v0.4").speaker_window_stats is False
    # the default recipe (v0.6, as v0.5) sets both; each can be turned off on its own
    default = model_of("cv", "--data", "x")
    assert (default.cepstral_stats, default.speaker_window_stats) == (20, True)
    off = model_of("cv", "--data", "x", "--no-speaker-window-stats")
    assert (off.cepstral_stats, off.speaker_window_stats) == (20, False)
    for argv in (["--recipe", "v0.4", "--speaker-window-stats"], ["--cepstral-stats", "0"]):
        with pytest.raises(SystemExit) as exited:  # before any corpus is read
            main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "o"), *argv])
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert "--speaker-window-stats needs --cepstral-stats" in err and "Traceback" not in err, argv


def test_trained_with_the_option_exports_and_the_runtime_keeps_its_state(tmp_path) -> None:
    """train -> ONNX (parity checked on export) -> the runtime's SpeakerState over a stream of windows."""
    pytest.importorskip("onnxruntime")
    from serstream.core.adaptation import SpeakerState
    from serstream.inference.session import EmotionModel
    from tests.training.synthcorpus import train_and_export_tiny

    rc, path, run = train_and_export_tiny(tmp_path, "--cepstral-stats", str(K), "--speaker-window-stats")
    assert rc == 0
    sidecar = json.loads(path.with_suffix(".json").read_text())
    (spec,) = sidecar["state_inputs"]
    width = stats_width(TINY.frontend) + 4 * K + 1
    assert spec["width"] == width and spec["count_index"] == stats_width(TINY.frontend) - 1  # the frame count
    model = EmotionModel.load(path)
    (state_spec,) = model.info.state_inputs
    state = SpeakerState(state_spec)
    clips = _clips(3, seconds=1.0)
    for clip in clips:
        out = model.infer(clip[None], np.array([clip.size]), {state_spec.name: state.value()[None]})
        assert out.probs.shape == (1, len(LABELS)) and np.isfinite(out.probs).all()
        state.update(out.state_updates[state_spec.name])
    assert state.updates == 3 and state.value()[-1] == pytest.approx(3.0)  # three windows counted
    cold = model.infer(clips[-1][None], np.array([clips[-1].size]))
    assert not np.allclose(cold.probs, out.probs, atol=1e-4)  # the speaker's history changes the reading
