"""The population prior (``ModelConfig.prior_frames`` / ``prior_windows``): a typical training speaker's
statistics added to every speaker's as pseudo-counts, so that a first window is not normalised against
itself alone. What it keeps at cold start, that a gain still cancels, that it fades with history, how
training sets it, the flags, and export with the runtime's state."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from serstream.contract import LABELS
from training.frontend import stats_width
from training.model import EmotionNet, ModelConfig

K = 6
TINY = ModelConfig(cnn_channels=(8, 8, 16, 16), embed_dim=32, attention_dim=16, cepstral_stats=K,
                   speaker_window_stats=True)
PRIOR = ModelConfig(**{**TINY.__dict__, "prior_frames": 50.0, "prior_windows": 1.0})
M = TINY.frontend.n_mels


def _clip(seconds: float = 0.8, f0: float = 150.0, tilt: float = 1.0, seed: int = 0) -> np.ndarray:
    """A harmonic sound whose spectral tilt (1: falling as 1/k) sets its band shape, its level rising and
    falling four times a second as syllables do (so each band varies over time as in speech)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16_000)) / 16_000
    syllables = 1.0 + 0.9 * np.sin(2 * np.pi * 4.0 * t + seed)
    sig = sum(np.sin(2 * np.pi * k * f0 * t) / k**tilt for k in range(1, 30)) * 0.05 * syllables
    return (sig + 0.002 * rng.standard_normal(t.size)).astype(np.float32)


def _with_prior(net: EmotionNet, seed: int = 1) -> EmotionNet:
    """Give the prior's buffers some typical-looking values (training sets them from its speakers)."""
    rng = np.random.default_rng(seed)
    shape = rng.normal(0.0, 1.0, M)
    net.prior_band_shape.copy_(torch.from_numpy((shape - shape.mean()).astype(np.float32)))
    net.prior_band_var.copy_(torch.from_numpy(rng.uniform(0.5, 2.0, M).astype(np.float32)))
    if net.config.prior_windows:
        net.prior_window_mean.copy_(torch.from_numpy(rng.normal(0.0, 3.0, 2 * K).astype(np.float32)))
        net.window_std_floor.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, 2 * K).astype(np.float32)))
    return net.eval()


def _normalise(net: EmotionNet, clip: np.ndarray, history: torch.Tensor | None = None):
    logmel, mask = net.frontend.log_mel(torch.from_numpy(clip[None]), torch.tensor([clip.size]))
    own = net.own_stats(logmel, mask)
    normed, z = net.normalise(logmel, mask, own, torch.zeros_like(own) if history is None else history)
    return logmel[0], mask[0], own[0], normed[0], z


def test_off_by_default_and_configs_written_before_the_option_load_without_it() -> None:
    assert (ModelConfig().prior_frames, ModelConfig().prior_windows) == (0.0, 0.0)
    d = TINY.to_dict()
    del d["prior_frames"], d["prior_windows"]
    assert ModelConfig.from_dict(d) == TINY
    net = EmotionNet(TINY)
    assert net.prior_stats(torch.ones(2, net.state_width), torch.zeros(2, net.state_width)) == 0.0
    assert not any("prior" in name for name in net.state_dict())
    with pytest.raises(ValueError, match="needs speaker_window_stats"):
        EmotionNet(ModelConfig(prior_windows=1.0))
    with pytest.raises(ValueError, match="pseudo-counts"):
        EmotionNet(ModelConfig(prior_frames=-1.0))


@torch.no_grad()
def test_a_first_window_keeps_its_band_shape_against_the_prior_in_proportion_n0_over_n_plus_n0() -> None:
    net = _with_prior(EmotionNet(PRIOR))
    logmel, mask, own, normed, _ = _normalise(net, _clip())
    frames = float(mask.sum())
    valid = logmel[:, mask > 0].double().numpy()
    own_mean = valid.mean(axis=1)
    shape = own_mean - own_mean.mean()
    weight = PRIOR.prior_frames / (frames + PRIOR.prior_frames)
    # Normalised band means, times each band's std, are the window's shape less the prior's, shrunk by n0/(n+n0).
    prior_mu = net.prior_band_shape.double().numpy() + own_mean.mean()
    pooled_mean = (frames * own_mean + PRIOR.prior_frames * prior_mu) / (frames + PRIOR.prior_frames)
    pooled_sq = (frames * (valid**2).mean(axis=1)
                 + PRIOR.prior_frames * (net.prior_band_var.double().numpy() + prior_mu**2)) / (frames + PRIOR.prior_frames)
    std = np.sqrt(np.maximum(pooled_sq - pooled_mean**2, PRIOR.frontend.min_std**2))
    got = normed[:, mask > 0].double().numpy().mean(axis=1) * std
    np.testing.assert_allclose(got, weight * (shape - net.prior_band_shape.double().numpy()), atol=2e-3)
    # Without the prior the same window is compared with itself: nothing of its shape is left.
    plain = EmotionNet(TINY).eval()
    *_, normed_plain, _ = _normalise(plain, _clip())
    assert np.abs(normed_plain[:, mask > 0].double().numpy().mean(axis=1)).max() < 1e-3
    assert np.abs(got).max() > 0.1


@torch.no_grad()
def test_with_the_prior_a_recordings_gain_still_cancels_and_a_brighter_voice_reads_differently() -> None:
    torch.manual_seed(0)
    net = _with_prior(EmotionNet(PRIOR))
    clip = _clip()
    zeros = torch.zeros(1, net.state_width)

    def logits(audio: np.ndarray) -> np.ndarray:
        return net(torch.from_numpy(audio[None]), torch.tensor([audio.size]), zeros)[0][0].numpy()

    np.testing.assert_allclose(logits(clip * 4.0), logits(clip), atol=2e-3)  # +12 dB: same reading
    assert np.abs(logits(_clip(tilt=0.5)) - logits(clip)).max() > 1e-2  # another spectral shape: another one


@torch.no_grad()
def test_the_prior_fades_as_the_speakers_history_grows() -> None:
    with_prior = _with_prior(EmotionNet(PRIOR))
    without = EmotionNet(TINY).eval()
    without.window_std_floor.copy_(with_prior.window_std_floor)
    clip = _clip()
    history = sum(_normalise(without, _clip(seed=s, f0=120.0 + 10 * s))[2] for s in range(3))
    gaps = []
    for scale in (1.0, 10.0, 100.0):  # 2.4 s of history (234 frames against the prior's 50), then 10x, 100x
        h = (history * scale).unsqueeze(0)
        gaps.append(float((_normalise(with_prior, clip, h)[3] - _normalise(without, clip, h)[3]).abs().mean()))
    # The mean difference shrinks about as n0 / (n + n0) does (0.18 -> 0.021 -> 0.0021).
    assert gaps[0] > 0.1 and gaps[1] < 0.6 * gaps[0] and gaps[2] < 0.15 * gaps[0], gaps


@torch.no_grad()
def test_cold_only_the_prior_reads_a_first_window_and_leaves_every_later_one_as_without_it() -> None:
    always = _with_prior(EmotionNet(PRIOR))
    cold = EmotionNet(ModelConfig(**{**PRIOR.__dict__, "prior_cold_only": True})).eval()
    cold.load_state_dict(always.state_dict())
    without = EmotionNet(TINY).eval()
    without.window_std_floor.copy_(always.window_std_floor)
    clip = _clip()
    first = [_normalise(net, clip) for net in (cold, always)]
    assert torch.equal(first[0][3], first[1][3]) and torch.equal(first[0][4], first[1][4])
    history = _normalise(without, _clip(seed=2, f0=130.0))[2].unsqueeze(0)  # one earlier utterance
    later = [_normalise(net, clip, history) for net in (cold, without, always)]
    assert torch.equal(later[0][3], later[1][3]) and torch.equal(later[0][4], later[1][4])
    assert float((later[2][3] - later[1][3]).abs().max()) > 0.05  # added always, it would still move them
    # In one batch each row goes by its own history: row 0 cold (as with the prior), row 1 warm (as without).
    audio, lengths = torch.from_numpy(np.stack([clip, clip])), torch.tensor([clip.size, clip.size])
    state = torch.cat([torch.zeros_like(history), history])
    logits = cold(audio, lengths, state)[0]
    torch.manual_seed(0)
    assert torch.allclose(logits[0], always(audio[:1], lengths[:1], state[:1])[0][0], atol=1e-5)
    without.load_state_dict({k: v for k, v in always.state_dict().items() if not k.startswith("prior_")})
    assert torch.allclose(logits[1], without(audio[1:], lengths[1:], state[1:])[0][0], atol=1e-5)


@torch.no_grad()
def test_window_statistics_of_a_first_window_are_scored_against_the_typical_ones_except_the_level() -> None:
    net = _with_prior(EmotionNet(PRIOR))
    _, _, own, _, z = _normalise(net, _clip())
    frame = stats_width(PRIOR.frontend)
    window = own[frame : frame + 2 * K].double().numpy()
    typical = net.prior_window_mean.double().numpy().copy()
    typical[0] = window[0]  # the mean of c0 (the level) is the window's own
    w0 = PRIOR.prior_windows
    mean = (window + w0 * typical) / (1 + w0)
    floor = net.window_std_floor.double().numpy()
    var = (window**2 + w0 * (floor**2 + typical**2)) / (1 + w0) - mean**2
    expected = (window - mean) / np.maximum(np.sqrt(np.maximum(var, 0.0)), floor)
    np.testing.assert_allclose(z[0].double().numpy(), expected, rtol=1e-3, atol=1e-3)
    assert abs(float(z[0, 0])) < 1e-4 and np.abs(expected[1:]).max() > 0.1
    # Without prior_windows a first window's statistics carry nothing (z = 0), as in v0.5.0.
    frames_only = _with_prior(EmotionNet(ModelConfig(**{**TINY.__dict__, "prior_frames": 50.0})))
    assert float(_normalise(frames_only, _clip())[4].abs().max()) < 1e-4


def test_training_sets_the_prior_from_its_speakers_with_corpora_weighted_equally(trained) -> None:
    from training.train import set_population_prior

    corpus, *_ = trained
    net = EmotionNet(PRIOR).eval()
    speakers = ["ravdess:05", "ravdess:06", "ravdess:07", "tess:OAF"]
    assert set(speakers) <= set(corpus.speaker.tolist())
    rows = np.flatnonzero(np.isin(corpus.speaker, speakers))
    prior = set_population_prior(net, corpus, rows, seed=0, per_speaker=1000)  # every clip of each speaker
    shapes, variances, windows = {}, {}, {}
    frame = stats_width(PRIOR.frontend)
    for name in speakers:
        mine = rows[corpus.speaker[rows] == name]
        frames, stats = [], []
        for i in mine:
            clip = corpus.clip(int(i))
            logmel, mask = net.frontend.log_mel(torch.from_numpy(clip[None]), torch.tensor([clip.size]))
            frames.append(logmel[0][:, mask[0] > 0].double().numpy())
            stats.append(net.own_stats(logmel, mask)[0, frame : frame + 2 * K].double().numpy())
        allf = np.concatenate(frames, axis=1)
        shapes[name] = allf.mean(axis=1) - allf.mean()
        variances[name] = allf.var(axis=1)
        windows[name] = np.mean(stats, axis=0)
    ravdess = np.mean([shapes[s] for s in speakers[:3]], axis=0)
    expected_shape = (ravdess + shapes["tess:OAF"]) / 2  # one TESS speaker weighs as much as three RAVDESS ones
    np.testing.assert_allclose(prior["band_shape"], expected_shape, atol=2e-3)
    np.testing.assert_allclose(prior["band_var"], np.median([variances[s] for s in speakers], axis=0), rtol=5e-3,
                               atol=1e-3)
    expected_window = (np.mean([windows[s] for s in speakers[:3]], axis=0) + windows["tess:OAF"]) / 2
    np.testing.assert_allclose(prior["window_mean"], expected_window, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(net.prior_band_shape.numpy(), prior["band_shape"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(net.prior_window_mean.numpy(), prior["window_mean"], rtol=1e-5, atol=1e-6)


def test_the_flags_set_the_config_and_bad_values_fail_before_any_corpus_is_read(tmp_path, capsys) -> None:
    from training.__main__ import _config, build_parser, main

    model = _config(build_parser().parse_args(["loco", "--data", "x", "--prior-frames", "200",
                                               "--prior-windows", "1"])).model
    assert (model.prior_frames, model.prior_windows) == (200.0, 1.0)
    default = _config(build_parser().parse_args(["cv", "--data", "x"])).model  # --recipe v0.6, v0.6.0's
    assert (default.prior_frames, default.prior_windows, default.prior_cold_only) == (200.0, 1.0, False)
    assert _config(build_parser().parse_args(["cv", "--data", "x", "--recipe", "v0.5"])).model.prior_frames == 0.0
    # without window statistics the recipe's window prior is dropped with them; the frame prior stays
    bare = _config(build_parser().parse_args(["cv", "--data", "x", "--no-speaker-window-stats"])).model
    assert (bare.prior_frames, bare.prior_windows) == (200.0, 0.0)
    cold = _config(build_parser().parse_args(["cv", "--data", "x", "--prior-frames", "200", "--prior-cold-only"]))
    assert cold.model.prior_cold_only is True
    for argv, message in ((["--prior-frames", "-3"], "must be a count of 0"),
                          (["--recipe", "v0.5", "--prior-cold-only"], "--prior-cold-only needs"),
                          (["--recipe", "v0.4", "--prior-windows", "1"], "--prior-windows needs"),
                          (["--no-speaker-window-stats", "--prior-windows", "1"], "--prior-windows needs")):
        with pytest.raises(SystemExit) as exited:
            main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "o"), *argv])
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, argv


def test_trained_with_the_prior_exports_and_a_cold_window_reads_against_it(tmp_path) -> None:
    """train -> ONNX (parity checked on export): the prior is in the graph, the state row is unchanged."""
    pytest.importorskip("onnxruntime")
    from serstream.core.adaptation import SpeakerState
    from serstream.inference.session import EmotionModel
    from tests.training.synthcorpus import train_and_export_tiny

    rc, path, run = train_and_export_tiny(tmp_path, "--cepstral-stats", str(K), "--speaker-window-stats", "--prior-frames", "50",
                                         "--prior-windows", "1")
    assert rc == 0
    (spec,) = json.loads(path.with_suffix(".json").read_text())["state_inputs"]
    assert spec["width"] == stats_width(TINY.frontend) + 4 * K + 1  # the prior adds nothing to the state
    state_dict = torch.load(run / "model.pt", map_location="cpu", weights_only=False)
    weights = state_dict.get("model", state_dict) if isinstance(state_dict, dict) else state_dict
    shape = weights["prior_band_shape"].numpy()
    assert abs(float(shape.mean())) < 1e-4 and np.abs(shape).max() > 0.1  # set from the speakers, not zeros
    model = EmotionModel.load(path)
    (state_spec,) = model.info.state_inputs
    state = SpeakerState(state_spec)
    clip = _clip(seconds=1.0)
    out = model.infer(clip[None], np.array([clip.size]), {state_spec.name: state.value()[None]})
    assert out.probs.shape == (1, len(LABELS)) and np.isfinite(out.probs).all()
    loud = model.infer(clip[None] * 4.0, np.array([clip.size]), {state_spec.name: state.value()[None]})
    np.testing.assert_allclose(loud.probs, out.probs, atol=2e-3)
