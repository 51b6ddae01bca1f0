"""Export a trained EmotionNet to a single-file ONNX model that meets the serstream contract.

The graph holds the front end (two-stage DFT, mel matmul, log, speaker
normalisation), so the monitor feeds raw 16 kHz audio. Metadata goes into
``metadata_props`` and a JSON sidecar; a torch-vs-ONNX-Runtime parity check
on real and zero-padded rows fails the export when they differ by more than
1e-4.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from serstream.contract import (
    INPUT_AUDIO,
    INPUT_LENGTHS,
    LABELS,
    OUTPUT_AVD,
    OUTPUT_EMOTION,
    OUTPUT_GENDER,
    SAMPLE_RATE,
    ModelInfo,
    StateInput,
)

from .frontend import stats_width
from .model import EmotionNet

__all__ = ["ExportError", "export_onnx", "parity_check", "STATE_INPUT", "STATE_OUTPUT"]

STATE_INPUT = "speaker_stats"
STATE_OUTPUT = "frame_stats"
OUTPUT_NAMES = [OUTPUT_EMOTION, OUTPUT_AVD, OUTPUT_GENDER, "intensity_logits", STATE_OUTPUT]
PARITY_TOLERANCE = 1e-4


class ExportError(RuntimeError):
    """The exported graph does not reproduce the torch model."""


@dataclass(frozen=True)
class ExportSettings:
    window_s: float = 3.0
    min_window_s: float = 0.5
    max_window_s: float = 8.0
    # Speaker history cap: about 10 minutes of 10 ms frames; past it old speech fades.
    max_history_frames: float = 60_000.0


def model_info(model: EmotionNet, temperature: float, version: str, extra: Mapping[str, Any], settings: ExportSettings) -> ModelInfo:
    width = model.state_width
    return ModelInfo(
        labels=LABELS,
        sample_rate=SAMPLE_RATE,
        window_s=settings.window_s,
        max_window_s=settings.max_window_s,
        min_window_s=settings.min_window_s,
        temperature=float(temperature),
        state_inputs=(
            StateInput(
                name=STATE_INPUT, width=width, empty=0.0, update_output=STATE_OUTPUT,
                max_count=settings.max_history_frames, count_index=stats_width(model.config.frontend) - 1,
            ),
        ),
        version=version,
        extra={k: (v if isinstance(v, str) else json.dumps(v)) for k, v in extra.items()},
    )


def export_onnx(
    model: EmotionNet,
    path: Path,
    *,
    temperature: float = 1.0,
    version: str = "0.0.0",
    extra: Mapping[str, Any] | None = None,
    settings: ExportSettings = ExportSettings(),
    parity_audio: np.ndarray | None = None,
) -> Path:
    """Write ``path`` (ONNX) and ``path.with_suffix('.json')``; raise ExportError on a parity failure."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.float().eval()
    width = model.state_width
    example = (torch.zeros(2, SAMPLE_RATE), torch.tensor([SAMPLE_RATE, SAMPLE_RATE // 2]), torch.zeros(2, width))
    batch, samples = torch.export.Dim("batch", min=1, max=4096), torch.export.Dim("samples", min=400, max=SAMPLE_RATE * 120)
    torch.onnx.export(
        model,
        example,
        str(path),
        input_names=[INPUT_AUDIO, INPUT_LENGTHS, STATE_INPUT],
        output_names=OUTPUT_NAMES,
        dynamic_shapes=({0: batch, 1: samples}, {0: batch}, {0: batch}),
        external_data=False,
        opset_version=18,
        dynamo=True,
    )
    info = model_info(model, temperature, version, extra or {}, settings)
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    for key, value in info.to_metadata().items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))
    sidecar = {k: v for k, v in info.to_metadata().items()}
    parsed = {k: _maybe_json(v) for k, v in sidecar.items()}
    path.with_suffix(".json").write_text(json.dumps(parsed, indent=1) + "\n")
    parity_check(model, path, parity_audio)
    return path


def _maybe_json(value: str) -> Any:
    try:
        return json.loads(value)
    except (ValueError, TypeError):
        return value


def parity_check(model: EmotionNet, path: Path, audio: np.ndarray | None = None) -> float:
    """Max |torch - ONNX Runtime| over real rows, zero-padded rows and speaker state. Raises ExportError."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    if audio is None:
        t = np.arange(int(2.2 * SAMPLE_RATE)) / SAMPLE_RATE
        audio = (0.1 * np.sin(2 * np.pi * 180 * t) * (1 + 0.5 * np.sin(2 * np.pi * 4 * t)) + 0.01 * rng.standard_normal(len(t))).astype(np.float32)
    n = len(audio)
    rows = np.zeros((3, n), dtype=np.float32)
    rows[0] = audio
    rows[1, : n // 2] = audio[: n // 2]  # a padded row
    rows[2, : n - 1000] = 0.3 * audio[1000:]  # a louder, shifted row
    lengths = np.array([n, n // 2, n - 1000], dtype=np.int64)
    width = model.state_width
    state = np.zeros((3, width), dtype=np.float32)
    with torch.no_grad():
        # a realistic speaker history for row 2: the statistics of row 0
        own0 = model(torch.from_numpy(rows[:1]), torch.from_numpy(lengths[:1]), torch.zeros(1, width))[4].numpy()
        state[2] = own0[0]
        expected = [t.numpy() for t in model(torch.from_numpy(rows), torch.from_numpy(lengths), torch.from_numpy(state))]
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    got = session.run(OUTPUT_NAMES, {INPUT_AUDIO: rows, INPUT_LENGTHS: lengths, STATE_INPUT: state})
    worst = 0.0
    for name, e, g in zip(OUTPUT_NAMES, expected, got):
        # frame_stats are sums over hundreds of frames: compare them relative to their size
        scale = max(1.0, float(np.abs(e).max())) if name == STATE_OUTPUT else 1.0
        worst = max(worst, float(np.abs(e - g).max()) / scale)
    if not worst <= PARITY_TOLERANCE:
        raise ExportError(f"ONNX Runtime output differs from torch by {worst:.2e} (> {PARITY_TOLERANCE:.0e}) in {path}")
    return worst
