"""Small ONNX models that satisfy the serstream model contract, built without torch.

Tests need a real model to run through a real ONNX Runtime session, and they
need to know what it will answer. These models are a few dozen plain ONNX ops
(opset 17) built with ``onnx.helper``; nothing is trained.

What :func:`build_test_model` computes, per row ``b`` of ``audio`` with
``n = lengths[b]`` valid samples (samples at or past ``n`` are masked out, so
padding never changes a row's result):

* ``level = log10(rms)`` where ``rms`` is the root mean square of the valid
  samples (``1e-10`` is added to the mean square before the log);
* ``zcr``: the fraction of adjacent valid sample pairs whose product is
  negative (a zero-crossing rate: about ``2 * f / 16000`` for a sine of
  ``f`` Hz);
* a *level feature* ``d``:

  - without state, ``d = level + 1.5`` (``d = 0`` at an RMS of about 0.03);
  - with state (``with_state=True``), ``d`` is the z-score of this window's
    mean frame level against the speaker's statistics: frames are 25 ms
    (:data:`FRAME` samples, non-overlapping, only frames wholly inside the
    valid samples count), each frame's feature is ``log10`` of its RMS,
    ``frame_stats = [sum, sum of squares, count]`` of those features, the
    input ``speaker_stats`` (same layout, zeros = no state yet) is added to
    it, and ``d = (window mean - combined mean) / sqrt(combined variance +
    0.01)``; ``d = 0`` when the window has no whole frame. With no state a
    steady window gives ``d = 0``; a loud window after quiet history gives
    ``d > 0``.

Then with ``f = [d, zcr, 1]`` and fixed matrices (see :data:`EMOTION_WEIGHTS`):

* ``emotion_logits = f @ W_e``: "angry" is ``3 d``, "sad" is ``-3 d``,
  "neutral" is ``1``, "calm" is ``-d``, "happy" ``2 zcr - 1``, "surprised"
  ``4 zcr - 3``, the rest ``-2``. So a loud tone (RMS 0.3) is "angry", a
  quiet one (RMS 0.003) is "sad", one at RMS 0.03 is "neutral".
* ``avd = tanh(f @ W_a)``: arousal ``tanh(d)``, valence ``tanh(-0.5 d)``,
  dominance ``tanh(0.5 d)``.
* ``gender_logits = f @ W_g``: female ``40 zcr - 2``, male ``0`` (a tone
  above 800 Hz reads "female", below 400 Hz "male").

The metadata is ``ModelInfo(...).to_metadata()`` (``metadata_props``), or a
JSON sidecar beside the model (``metadata="sidecar"``), or both.
:func:`build_broken_model` writes models that break the contract in one
named way, for the loader's error tests.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from serstream import contract
from serstream.contract import LABELS, ModelInfo, StateInput

__all__ = [
    "FRAME",
    "STATE_NAME",
    "STATE_OUTPUT",
    "STATE_WIDTH",
    "EMOTION_WEIGHTS",
    "BROKEN_PROBLEMS",
    "build_test_model",
    "build_broken_model",
    "model_info",
    "tone",
    "expected_features",
]

OPSET = 17
#: Frame length (samples) of the stateful variant's per-frame level feature.
FRAME = 400
STATE_NAME = "speaker_stats"
STATE_OUTPUT = "frame_stats"
#: sum, sum of squares, count.
STATE_WIDTH = 3

#: Per label: the weights of (d, zcr, bias). Labels not named here get zeros.
EMOTION_WEIGHTS: dict[str, tuple[float, float, float]] = {
    "neutral": (0.0, 0.0, 1.0),
    "calm": (-1.0, 0.0, 0.0),
    "happy": (0.0, 2.0, -1.0),
    "sad": (-3.0, 0.0, 0.0),
    "angry": (3.0, 0.0, 0.0),
    "fearful": (0.0, 0.0, -2.0),
    "disgust": (0.0, 0.0, -2.0),
    "surprised": (0.0, 4.0, -3.0),
}
_AVD_WEIGHTS = np.array([[1.0, -0.5, 0.5], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]], np.float32)
_GENDER_WEIGHTS = np.array([[0.0, 0.0], [40.0, 0.0], [-2.0, 0.0]], np.float32)

BROKEN_PROBLEMS = (
    "missing_output",  # no gender_logits output
    "wrong_labels",  # 7 labels in the metadata, 8 logits
    "missing_state_input",  # metadata declares speaker_stats, the graph has no such input
    "no_contract",  # metadata lacks serstream.contract
    "wrong_rank",  # avd is [batch, 1, 3]
    "unknown_input",  # an extra required input nobody declared
)


def model_info(
    *,
    with_state: bool = False,
    window_s: float = 2.0,
    temperature: float = 1.5,
    labels: Sequence[str] = LABELS,
    version: str = "test-1",
) -> ModelInfo:
    """The metadata that :func:`build_test_model` writes for these arguments."""
    states = (
        (
            StateInput(
                name=STATE_NAME,
                width=STATE_WIDTH,
                empty=0.0,
                update_output=STATE_OUTPUT,
                max_count=None,
                count_index=2,
            ),
        )
        if with_state
        else ()
    )
    return ModelInfo(
        labels=tuple(labels),
        sample_rate=contract.SAMPLE_RATE,
        window_s=window_s,
        max_window_s=max(8.0, window_s),
        min_window_s=0.5,
        temperature=temperature,
        state_inputs=states,
        version=version,
        extra={contract.META_TRAINING_DATA: "none (synthetic test model)"},
    )


def build_test_model(
    path: str | Path,
    *,
    with_state: bool = False,
    window_s: float = 2.0,
    temperature: float = 1.5,
    labels: Sequence[str] = LABELS,
    metadata: Literal["props", "sidecar", "both"] = "props",
) -> Path:
    """Write a contract-conforming test model to ``path`` and return the path."""
    info = model_info(
        with_state=with_state, window_s=window_s, temperature=temperature, labels=labels
    )
    model = _build_proto(labels=tuple(labels), with_state=with_state)
    return _save(model, Path(path), info.to_metadata(), metadata)


def build_broken_model(path: str | Path, problem: str) -> Path:
    """Write a model that breaks the contract in the one way named by ``problem``.

    ``problem`` is one of :data:`BROKEN_PROBLEMS`.
    """
    if problem not in BROKEN_PROBLEMS:
        raise ValueError(f"unknown problem {problem!r}; pick one of {BROKEN_PROBLEMS}")
    labels = LABELS
    model = _build_proto(
        labels=labels,
        with_state=False,
        avd_rank3=problem == "wrong_rank",
        extra_input=problem == "unknown_input",
    )
    meta = model_info().to_metadata()
    if problem == "missing_output":
        kept = [o for o in model.graph.output if o.name != contract.OUTPUT_GENDER]
        del model.graph.output[:]
        model.graph.output.extend(kept)
    elif problem == "wrong_labels":
        meta[contract.META_LABELS] = json.dumps(list(labels[:7]))
    elif problem == "missing_state_input":
        meta = model_info(with_state=True).to_metadata()
    elif problem == "no_contract":
        del meta[contract.META_CONTRACT]
    return _save(model, Path(path), meta, "props")


def tone(
    seconds: float, *, rms: float, freq: float = 220.0, sample_rate: int = contract.SAMPLE_RATE
) -> np.ndarray:
    """A float32 sine of the given RMS level (phase offset so no sample is exactly 0)."""
    n = int(round(seconds * sample_rate))
    t = np.arange(n, dtype=np.float64) / sample_rate
    return (rms * math.sqrt(2.0) * np.sin(2 * np.pi * freq * t + 0.1)).astype(np.float32)


def expected_features(audio: np.ndarray) -> tuple[float, float]:
    """(level, zcr) of one row's valid samples, as the stateless graph computes them."""
    x = np.asarray(audio, np.float64)
    ms = float(np.mean(x * x)) if x.size else 0.0
    level = 0.5 * math.log10(ms + 1e-10)
    crossings = float(np.sum((x[:-1] * x[1:]) < 0)) if x.size > 1 else 0.0
    return level, crossings / max(x.size - 1, 1)


# --------------------------------------------------------------------------- graph


class _Graph:
    """Collects nodes and initializers; each helper returns the name of what it made."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], output: str, **attrs: object) -> str:
        self.nodes.append(helper.make_node(op_type, inputs, [output], **attrs))
        return output

    def op_multi(self, op_type: str, inputs: list[str], outputs: list[str], **attrs: object) -> None:
        self.nodes.append(helper.make_node(op_type, inputs, outputs, **attrs))


def _build_proto(
    *,
    labels: tuple[str, ...],
    with_state: bool,
    avd_rank3: bool = False,
    extra_input: bool = False,
) -> onnx.ModelProto:
    g = _Graph()
    g.const("ax0", np.array([0], np.int64))
    g.const("ax1", np.array([1], np.int64))
    g.const("i0", np.array(0, np.int64))
    g.const("i1", np.array(1, np.int64))
    g.const("f0", np.array(0.0, np.float32))
    g.const("f1", np.array(1.0, np.float32))
    g.const("eps", np.array(1e-10, np.float32))
    g.const("half_inv_ln10", np.array(0.5 / math.log(10.0), np.float32))

    # Mask of valid samples: index < length.
    g.op("Shape", ["audio"], "shape")
    g.op("Gather", ["shape", "i1"], "n_samples", axis=0)
    g.op("Range", ["i0", "n_samples", "i1"], "idx")
    g.op("Unsqueeze", ["idx", "ax0"], "idx_row")
    g.op("Unsqueeze", ["lengths", "ax1"], "len_col")
    g.op("Less", ["idx_row", "len_col"], "valid")
    g.op("Cast", ["valid"], "mask", to=TensorProto.FLOAT)
    g.op("Mul", ["audio", "mask"], "x")

    # Level: log10 of the RMS of the valid samples.
    g.op("Mul", ["x", "x"], "x2")
    g.op("ReduceSum", ["x2", "ax1"], "sumsq", keepdims=1)
    g.op("Cast", ["len_col"], "len_f", to=TensorProto.FLOAT)
    g.op("Max", ["len_f", "f1"], "len_f1")
    g.op("Div", ["sumsq", "len_f1"], "ms")
    g.op("Add", ["ms", "eps"], "ms_eps")
    g.op("Log", ["ms_eps"], "ln_ms")
    g.op("Mul", ["ln_ms", "half_inv_ln10"], "level")

    # Zero-crossing rate over adjacent valid pairs (masked samples are 0, never a crossing).
    g.const("starts0", np.array([0], np.int64))
    g.const("ends_m1", np.array([-1], np.int64))
    g.const("starts1", np.array([1], np.int64))
    g.const("ends_max", np.array([np.iinfo(np.int64).max], np.int64))
    g.op("Slice", ["x", "starts0", "ends_m1", "ax1"], "x_head")
    g.op("Slice", ["x", "starts1", "ends_max", "ax1"], "x_tail")
    g.op("Mul", ["x_head", "x_tail"], "pair")
    g.op("Less", ["pair", "f0"], "crossing")
    g.op("Cast", ["crossing"], "crossing_f", to=TensorProto.FLOAT)
    g.op("ReduceSum", ["crossing_f", "ax1"], "n_cross", keepdims=1)
    g.op("Sub", ["len_f", "f1"], "pairs")
    g.op("Max", ["pairs", "f1"], "pairs1")
    g.op("Div", ["n_cross", "pairs1"], "zcr")

    inputs = [
        helper.make_tensor_value_info(contract.INPUT_AUDIO, TensorProto.FLOAT, ["batch", "samples"]),
        helper.make_tensor_value_info(contract.INPUT_LENGTHS, TensorProto.INT64, ["batch"]),
    ]
    extra_outputs: list[onnx.ValueInfoProto] = []
    if with_state:
        d = _state_branch(g)
        inputs.append(
            helper.make_tensor_value_info(STATE_NAME, TensorProto.FLOAT, ["batch", STATE_WIDTH])
        )
        extra_outputs.append(
            helper.make_tensor_value_info(STATE_OUTPUT, TensorProto.FLOAT, ["batch", STATE_WIDTH])
        )
    else:
        g.const("level_offset", np.array(1.5, np.float32))
        d = g.op("Add", ["level", "level_offset"], "d")

    if extra_input:
        # An input the metadata does not declare: the loader cannot know what to feed.
        inputs.append(helper.make_tensor_value_info("mystery", TensorProto.FLOAT, ["batch", 4]))
        g.op("ReduceSum", ["mystery", "ax1"], "mystery_sum", keepdims=1)
        g.op("Mul", ["mystery_sum", "f0"], "mystery_zero")
        d = g.op("Add", [d, "mystery_zero"], "d_plus")

    # f = [d, zcr, 1]
    g.op("Mul", [d, "f0"], "zeros_col")
    g.op("Add", ["zeros_col", "f1"], "ones_col")
    g.op("Concat", [d, "zcr", "ones_col"], "features", axis=1)

    w_emotion = np.zeros((3, len(labels)), np.float32)
    for j, label in enumerate(labels):
        w_emotion[:, j] = EMOTION_WEIGHTS.get(label, (0.0, 0.0, 0.0))
    g.const("w_emotion", w_emotion)
    g.const("w_avd", _AVD_WEIGHTS)
    g.const("w_gender", _GENDER_WEIGHTS)
    g.op("MatMul", ["features", "w_emotion"], contract.OUTPUT_EMOTION)
    g.op("MatMul", ["features", "w_avd"], "avd_pre")
    avd_shape: list[object] = ["batch", 3]
    if avd_rank3:
        g.op("Tanh", ["avd_pre"], "avd_flat")
        g.op("Unsqueeze", ["avd_flat", "ax1"], contract.OUTPUT_AVD)
        avd_shape = ["batch", 1, 3]
    else:
        g.op("Tanh", ["avd_pre"], contract.OUTPUT_AVD)
    g.op("MatMul", ["features", "w_gender"], contract.OUTPUT_GENDER)

    outputs = [
        helper.make_tensor_value_info(
            contract.OUTPUT_EMOTION, TensorProto.FLOAT, ["batch", len(labels)]
        ),
        helper.make_tensor_value_info(contract.OUTPUT_AVD, TensorProto.FLOAT, avd_shape),
        helper.make_tensor_value_info(contract.OUTPUT_GENDER, TensorProto.FLOAT, ["batch", 2]),
        *extra_outputs,
    ]
    graph = helper.make_graph(g.nodes, "serstream_test_model", inputs, outputs, initializer=g.inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="serstream-tests"
    )
    # IR 8 is the version opset 17 shipped with: any ONNX Runtime that runs opset 17 reads it.
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _state_branch(g: _Graph) -> str:
    """Per-frame level statistics combined with ``speaker_stats``; returns the z-score's name."""
    g.const("pads_tail", np.array([0, 0, 0, FRAME], np.int64))
    g.const("frame_kernel", np.full((1, 1, FRAME), 1.0 / FRAME, np.float32))
    g.const("frame_len", np.array(FRAME, np.int64))
    g.const("var_floor", np.array(0.01, np.float32))
    g.const("split3", np.array([1, 1, 1], np.int64))

    # One frame of tail padding keeps the strided Conv valid for rows shorter than a frame.
    g.op("Pad", ["x2", "pads_tail"], "x2_padded")
    g.op("Unsqueeze", ["x2_padded", "ax1"], "x2_chan")
    g.op("Conv", ["x2_chan", "frame_kernel"], "frame_ms_chan", strides=[FRAME])
    g.op("Squeeze", ["frame_ms_chan", "ax1"], "frame_ms")
    g.op("Add", ["frame_ms", "eps"], "frame_ms_eps")
    g.op("Log", ["frame_ms_eps"], "frame_ln")
    g.op("Mul", ["frame_ln", "half_inv_ln10"], "frame_level")

    # Frame t counts only when it lies wholly inside the valid samples: (t + 1) * FRAME <= length.
    g.op("Shape", ["frame_ms"], "frame_shape")
    g.op("Gather", ["frame_shape", "i1"], "n_frames", axis=0)
    g.op("Add", ["n_frames", "i1"], "n_frames1")
    g.op("Range", ["i1", "n_frames1", "i1"], "frame_number")
    g.op("Mul", ["frame_number", "frame_len"], "frame_end")
    g.op("Unsqueeze", ["frame_end", "ax0"], "frame_end_row")
    g.op("LessOrEqual", ["frame_end_row", "len_col"], "frame_valid")
    g.op("Cast", ["frame_valid"], "frame_mask", to=TensorProto.FLOAT)

    g.op("Mul", ["frame_level", "frame_mask"], "lev_m")
    g.op("Mul", ["lev_m", "frame_level"], "lev2_m")
    g.op("ReduceSum", ["lev_m", "ax1"], "s1", keepdims=1)
    g.op("ReduceSum", ["lev2_m", "ax1"], "s2", keepdims=1)
    g.op("ReduceSum", ["frame_mask", "ax1"], "cnt", keepdims=1)
    g.op("Concat", ["s1", "s2", "cnt"], STATE_OUTPUT, axis=1)

    g.op("Add", [STATE_NAME, STATE_OUTPUT], "combined")
    g.op_multi("Split", ["combined", "split3"], ["c_s1", "c_s2", "c_cnt"], axis=1)
    g.op("Max", ["c_cnt", "f1"], "c_cnt1")
    g.op("Div", ["c_s1", "c_cnt1"], "c_mean")
    g.op("Div", ["c_s2", "c_cnt1"], "c_meansq")
    g.op("Mul", ["c_mean", "c_mean"], "c_mean2")
    g.op("Sub", ["c_meansq", "c_mean2"], "c_var_raw")
    g.op("Max", ["c_var_raw", "f0"], "c_var")
    g.op("Add", ["c_var", "var_floor"], "c_var_eps")
    g.op("Sqrt", ["c_var_eps"], "c_std")
    g.op("Max", ["cnt", "f1"], "cnt1")
    g.op("Div", ["s1", "cnt1"], "w_mean")
    g.op("Sub", ["w_mean", "c_mean"], "w_dev")
    g.op("Div", ["w_dev", "c_std"], "z_raw")
    # A window without one whole frame carries no evidence: d = 0.
    g.op("Min", ["cnt", "f1"], "has_frames")
    return g.op("Mul", ["z_raw", "has_frames"], "d")


def _save(
    model: onnx.ModelProto,
    path: Path,
    meta: dict[str, str],
    metadata: Literal["props", "sidecar", "both"],
) -> Path:
    if metadata not in ("props", "sidecar", "both"):
        raise ValueError(f"metadata must be 'props', 'sidecar' or 'both', not {metadata!r}")
    if metadata in ("props", "both"):
        helper.set_model_props(model, meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    sidecar = path.with_suffix(".json")
    if metadata in ("sidecar", "both"):
        # The exporter writes native JSON values (a list of labels, numbers), not strings.
        sidecar.write_text(json.dumps({k: _native(v) for k, v in meta.items()}, indent=2))
    elif sidecar.exists():
        sidecar.unlink()
    return path


def _native(value: str) -> object:
    try:
        return json.loads(value)
    except ValueError:
        return value


def model_failing_on_quiet_audio(source: Path, target: Path) -> Path:
    """The factory model with ``emotion_logits += 0 * log(peak - 0.5)``: NaN for rows peaking under 0.5.

    A real model that breaks the contract (non-finite outputs) on some audio
    only, so a test can tell one file's failure from its batch-mates'.
    """
    model = onnx.load(str(source))
    graph = model.graph
    (producer,) = [n for n in graph.node if "emotion_logits" in n.output]
    producer.output[list(producer.output).index("emotion_logits")] = "emotion_logits_clean"
    graph.initializer.extend([
        numpy_helper.from_array(np.array(0.5, np.float32), "poison_half"),
        numpy_helper.from_array(np.array(0.0, np.float32), "poison_zero"),
    ])
    graph.node.extend([
        helper.make_node("Abs", ["audio"], ["poison_abs"]),
        helper.make_node("ReduceMax", ["poison_abs"], ["poison_peak"], axes=[1], keepdims=1),
        helper.make_node("Sub", ["poison_peak", "poison_half"], ["poison_margin"]),
        helper.make_node("Log", ["poison_margin"], ["poison_log"]),
        helper.make_node("Mul", ["poison_log", "poison_zero"], ["poison"]),
        helper.make_node("Add", ["emotion_logits_clean", "poison"], ["emotion_logits"]),
    ])
    onnx.checker.check_model(model)
    onnx.save(model, str(target))
    return target


class SlowModel:
    """A real model behind a fixed delay per batch: a stand-in for a CPU that cannot keep up (same numbers)."""

    def __init__(self, model: Any, delay_s: float) -> None:
        self._model, self._delay_s = model, delay_s
        self.info, self.device = model.info, model.device

    def infer(self, audio: np.ndarray, lengths: np.ndarray, state: Any = None) -> Any:
        time.sleep(self._delay_s)
        return self._model.infer(audio, lengths, state)
