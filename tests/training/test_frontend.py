"""The log-mel front end and the network around it: features, normalisation, level invariance."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from training.frontend import FrontendConfig, LogMelFrontend, mel_filterbank, stats_width  # noqa: E402
from training.model import EmotionNet, ModelConfig, MultitaskLoss, count_parameters  # noqa: E402

SR = 16_000


def tone(freq: float, seconds: float = 1.0, amp: float = 0.1) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_filterbank_shape_and_unit_area() -> None:
    bank = mel_filterbank(FrontendConfig())
    assert bank.shape == (201, 64)
    np.testing.assert_allclose(bank.sum(axis=0), 1.0, rtol=1e-5)


def test_log_mel_peaks_at_the_tone_band_and_matches_an_fft_reference() -> None:
    front = LogMelFrontend()
    audio = tone(1000.0)
    logmel, mask = front.log_mel(torch.from_numpy(audio)[None], torch.tensor([len(audio)]))
    # reference: numpy framing + rfft with the same window and filterbank
    cfg = front.config
    n_frames = 1 + (len(audio) - cfg.win_length) // cfg.hop_length
    frames = np.stack([audio[i * cfg.hop_length : i * cfg.hop_length + cfg.win_length] for i in range(n_frames)])
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(cfg.win_length) / cfg.win_length)
    power = np.abs(np.fft.rfft(frames * window, axis=1)) ** 2
    reference = np.log(power @ mel_filterbank(cfg) + cfg.log_floor).T
    np.testing.assert_allclose(logmel[0].numpy(), reference, atol=2e-3)
    assert int(mask.sum()) == n_frames
    centre_band = int(np.argmax(reference.mean(axis=1)))
    edges = np.linspace(2595 * np.log10(1 + cfg.f_min / 700), 2595 * np.log10(1 + cfg.f_max / 700), cfg.n_mels + 2)
    hz = 700 * (10 ** (edges / 2595) - 1)
    assert hz[centre_band] < 1000 < hz[centre_band + 2]


def test_padding_does_not_change_own_statistics() -> None:
    front = LogMelFrontend()
    audio = tone(300.0, 0.8)
    padded = np.concatenate([audio, np.zeros(8000, np.float32)])
    alone = front(torch.from_numpy(audio)[None], torch.tensor([len(audio)]), torch.zeros(1, 129))[2]
    batch = front(torch.from_numpy(padded)[None], torch.tensor([len(audio)]), torch.zeros(1, 129))[2]
    # sums over ~50 frames of values near -14: float32 conv rounding differs with input length
    np.testing.assert_allclose(alone.numpy(), batch.numpy(), rtol=1e-4, atol=1e-2)


def test_zero_history_is_per_utterance_normalisation() -> None:
    front = LogMelFrontend()
    rng = np.random.default_rng(0)
    audio = torch.from_numpy((0.05 * rng.standard_normal(SR)).astype(np.float32))[None]
    normed, mask, _ = front(audio, torch.tensor([SR]), torch.zeros(1, stats_width(front.config)))
    valid = normed[0][:, mask[0] > 0]
    np.testing.assert_allclose(valid.mean(dim=1).numpy(), 0.0, atol=1e-4)
    np.testing.assert_allclose(valid.std(dim=1, unbiased=False).numpy(), 1.0, atol=1e-3)


def test_speaker_history_changes_the_normalisation() -> None:
    front = LogMelFrontend()
    quiet, loud = tone(200, amp=0.01), tone(200, amp=0.3)
    lengths = torch.tensor([SR])
    _, _, quiet_stats = front(torch.from_numpy(quiet)[None], lengths, torch.zeros(1, 129))
    with_history, _, _ = front(torch.from_numpy(loud)[None], lengths, quiet_stats)
    without, _, _ = front(torch.from_numpy(loud)[None], lengths, torch.zeros(1, 129))
    # in the tone's band, relative to a quiet history the loud window sits above the speaker's mean
    band = int(np.argmax(quiet_stats[0, :64].numpy()))
    assert float(with_history[0, band].mean()) > 0.5
    assert abs(float(without[0, band].mean())) < 1e-3


def test_network_output_is_invariant_to_recording_level() -> None:
    torch.manual_seed(0)
    model = EmotionNet().eval()
    rng = np.random.default_rng(1)
    speechy = (tone(150, 1.5) + tone(450, 1.5, 0.05) + 0.01 * rng.standard_normal(int(1.5 * SR))).astype(np.float32)
    x = torch.from_numpy(speechy)[None]
    lengths = torch.tensor([x.shape[1]])
    with torch.no_grad():
        base = model(x, lengths, torch.zeros(1, 129))[0]
        louder = model(x * 8.0, lengths, torch.zeros(1, 129))[0]
    np.testing.assert_allclose(torch.softmax(base, 1).numpy(), torch.softmax(louder, 1).numpy(), atol=1e-3)


def test_model_size_and_outputs() -> None:
    model = EmotionNet(ModelConfig()).eval()
    assert count_parameters(model) <= 2_000_000
    with torch.no_grad():
        logits, avd, gender, intensity, stats = model(torch.zeros(3, 24000), torch.tensor([24000, 12000, 400]), torch.zeros(3, 129))
    assert logits.shape == (3, 8) and avd.shape == (3, 3) and gender.shape == (3, 2) and intensity.shape == (3, 2)
    assert stats.shape == (3, 129)
    assert torch.all(avd.abs() <= 1.0)
    assert torch.all(torch.isfinite(logits))


def test_multitask_loss_learns_task_weights_and_ignores_unknown_targets() -> None:
    loss_fn = MultitaskLoss()
    out = {"emotion_logits": torch.randn(4, 8, requires_grad=True), "avd": torch.zeros(4, 3, requires_grad=True),
           "gender_logits": torch.randn(4, 2, requires_grad=True), "intensity_logits": torch.randn(4, 2, requires_grad=True)}
    target = {"emotion": torch.tensor([0, 1, 2, 3]), "avd": torch.zeros(4, 3),
              "gender": torch.tensor([-1, -1, -1, -1]), "intensity": torch.tensor([0, 1, -1, -1])}
    total, parts = loss_fn(out, target)
    assert parts["gender"] == 0.0 and parts["intensity"] > 0.0
    total.backward()
    assert loss_fn.log_vars.grad is not None and torch.all(torch.isfinite(loss_fn.log_vars.grad))


@pytest.mark.parametrize("encoder", ["cnn2d", "sepcnn2d"])
def test_padded_row_scores_as_it_would_alone(encoder: str) -> None:
    """Zero padding in a batch must not change a row's outputs (the monitor pads every batch)."""
    torch.manual_seed(0)
    model = EmotionNet(ModelConfig(encoder=encoder)).eval()
    audio = 0.1 * torch.randn(2, 48000)
    lengths = torch.tensor([48000, 30000])
    stats = torch.zeros(2, 129)
    with torch.no_grad():
        batched = model(audio, lengths, stats)[0]
        alone = model(audio[1:, :30000], lengths[1:], stats[1:])[0]
    assert torch.allclose(batched[1], alone[0], atol=1e-4)


def test_configs_from_before_the_encoder_field_load_as_the_v010_network() -> None:
    old = ModelConfig(encoder="sepcnn2d").to_dict()
    for key in ("encoder", "cnn_channels", "cnn_pools", "utterance_stats"):
        old.pop(key)
    loaded = ModelConfig.from_dict(old)
    assert loaded.encoder == "sepcnn2d" and not loaded.utterance_stats
    assert ModelConfig.from_dict(ModelConfig().to_dict()) == ModelConfig()
    with pytest.raises(ValueError, match="unknown encoder"):
        EmotionNet(ModelConfig(encoder="transformer"))


@pytest.mark.parametrize("win_length, hop_length", [(400, 160), (512, 160), (401, 160), (320, 80)])
def test_split_and_direct_dft_match_numpy_rfft(win_length: int, hop_length: int) -> None:
    """The two-stage (Cooley-Tukey) DFT and the direct one both give numpy's log-mel, padded rows included."""
    cfg = FrontendConfig(win_length=win_length, hop_length=hop_length)
    front = LogMelFrontend(cfg)
    assert (front.split is None) == (win_length == 401)
    rng = np.random.default_rng(win_length)
    audio = (0.1 * rng.standard_normal(SR + 37)).astype(np.float32)
    padded = np.concatenate([audio, np.zeros(1234, np.float32)])
    batch = torch.from_numpy(np.stack([padded, padded]))
    batch[0, : len(audio)] *= 0.5
    logmel, mask = front.log_mel(batch, torch.tensor([len(padded), len(audio)]))
    n_frames = 1 + (len(audio) - win_length) // hop_length
    frames = np.stack([audio[i * hop_length : i * hop_length + win_length] for i in range(n_frames)]).astype(np.float64)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win_length) / win_length)
    power = np.abs(np.fft.rfft(frames * window, axis=1)) ** 2
    reference = np.log(power @ mel_filterbank(cfg).astype(np.float64) + cfg.log_floor).T
    np.testing.assert_allclose(logmel[1, :, :n_frames].numpy(), reference, atol=1e-3)
    assert int(mask[1].sum()) == n_frames


def test_dft_split_factors() -> None:
    from training.frontend import dft_split

    assert dft_split(400, 160) == (20, 20)
    assert dft_split(512, 160) == (32, 16)  # the second factor must divide the hop
    assert dft_split(401, 160) is None  # prime: direct DFT
    assert dft_split(400, 7) is None  # no common factor with the hop
