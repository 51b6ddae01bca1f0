"""EmotionModel: loading, contract checks, calibration, padding, state, provider choice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from serstream.contract import LABELS, ContractError
from serstream.inference.session import (
    DeviceError,
    EmotionModel,
    InferenceError,
    InferenceOutput,
    cuda_check,
    cuda_usable,
    describe_device,
    pad_batch,
    softmax,
)
from tests.modelfactory import (
    BROKEN_PROBLEMS,
    STATE_NAME,
    STATE_OUTPUT,
    build_broken_model,
    build_test_model,
    expected_features,
    tone,
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def plain_model(model_dir: Path) -> EmotionModel:
    return EmotionModel.load(build_test_model(model_dir / "plain.onnx"), device="cpu", threads=1)


@pytest.fixture(scope="module")
def state_model(model_dir: Path) -> EmotionModel:
    path = build_test_model(model_dir / "state.onnx", with_state=True)
    return EmotionModel.load(path, device="cpu", threads=1)


LOUD = tone(1.0, rms=0.3)
QUIET = tone(0.8, rms=0.003)
MEDIUM = tone(0.6, rms=0.03)


# ------------------------------------------------------------------ loading


def test_load_reads_metadata(plain_model: EmotionModel) -> None:
    info = plain_model.info
    assert info.labels == LABELS
    assert info.temperature == 1.5
    assert info.window_s == 2.0
    assert info.version == "test-1"
    assert info.state_inputs == ()
    assert info.extra["training_data"].startswith("none")


def test_cpu_session_reports_cpu(plain_model: EmotionModel) -> None:
    assert plain_model.providers[-1] == "CPUExecutionProvider"
    assert plain_model.device == "cpu"
    assert "CUDAExecutionProvider" not in plain_model.providers


def test_auto_device_matches_what_the_session_got(model_dir: Path) -> None:
    model = EmotionModel.load(build_test_model(model_dir / "auto.onnx"), device="auto")
    expected = "cuda" if cuda_usable() else "cpu"
    assert model.device == expected
    assert ("CUDAExecutionProvider" in model.providers) == (expected == "cuda")


def test_captured_stderr_takes_what_c_code_writes_to_fd_2() -> None:
    """The capture used around ONNX Runtime's CUDA set-up: fd-level, restored afterwards."""
    probe = (
        "import os, sys\n"
        "from serstream.inference.session import captured_stderr\n"
        "got = []\n"
        "with captured_stderr(got):\n"
        "    os.write(2, b'[E:onnxruntime] libcudnn.so.9: cannot open shared object file\\n')\n"
        "    print('python stderr too', file=sys.stderr)\n"
        "print('after', file=sys.stderr)\n"
        "print(repr(got[0]))\n"
    )
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(repo), str(repo / "clients/python/src")]))
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "after\n"  # nothing leaked, and fd 2 works again
    assert "libcudnn.so.9: cannot open" in proc.stdout and "python stderr too" in proc.stdout


def test_the_provider_and_why_not_cuda_are_reported(model_dir: Path) -> None:
    path = build_test_model(model_dir / "provider.onnx")
    cpu = EmotionModel.load(path, device="cpu")
    assert (cpu.provider, cpu.device_note) == ("CPUExecutionProvider", "")
    assert describe_device(cpu) == "cpu (CPUExecutionProvider)"
    auto = EmotionModel.load(path, device="auto")
    check = cuda_check()
    assert auto.provider == auto.providers[0]
    if check.usable:
        assert auto.provider == "CUDAExecutionProvider" and auto.device_note == ""
    else:
        assert check.reason and "\n" not in check.reason
        assert auto.device_note == check.reason
        assert describe_device(auto) == f"cpu (CPUExecutionProvider; CUDA not used: {check.reason})"


@pytest.mark.skipif(cuda_usable(), reason="this machine has a usable GPU")
def test_cuda_without_gpu_is_one_line_error(model_dir: Path) -> None:
    with pytest.raises(DeviceError) as info:
        EmotionModel.load(build_test_model(model_dir / "cuda.onnx"), device="cuda")
    assert "\n" not in str(info.value)
    assert "cuda" in str(info.value)


def test_unknown_device_is_rejected(model_dir: Path) -> None:
    with pytest.raises(DeviceError, match="unknown device 'tpu'"):
        EmotionModel.load(build_test_model(model_dir / "tpu.onnx"), device="tpu")


def test_loading_on_cpu_prints_nothing(model_dir: Path) -> None:
    """onnxruntime-gpu must not spam CUDA errors on a machine without a GPU."""
    path = build_test_model(model_dir / "quiet.onnx")
    code = (
        "from serstream.inference.session import EmotionModel, pad_batch\n"
        "import numpy as np\n"
        f"m = EmotionModel.load({str(path)!r})\n"
        "a, l = pad_batch([np.zeros(1600, np.float32)])\n"
        "m.infer(a, l)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert done.stderr == ""


def test_sidecar_supplies_metadata(model_dir: Path) -> None:
    path = build_test_model(model_dir / "sidecar.onnx", temperature=2.5, metadata="sidecar")
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert isinstance(sidecar["labels"], list)  # native JSON, not a string
    model = EmotionModel.load(path, device="cpu")
    assert model.info.temperature == 2.5
    assert model.info.labels == LABELS


def test_props_win_over_sidecar(model_dir: Path) -> None:
    path = build_test_model(model_dir / "both.onnx", temperature=1.5, metadata="both")
    data = json.loads(path.with_suffix(".json").read_text())
    data["temperature"] = 9.0
    data["cv_results"] = {"uar": 0.5}
    path.with_suffix(".json").write_text(json.dumps(data))
    model = EmotionModel.load(path, device="cpu")
    assert model.info.temperature == 1.5
    assert json.loads(model.info.extra["cv_results"]) == {"uar": 0.5}


@pytest.mark.parametrize(
    ("problem", "expected"),
    [
        ("missing_output", "no output 'gender_logits'"),
        ("wrong_labels", "7 labels"),
        ("missing_state_input", "no state input 'speaker_stats'"),
        ("no_contract", "contract version 0"),
        ("wrong_rank", "'avd' has rank 3"),
        ("unknown_input", "input 'mystery'"),
    ],
)
def test_broken_models_are_one_line_contract_errors(
    model_dir: Path, problem: str, expected: str
) -> None:
    path = build_broken_model(model_dir / f"broken_{problem}.onnx", problem)
    with pytest.raises(ContractError) as info:
        EmotionModel.load(path, device="cpu")
    message = str(info.value)
    assert expected in message
    assert str(path) in message
    assert "\n" not in message


def test_every_broken_problem_is_tested() -> None:
    assert set(BROKEN_PROBLEMS) == {
        "missing_output", "wrong_labels", "missing_state_input", "no_contract", "wrong_rank",
        "unknown_input",
    }


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ContractError) as info:
        EmotionModel.load(tmp_path / "absent.onnx")
    assert str(info.value) == f"{tmp_path / 'absent.onnx'}: model file not found"


def test_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.onnx"
    path.write_bytes(b"\x08\x07this is not a protobuf" * 10)
    with pytest.raises(ContractError) as info:
        EmotionModel.load(path, device="cpu")
    message = str(info.value)
    assert message.startswith(f"{path}: cannot load ONNX model")
    assert "\n" not in message
    assert "[ONNXRuntimeError]" not in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_corrupt_sidecar(model_dir: Path) -> None:
    path = build_test_model(model_dir / "badside.onnx")
    path.with_suffix(".json").write_text("{not json")
    try:
        with pytest.raises(ContractError, match="unreadable metadata sidecar"):
            EmotionModel.load(path, device="cpu")
    finally:
        path.with_suffix(".json").unlink()


# ------------------------------------------------------------------ inference


def test_outputs_follow_the_audio(plain_model: EmotionModel) -> None:
    audio, lengths = pad_batch([LOUD, QUIET, MEDIUM])
    out = plain_model.infer(audio, lengths)
    assert isinstance(out, InferenceOutput)
    assert out.probs.shape == (3, 8) and out.avd.shape == (3, 3)
    assert out.gender_probs.shape == (3, 2)
    labels = [LABELS[i] for i in out.probs.argmax(axis=1)]
    assert labels == ["angry", "sad", "neutral"]
    np.testing.assert_allclose(out.probs.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(out.gender_probs.sum(axis=1), 1.0, atol=1e-6)
    # arousal = tanh(log10(rms) + 1.5)
    for row, clip in enumerate((LOUD, QUIET, MEDIUM)):
        level, _ = expected_features(clip)
        assert out.avd[row, 0] == pytest.approx(np.tanh(level + 1.5), abs=1e-4)
    assert out.state_updates == {}
    assert set(out.raw) == {"emotion_logits", "avd", "gender_logits"}


def test_gender_follows_pitch(plain_model: EmotionModel) -> None:
    audio, lengths = pad_batch([tone(0.5, rms=0.05, freq=150), tone(0.5, rms=0.05, freq=1200)])
    out = plain_model.infer(audio, lengths)
    assert out.gender_probs[0, 1] > 0.5  # male
    assert out.gender_probs[1, 0] > 0.5  # female


def test_probs_are_softmax_of_logits_over_temperature(plain_model: EmotionModel) -> None:
    audio, lengths = pad_batch([LOUD, QUIET])
    out = plain_model.infer(audio, lengths)
    logits = out.raw["emotion_logits"].astype(np.float64)
    z = logits / 1.5
    expected = np.exp(z - z.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(out.probs, expected, rtol=1e-5, atol=1e-7)
    # Calibration flattens: the top probability is lower than at T = 1.
    assert (out.probs.max(axis=1) < softmax(logits).max(axis=1)).all()


def test_temperature_comes_from_metadata(model_dir: Path) -> None:
    hot = EmotionModel.load(build_test_model(model_dir / "hot.onnx", temperature=4.0), device="cpu")
    cold = EmotionModel.load(build_test_model(model_dir / "cold.onnx", temperature=0.5), device="cpu")
    audio, lengths = pad_batch([LOUD])
    assert hot.infer(audio, lengths).probs.max() < cold.infer(audio, lengths).probs.max()


def test_padding_does_not_change_a_row(plain_model: EmotionModel, state_model: EmotionModel) -> None:
    short = MEDIUM[:4000]
    for model in (plain_model, state_model):
        alone = model.infer(*pad_batch([short]))
        padded = model.infer(*pad_batch([LOUD, short, QUIET]))
        np.testing.assert_allclose(padded.probs[1], alone.probs[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(padded.avd[1], alone.avd[0], rtol=1e-5, atol=1e-6)
        # Garbage (not zeros) in the padding must not leak in either.
        audio, lengths = pad_batch([LOUD, short])
        audio[1, lengths[1]:] = 0.9
        noisy = model.infer(audio, lengths)
        np.testing.assert_allclose(noisy.probs[1], alone.probs[0], rtol=1e-5, atol=1e-6)


def test_state_round_trip(state_model: EmotionModel) -> None:
    assert [s.name for s in state_model.state_inputs] == [STATE_NAME]
    quiet_history = state_model.infer(*pad_batch([tone(2.0, rms=0.003)]))
    stats = quiet_history.state_updates[STATE_NAME]
    assert stats.shape == (1, 3)
    np.testing.assert_array_equal(stats, quiet_history.raw[STATE_OUTPUT])
    assert stats[0, 2] == 80  # 2 s of whole 25 ms frames

    loud, lengths = pad_batch([tone(1.0, rms=0.3)])
    no_state = state_model.infer(loud, lengths)
    with_state = state_model.infer(loud, lengths, {STATE_NAME: stats})
    # Alone, a steady window is its own reference: neutral. After quiet history it is loud: angry.
    assert LABELS[int(no_state.probs[0].argmax())] == "neutral"
    assert LABELS[int(with_state.probs[0].argmax())] == "angry"
    assert with_state.avd[0, 0] > 0.5
    # The update is this window's own stats, whatever the state given.
    np.testing.assert_allclose(
        no_state.state_updates[STATE_NAME], with_state.state_updates[STATE_NAME]
    )


def test_missing_state_rows_are_filled_with_empty(state_model: EmotionModel) -> None:
    history = state_model.infer(*pad_batch([tone(2.0, rms=0.003)])).state_updates[STATE_NAME][0]
    audio, lengths = pad_batch([LOUD, LOUD])
    mixed = state_model.infer(audio, lengths, {STATE_NAME: [history, None]})
    none_given = state_model.infer(audio, lengths)
    full = state_model.infer(audio, lengths, {STATE_NAME: np.stack([history, history])})
    np.testing.assert_allclose(mixed.probs[1], none_given.probs[1], atol=1e-6)
    np.testing.assert_allclose(mixed.probs[0], full.probs[0], atol=1e-6)
    assert not np.allclose(mixed.probs[0], mixed.probs[1])


def test_bad_state_shape_is_value_error(state_model: EmotionModel) -> None:
    audio, lengths = pad_batch([LOUD, LOUD])
    with pytest.raises(ValueError, match="shape"):
        state_model.infer(audio, lengths, {STATE_NAME: np.zeros((1, 3), np.float32)})
    with pytest.raises(ValueError, match="3 rows for a batch of 2"):
        state_model.infer(audio, lengths, {STATE_NAME: [None, None, None]})


def test_bad_inputs_are_value_errors(plain_model: EmotionModel) -> None:
    audio, lengths = pad_batch([LOUD])
    with pytest.raises(ValueError, match="lengths must lie"):
        plain_model.infer(audio, lengths + 1)
    with pytest.raises(ValueError, match="lengths must have shape"):
        plain_model.infer(audio, np.array([1, 2], np.int64))
    with pytest.raises(ValueError, match="non-empty"):
        plain_model.infer(LOUD, np.array([LOUD.size]))


def test_non_finite_output_is_inference_error(plain_model: EmotionModel) -> None:
    audio, lengths = pad_batch([LOUD, MEDIUM])
    audio[1, 10] = np.nan  # NaN in the input poisons this row's outputs
    with pytest.raises(InferenceError, match=r"non-finite emotion_logits in batch rows \[1\]"):
        plain_model.infer(audio, lengths)


def test_pad_batch() -> None:
    audio, lengths = pad_batch([np.ones(3), np.ones(5, np.float32), np.array([])])
    assert audio.dtype == np.float32 and lengths.dtype == np.int64
    assert audio.shape == (3, 5)
    assert lengths.tolist() == [3, 5, 0]
    assert audio[0].tolist() == [1, 1, 1, 0, 0]
    empty_audio, empty_lengths = pad_batch([np.array([], np.float32)])
    assert empty_audio.shape == (1, 1) and empty_lengths.tolist() == [0]
    with pytest.raises(ValueError):
        pad_batch([])


def test_empty_row_runs(plain_model: EmotionModel) -> None:
    out = plain_model.infer(*pad_batch([np.array([], np.float32), LOUD]))
    assert np.isfinite(out.probs).all()


def test_cuda_is_asked_for_without_a_cudnn_search_and_the_options_can_be_changed(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ONNX Runtime's default exhaustive cuDNN search re-times the convolutions whenever the input shape
    changes, which a live monitor's batches do on nearly every call (measured on an H200: the monitor
    fell seconds behind at 250 RTP streams). Where CUDA looks usable the session is asked for with
    DEFAULT (no search); here the recorder then opens it on CPU, so this runs on any machine."""
    import onnxruntime as ort

    from serstream.inference import session as session_module

    asked: list[object] = []
    real = ort.InferenceSession

    def recording_session(path: str, options: object, providers: list[object]) -> object:
        asked.append(providers)
        return real(path, options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(session_module, "cuda_check", lambda: session_module.CudaCheck(True, ""))
    monkeypatch.setattr(ort, "InferenceSession", recording_session)
    path = build_test_model(model_dir / "cudnn.onnx")
    model = EmotionModel.load(path, device="auto")
    assert asked[-1] == [("CUDAExecutionProvider", {"cudnn_conv_algo_search": "DEFAULT"}), "CPUExecutionProvider"]
    assert model.device == "cpu" and model.device_note.startswith("CUDA looked usable but the session runs on CPU")
    EmotionModel.load(path, device="auto", cuda_options={"cudnn_conv_algo_search": "EXHAUSTIVE"})
    assert asked[-1][0] == ("CUDAExecutionProvider", {"cudnn_conv_algo_search": "EXHAUSTIVE"})
    EmotionModel.load(path, device="cpu")
    assert asked[-1] == ["CPUExecutionProvider"]  # no GPU asked for: no CUDA options either

