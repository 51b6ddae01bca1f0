"""The model and event contracts shared by the monitor and the training code.

One label order, one sample rate, one set of tensor names and metadata keys:
``training/`` imports these definitions (it may import serstream; serstream
never imports torch or training), so the model that training exports and the
monitor that runs it cannot disagree. docs/architecture.md ("Model contract in use")
and models/README.md describe the contract in words.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from serstream.errors import ContractError

__all__ = [
    "LABELS",
    "SAMPLE_RATE",
    "CONTRACT_VERSION",
    "EVENT_SCHEMA_VERSION",
    "INPUT_AUDIO",
    "INPUT_LENGTHS",
    "OUTPUT_EMOTION",
    "OUTPUT_AVD",
    "OUTPUT_GENDER",
    "REQUIRED_OUTPUTS",
    "StateInput",
    "ModelInfo",
    "ContractError",
]

#: Emotion categories in the RAVDESS order; index i of ``emotion_logits`` is LABELS[i].
LABELS: tuple[str, ...] = (
    "neutral",
    "calm",
    "happy",
    "sad",
    "angry",
    "fearful",
    "disgust",
    "surprised",
)

#: The model's input rate. Every source is resampled to this before the VAD.
SAMPLE_RATE = 16_000

#: Version of the ONNX model contract (metadata key ``serstream.contract``).
CONTRACT_VERSION = 1

#: Version of the JSON event schema (the ``v`` field of every event; additive revisions keep it,
#: see serstream_client.model.SCHEMA_VERSION).
EVENT_SCHEMA_VERSION = 1

INPUT_AUDIO = "audio"  # float32 [batch, samples], 16 kHz mono in [-1, 1]
INPUT_LENGTHS = "lengths"  # int64 [batch], valid samples per row
OUTPUT_EMOTION = "emotion_logits"  # float32 [batch, len(LABELS)]
OUTPUT_AVD = "avd"  # float32 [batch, 3]: arousal, valence, dominance in [-1, 1]
OUTPUT_GENDER = "gender_logits"  # float32 [batch, 2]: female, male
REQUIRED_OUTPUTS = (OUTPUT_EMOTION, OUTPUT_AVD, OUTPUT_GENDER)

#: Metadata keys (ONNX ``metadata_props``; values are strings, JSON where structured).
META_CONTRACT = "serstream.contract"
META_LABELS = "labels"
META_SAMPLE_RATE = "sample_rate"
META_WINDOW_S = "window_s"
META_MAX_WINDOW_S = "max_window_s"
META_MIN_WINDOW_S = "min_window_s"
META_TEMPERATURE = "temperature"
META_STATE_INPUTS = "state_inputs"
META_VERSION = "version"
META_TRAINING_DATA = "training_data"
META_CV_RESULTS = "cv_results"


@dataclass(frozen=True)
class StateInput:
    """An extra model input that carries per-stream state between windows.

    ``speaker_stats`` is the one in use: running sums of the speaker's log-mel
    frames (sum, sum of squares, count) for label-free speaker normalisation;
    a model may append more sums (as v0.5.0 and later do, training's ``--speaker-window-stats``: per-window
    statistics, their squares and a window count), so ``width`` is read, never assumed.
    ``empty`` fills the input when a stream has no state yet. When
    ``update_output`` names a model output, the monitor adds that output
    (this window's own sums) to the stream's state after each *final*
    estimate, so the state grows from the speech the stream has produced.
    """

    name: str
    width: int
    empty: float = 0.0
    update_output: str | None = None
    #: Cap on the accumulated frame count: past it the state is scaled down,
    #: so it follows a speaker whose voice or channel drifts. None = no cap.
    max_count: float | None = None
    #: Index of the count column within the state row (for the cap), or None.
    count_index: int | None = None


@dataclass(frozen=True)
class ModelInfo:
    """Everything the monitor needs to know about a model, read from its metadata."""

    labels: tuple[str, ...]
    sample_rate: int
    window_s: float
    max_window_s: float
    min_window_s: float
    temperature: float
    state_inputs: tuple[StateInput, ...] = ()
    version: str = "unknown"
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str]) -> ModelInfo:
        """Parse ONNX ``metadata_props`` (all values strings). Raises ContractError."""
        try:
            contract = int(meta.get(META_CONTRACT, "0"))
        except ValueError as exc:
            raise ContractError(f"metadata {META_CONTRACT!r} is not an integer") from exc
        if contract != CONTRACT_VERSION:
            raise ContractError(
                f"model declares contract version {contract}, this serstream reads version "
                f"{CONTRACT_VERSION} (metadata key {META_CONTRACT!r})"
            )
        try:
            labels = tuple(json.loads(meta[META_LABELS]))
            sample_rate = int(meta[META_SAMPLE_RATE])
            window_s = float(meta[META_WINDOW_S])
            max_window_s = float(meta.get(META_MAX_WINDOW_S, str(max(window_s, 8.0))))
            min_window_s = float(meta.get(META_MIN_WINDOW_S, "0.5"))
            temperature = float(meta.get(META_TEMPERATURE, "1.0"))
            raw_states = json.loads(meta.get(META_STATE_INPUTS, "[]"))
            states = tuple(StateInput(**s) for s in raw_states)
        except KeyError as exc:
            raise ContractError(f"model metadata lacks the key {exc.args[0]!r}") from exc
        except (ValueError, TypeError) as exc:
            raise ContractError(f"model metadata is malformed: {exc}") from exc
        if not labels or any(not isinstance(x, str) for x in labels):
            raise ContractError("model metadata 'labels' must be a non-empty list of strings")
        if sample_rate <= 0 or window_s <= 0 or temperature <= 0:
            raise ContractError("model metadata has a non-positive rate, window or temperature")
        known = {
            META_CONTRACT, META_LABELS, META_SAMPLE_RATE, META_WINDOW_S, META_MAX_WINDOW_S,
            META_MIN_WINDOW_S, META_TEMPERATURE, META_STATE_INPUTS, META_VERSION,
        }
        extra = {k: v for k, v in meta.items() if k not in known}
        return cls(
            labels=labels,
            sample_rate=sample_rate,
            window_s=window_s,
            max_window_s=max_window_s,
            min_window_s=min_window_s,
            temperature=temperature,
            state_inputs=states,
            version=meta.get(META_VERSION, "unknown"),
            extra=extra,
        )

    def to_metadata(self) -> dict[str, str]:
        """The inverse of :meth:`from_metadata` (used by the exporter and test models)."""
        meta = {str(k): str(v) for k, v in self.extra.items()}
        meta.update(
            {
                META_CONTRACT: str(CONTRACT_VERSION),
                META_LABELS: json.dumps(list(self.labels)),
                META_SAMPLE_RATE: str(self.sample_rate),
                META_WINDOW_S: repr(float(self.window_s)),
                META_MAX_WINDOW_S: repr(float(self.max_window_s)),
                META_MIN_WINDOW_S: repr(float(self.min_window_s)),
                META_TEMPERATURE: repr(float(self.temperature)),
                META_STATE_INPUTS: json.dumps([s.__dict__ for s in self.state_inputs]),
                META_VERSION: self.version,
            }
        )
        return meta
