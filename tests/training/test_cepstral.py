"""The cepstral statistics option of the model: the DCT, what the head sees, old configs, the flag, export."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.fft import dct

from training.model import EmotionNet, ModelConfig, band_statistics, dct_matrix


def test_dct_matrix_is_scipys_orthonormal_dct_ii() -> None:
    x = np.random.default_rng(0).standard_normal((64, 7))
    np.testing.assert_allclose(dct_matrix(64, 20).double().numpy() @ x, dct(x, type=2, norm="ortho", axis=0)[:20],
                               atol=1e-6)
    with pytest.raises(ValueError, match="1..64"):
        dct_matrix(64, 65)


def test_the_head_sees_the_mean_and_std_of_each_coefficient_over_the_valid_frames() -> None:
    torch.manual_seed(0)
    net = EmotionNet(ModelConfig(cepstral_stats=12)).eval()
    plain = EmotionNet(ModelConfig()).eval()
    normed, mask = torch.randn(3, 64, 50), torch.ones(3, 50)
    mask[1, 30:] = 0.0  # a shorter window: its padding must not count
    with torch.no_grad():
        embedding = net.encode(normed, mask)
        width = plain.encode(normed, mask).shape[1]
    assert embedding.shape == (3, width + 2 * 12)
    cepstra = dct(normed[1, :, :30].numpy().astype(np.float64), type=2, norm="ortho", axis=0)[:12]
    np.testing.assert_allclose(embedding[1, width:width + 12].numpy(), cepstra.mean(axis=1), atol=1e-4)
    np.testing.assert_allclose(embedding[1, width + 12:].numpy(), cepstra.std(axis=1), atol=1e-3)
    np.testing.assert_allclose(embedding[1, width - 128:width], band_statistics(normed, mask)[1].numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="needs utterance_stats"):
        EmotionNet(ModelConfig(cepstral_stats=12, utterance_stats=False))


def test_configs_written_before_the_option_load_without_it() -> None:
    d = ModelConfig().to_dict()
    del d["cepstral_stats"]
    assert ModelConfig.from_dict(d).cepstral_stats == 0


def test_the_flag_sets_the_model_config_of_every_training_command() -> None:
    from training.__main__ import _config, build_parser

    for command in ("cv", "train", "loco", "ased-cv", "crosscorpus"):
        v04 = [command, "--data", "x", "--recipe", "v0.4"]
        assert _config(build_parser().parse_args([*v04, "--cepstral-stats", "12"])).model.cepstral_stats == 12
        assert _config(build_parser().parse_args(v04)).model.cepstral_stats == 0
        assert _config(build_parser().parse_args([command, "--data", "x"])).model.cepstral_stats == 20  # v0.6, as v0.5


@pytest.mark.parametrize("value", ["-1", "65", "many"])
def test_an_impossible_coefficient_count_is_one_line(value, tmp_path, capsys) -> None:
    from training.__main__ import main

    with pytest.raises(SystemExit) as exited:  # argparse's usage error, before any corpus is read
        main(["loco", "--data", str(tmp_path), "--out", str(tmp_path / "out"), "--cepstral-stats", value])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"--cepstral-stats: must be 0 (off) to 64 (the log-mel bands), got '{value}'" in err
    assert "Traceback" not in err


def test_a_model_with_cepstral_stats_exports_with_onnx_parity(tmp_path) -> None:
    from training.export import export_onnx

    torch.manual_seed(1)
    path = export_onnx(EmotionNet(ModelConfig(cepstral_stats=20)), tmp_path / "cep.onnx", version="test")
    assert path.is_file() and path.stat().st_size > 100_000
