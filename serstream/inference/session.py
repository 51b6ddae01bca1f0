"""The ONNX Runtime session: load and validate a model, pick CUDA or CPU, run padded batches.

:class:`EmotionModel` is the thin adapter around ``onnxruntime.InferenceSession``.
It reads everything about the model from its metadata (``metadata_props``,
plus a JSON sidecar ``<stem>.json`` for keys the props lack), checks the
tensor contract of :mod:`serstream.contract` once at load time, and turns the
raw outputs into calibrated probabilities (softmax of logits / temperature).

Loading never prints an ONNX Runtime traceback: every problem with the file,
its metadata or its tensors is one :class:`~serstream.contract.ContractError`
line naming the file; a device that cannot be had is one
:class:`DeviceError` line.

Provider choice: ``onnxruntime-gpu`` lists ``CUDAExecutionProvider`` as
available on every machine, and asking for it where no GPU is usable makes
ONNX Runtime log errors before it falls back. So CUDA is requested only when
the provider is listed *and* the CUDA driver (``libcuda.so.1``) loads and
reports at least one device. What the session actually got is what
:attr:`EmotionModel.device` and :attr:`EmotionModel.provider` report, and
:func:`describe_device` puts it (with why CUDA was not used) in one line.

The CUDA libraries can come from PyPI (``pip install "serstream[gpu]"``: the
``nvidia-*`` wheels that this onnxruntime-gpu build needs, docs/scale-out.md),
without a system CUDA install: where the driver reports a GPU,
``onnxruntime.preload_dlls()`` (where this onnxruntime has it) loads them
from site-packages first, its printed complaints captured, never shown.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import logging
import os
import re
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, NoReturn, Sequence

import numpy as np
import onnxruntime as ort

from serstream import contract
from serstream.contract import ContractError, ModelInfo, StateInput
from serstream.errors import DeviceError, InferenceError, one_line

__all__ = [
    "CUDA_PROVIDER_OPTIONS",
    "DEVICES",
    "DeviceError",
    "InferenceError",
    "InferenceOutput",
    "EmotionModel",
    "pad_batch",
    "cuda_usable",
    "cuda_check",
    "CudaCheck",
    "describe_device",
    "captured_stderr",
    "softmax",
]

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")

# ONNX Runtime severities: 0 verbose, 1 info, 2 warning, 3 error, 4 fatal.
# Warnings (e.g. "some nodes were not assigned to the preferred provider") are
# noise for a monitor; real failures still raise.
_ORT_LOG_SEVERITY = 3

_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*")

_CUDA_PROVIDER = "CUDAExecutionProvider"

#: ONNX Runtime's CUDA provider options. Its default cuDNN algorithm search ("EXHAUSTIVE") times
#: the convolution algorithms again whenever a convolution's input shape differs from its previous
#: call's, and a live monitor's batches change shape on nearly every call (windows of every length,
#: batches of every size). Measured on an H200 (`benchmarks/bench_gpu.py --live-calls 200`, batches
#: of 1-64 windows of 0.5-8 s): median 83 ms a call with EXHAUSTIVE, 16.7 with HEURISTIC, 8.8 with
#: DEFAULT (cuDNN's default algorithm, no search). At one fixed shape EXHAUSTIVE and HEURISTIC both
#: take 1.4-3.3 ms up to batch 32 (DEFAULT's fixed-shape sweep has not been run). Through the whole
#: monitor (`benchmarks/bench_network.py --workers 14`, 250 RTP streams) EXHAUSTIVE fell seconds
#: behind (partial p95 2208 ms). Padding batches to a few dozen shapes that repeat did not help
#: (EXHAUSTIVE 85 ms, DEFAULT 13.4 ms a call): the cost seems to follow each change of shape rather
#: than each new shape (ONNX Runtime's internals were not inspected). docs/scale-out.md has the figures.
CUDA_PROVIDER_OPTIONS: dict[str, str] = {"cudnn_conv_algo_search": "DEFAULT"}
_CPU_PROVIDER = "CPUExecutionProvider"


@dataclass
class InferenceOutput:
    """The result of one batch; row ``i`` belongs to row ``i`` of the input."""

    #: float32 [B, L]: softmax(emotion_logits / temperature), the calibrated probabilities.
    probs: np.ndarray
    #: float32 [B, 3]: arousal, valence, dominance, clipped to [-1, 1].
    avd: np.ndarray
    #: float32 [B, 2]: softmax(gender_logits): female, male.
    gender_probs: np.ndarray
    #: Keyed by the *state input's* name (``StateInput.name``); the value is the
    #: model output named by its ``update_output`` ([B, width]).
    state_updates: dict[str, np.ndarray] = field(default_factory=dict)
    #: Every model output by name, as ONNX Runtime returned it.
    raw: dict[str, np.ndarray] = field(default_factory=dict)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature`` (float64 inside, float32 out)."""
    z = np.asarray(logits, np.float64) / float(temperature)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def pad_batch(rows: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Stack 1-D audio rows into the model's ``(audio, lengths)`` inputs.

    ``audio`` is float32 ``[len(rows), max(len)]``, each row zero-padded at
    the end; ``lengths`` is int64 ``[len(rows)]``. The width is at least 1, so
    a batch of empty rows is still a valid tensor (its lengths are 0).
    """
    if len(rows) == 0:
        raise ValueError("pad_batch needs at least one row")
    arrays = [np.asarray(r, np.float32).reshape(-1) for r in rows]
    lengths = np.array([a.size for a in arrays], np.int64)
    audio = np.zeros((len(arrays), max(int(lengths.max()), 1)), np.float32)
    for i, a in enumerate(arrays):
        audio[i, : a.size] = a
    return audio, lengths


@dataclass(frozen=True)
class CudaCheck:
    """Whether CUDA is usable here and, when not, why (one line for the startup log)."""

    usable: bool
    reason: str = ""


def cuda_check() -> CudaCheck:
    """Can ONNX Runtime really run on CUDA here? Never prints, never raises.

    All three must hold: ONNX Runtime lists the CUDA provider; the CUDA
    driver (``libcuda.so.1``) loads and reports at least one device; and the
    provider's own library loads, which needs the CUDA runtime, cuBLAS and
    cuDNN versions it was built for (from the system, or from the ``nvidia-*``
    wheels of the ``gpu`` extra, which :func:`_preload_cuda_libraries` loads).
    Checking these with ``ctypes`` first is what keeps ONNX Runtime from
    logging errors on machines without them.
    """
    if _CUDA_PROVIDER not in ort.get_available_providers():
        return CudaCheck(False, "this onnxruntime has no CUDA provider")
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
        if libcuda.cuInit(0) != 0:
            return CudaCheck(False, "the CUDA driver did not initialise")
        count = ctypes.c_int(0)
        if libcuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value <= 0:
            return CudaCheck(False, "the CUDA driver reports no GPU")
    except (OSError, AttributeError):  # no driver, or not a real driver library
        return CudaCheck(False, "no CUDA driver (libcuda.so.1)")
    _preload_cuda_libraries()
    capi = Path(ort.__file__).parent / "capi"
    provider = capi / "libonnxruntime_providers_cuda.so"
    shared = capi / "libonnxruntime_providers_shared.so"
    if not provider.is_file():
        return CudaCheck(False, "onnxruntime's CUDA provider library is missing")
    try:
        if shared.is_file():
            # The provider resolves symbols from the shared bridge, as when ORT loads it.
            ctypes.CDLL(str(shared), mode=ctypes.RTLD_GLOBAL)
        ctypes.CDLL(str(provider))
    except OSError as exc:  # e.g. libcublasLt.so.N or libcudnn.so.N missing
        missing = str(exc).split(":")[0].strip() or "a CUDA library"
        return CudaCheck(False, f"CUDA libraries missing ({missing}; pip install 'serstream[gpu]')")
    return CudaCheck(True)


def cuda_usable() -> bool:
    """True when ONNX Runtime could really run on CUDA here (see :func:`cuda_check`)."""
    return cuda_check().usable


def _preload_cuda_libraries() -> None:
    """Load the CUDA/cuDNN libraries of the ``nvidia-*`` wheels, when this onnxruntime can.

    ``onnxruntime.preload_dlls`` prints (rather than raises) what it could not
    load; that text is captured and dropped here, since :func:`cuda_check`
    says in one line what is missing.
    """
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            preload()
        except Exception as exc:  # noqa: BLE001 - a failed preload only means CUDA stays unusable
            log.debug("onnxruntime.preload_dlls failed: %s", _one_line(exc))


@contextlib.contextmanager
def captured_stderr(into: list[str]) -> Iterator[None]:
    """Send what anyone writes to file descriptor 2 (C++ libraries too) into ``into``, not the terminal.

    Used around the few ONNX Runtime calls that print instead of raising;
    the process-wide redirect lasts only as long as the ``with`` block.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            into.append(sink.read().decode("utf-8", "replace"))


def describe_device(model: Any) -> str:
    """``cpu (CPUExecutionProvider; CUDA not used: no CUDA driver (libcuda.so.1))``: one line."""
    device = str(getattr(model, "device", "cpu"))
    provider = str(getattr(model, "provider", "") or "")
    note = str(getattr(model, "device_note", "") or "")
    inside = "; ".join(part for part in (provider, f"CUDA not used: {note}" if note else "") if part)
    return f"{device} ({inside})" if inside else device


class EmotionModel:
    """A loaded, validated emotion model. Build it with :meth:`load`.

    ``infer`` is safe to call from one thread at a time per instance (the
    inference worker owns it); ONNX Runtime itself allows concurrent runs.
    """

    def __init__(
        self,
        path: Path,
        session: ort.InferenceSession,
        info: ModelInfo,
    ) -> None:
        self.path = path
        self.session = session
        self.info = info
        #: What the session actually runs on, in priority order.
        self.providers: list[str] = list(session.get_providers())
        self.device: str = "cuda" if _CUDA_PROVIDER in self.providers else "cpu"
        #: The execution provider that runs the model (the first of ``providers``).
        self.provider: str = self.providers[0] if self.providers else _CPU_PROVIDER
        #: Why CUDA was not used when ``device="auto"`` fell back to CPU ("" otherwise).
        self.device_note = ""
        self.input_names = tuple(i.name for i in session.get_inputs())
        self.output_names = tuple(o.name for o in session.get_outputs())
        self.labels = info.labels
        self.state_inputs: tuple[StateInput, ...] = info.state_inputs

    def __repr__(self) -> str:
        return (
            f"EmotionModel({str(self.path)!r}, version={self.info.version!r}, "
            f"device={self.device!r}, labels={len(self.labels)})"
        )

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        device: str = "auto",
        threads: int | None = None,
        cuda_options: Mapping[str, str] | None = None,
    ) -> EmotionModel:
        """Load ``path``, validate it against the contract, and open a session.

        ``device``: "auto" (CUDA when usable, else CPU), "cpu", or "cuda"
        (a :class:`DeviceError` when no GPU is usable). ``threads``: ONNX
        Runtime intra-op threads (default: the number of CPU cores).
        ``cuda_options``: the CUDA provider's options (default
        :data:`CUDA_PROVIDER_OPTIONS`; ``benchmarks/bench_gpu.py`` compares others).
        Raises :class:`ContractError` (one line, naming the file) for a
        missing, corrupt or non-conforming model.
        """
        model_path = Path(path)
        if device not in DEVICES:
            raise DeviceError(f"unknown device {device!r}; use one of {', '.join(DEVICES)}")
        if not model_path.is_file():
            raise ContractError(f"{model_path}: model file not found")

        check = cuda_check() if device != "cpu" else CudaCheck(False, "")
        want_cuda = check.usable
        if device == "cuda" and not want_cuda:
            raise DeviceError(
                "device 'cuda' requested but no usable CUDA GPU was found "
                "(no driver, no device, or onnxruntime without CUDA); use --device cpu"
            )
        providers: list[Any] = [_CPU_PROVIDER]
        if want_cuda:
            options_for_cuda = dict(CUDA_PROVIDER_OPTIONS if cuda_options is None else cuda_options)
            providers = [(_CUDA_PROVIDER, options_for_cuda), _CPU_PROVIDER]

        # Provider set-up logs through the default logger, not the session's.
        ort.set_default_logger_severity(_ORT_LOG_SEVERITY)
        options = ort.SessionOptions()
        options.log_severity_level = _ORT_LOG_SEVERITY
        options.intra_op_num_threads = int(threads) if threads else (os.cpu_count() or 1)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Pool threads that spin between batches burn the core the audio pipeline
        # needs; a live monitor waits for audio most of the time, so they sleep.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # With CUDA asked for, ONNX Runtime's C++ side may print pages about a library it could
        # not load before it falls back: that text is captured, and its first line becomes the
        # one-line reason (device_note) instead.
        captured: list[str] = []
        try:
            with captured_stderr(captured) if want_cuda else contextlib.nullcontext():
                session = ort.InferenceSession(str(model_path), options, providers=providers)
        except Exception as exc:  # ORT raises several pybind types; all mean "cannot load"
            raise ContractError(f"{model_path}: cannot load ONNX model: {_one_line(exc)}") from None

        meta = dict(session.get_modelmeta().custom_metadata_map)
        meta = _merge_sidecar(model_path, meta)
        try:
            info = ModelInfo.from_metadata(meta)
        except ContractError as exc:
            raise ContractError(f"{model_path}: {_one_line(exc)}") from None
        _validate(model_path, session, info)

        model = cls(model_path, session, info)
        if device == "auto" and model.device != "cuda":
            said = next((line.strip() for line in "".join(captured).splitlines() if line.strip()), "")
            model.device_note = check.reason or one_line(
                "CUDA looked usable but the session runs on CPU" + (f": {said}" if said else ""), limit=300)
        if device == "cuda" and model.device != "cuda":
            raise DeviceError(
                f"{model_path}: device 'cuda' requested but the session fell back to "
                f"{', '.join(model.providers)}"
            )
        return model

    # ---------------------------------------------------------------- inference

    def infer(
        self,
        audio: np.ndarray,
        lengths: np.ndarray,
        state: Mapping[str, np.ndarray | Sequence[np.ndarray | None]] | None = None,
    ) -> InferenceOutput:
        """Run one padded batch.

        ``audio`` float32 ``[B, N]`` (16 kHz, zero-padded), ``lengths`` int64
        ``[B]`` with ``0 <= lengths <= N``. ``state`` maps a state input's
        name to either a ``[B, width]`` array or a sequence of B rows where
        ``None`` means "no state yet"; missing inputs or rows are filled
        with the input's ``empty`` value. Raises :class:`InferenceError` on
        a run failure or non-finite outputs, ``ValueError`` on bad shapes.
        """
        audio = np.ascontiguousarray(audio, dtype=np.float32)
        lengths = np.ascontiguousarray(lengths, dtype=np.int64)
        if audio.ndim != 2 or audio.shape[0] == 0:
            raise ValueError(f"audio must be a non-empty [batch, samples] array, got {audio.shape}")
        batch = audio.shape[0]
        if lengths.shape != (batch,):
            raise ValueError(f"lengths must have shape ({batch},), got {lengths.shape}")
        if lengths.min() < 0 or lengths.max() > audio.shape[1]:
            raise ValueError(f"lengths must lie in [0, {audio.shape[1]}]")

        feeds: dict[str, np.ndarray] = {
            contract.INPUT_AUDIO: audio,
            contract.INPUT_LENGTHS: lengths,
        }
        for spec in self.state_inputs:
            feeds[spec.name] = _state_rows(spec, batch, (state or {}).get(spec.name))

        try:
            values = self.session.run(None, feeds)
        except Exception as exc:
            raise InferenceError(f"model run failed: {_one_line(exc)}") from None
        raw = dict(zip(self.output_names, values))

        for name in (*contract.REQUIRED_OUTPUTS, *self._update_outputs()):
            bad = ~np.isfinite(raw[name]).all(axis=tuple(range(1, raw[name].ndim)))
            if bad.any():
                rows = np.flatnonzero(bad).tolist()
                raise InferenceError(f"model produced non-finite {name} in batch rows {rows}")

        return InferenceOutput(
            probs=softmax(raw[contract.OUTPUT_EMOTION], self.info.temperature),
            avd=np.clip(raw[contract.OUTPUT_AVD], -1.0, 1.0).astype(np.float32),
            gender_probs=softmax(raw[contract.OUTPUT_GENDER]),
            state_updates={
                s.name: raw[s.update_output] for s in self.state_inputs if s.update_output
            },
            raw=raw,
        )

    def _update_outputs(self) -> list[str]:
        return [s.update_output for s in self.state_inputs if s.update_output]


# ------------------------------------------------------------------ helpers


def _one_line(exc: BaseException) -> str:
    # ORT messages start with "[ONNXRuntimeError] : 7 : INVALID_PROTOBUF : " and may
    # run over several lines; the informative part is the rest of the first line.
    lines = str(exc).strip().splitlines()
    first = _ORT_PREFIX.sub("", lines[0].strip()) if lines else ""
    return one_line(first, limit=300) or type(exc).__name__


def _merge_sidecar(model_path: Path, meta: dict[str, str]) -> dict[str, str]:
    """Fill keys the ONNX metadata lacks from ``<stem>.json`` beside the model."""
    sidecar = model_path.with_suffix(".json")
    if not sidecar.is_file():
        return meta
    try:
        data = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ContractError(f"{sidecar}: unreadable metadata sidecar: {_one_line(exc)}") from None
    if not isinstance(data, dict):
        raise ContractError(f"{sidecar}: metadata sidecar must hold a JSON object")
    merged = dict(meta)
    for key, value in data.items():
        if key not in merged:
            # Props are strings (JSON where structured); the sidecar may hold native JSON.
            merged[str(key)] = value if isinstance(value, str) else json.dumps(value)
    return merged


def _static_dim(dim: object) -> int | None:
    return dim if isinstance(dim, int) and dim > 0 else None


def _validate(path: Path, session: ort.InferenceSession, info: ModelInfo) -> None:
    """Check the session's tensors against the contract and the metadata."""
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}

    def fail(problem: str) -> NoReturn:
        raise ContractError(f"{path}: {problem}")

    def check(kind: str, table: Mapping[str, Any], name: str, rank: int, dtype: str) -> list[Any]:
        if name not in table:
            fail(f"model has no {kind} {name!r} (it has {', '.join(sorted(table)) or 'none'})")
        shape = list(table[name].shape or [])
        if len(shape) != rank:
            fail(f"{kind} {name!r} has rank {len(shape)}, the contract needs rank {rank}")
        if table[name].type != dtype:
            fail(f"{kind} {name!r} is {table[name].type}, the contract needs {dtype}")
        return shape

    check("input", inputs, contract.INPUT_AUDIO, 2, "tensor(float)")
    check("input", inputs, contract.INPUT_LENGTHS, 1, "tensor(int64)")
    emotion = check("output", outputs, contract.OUTPUT_EMOTION, 2, "tensor(float)")
    avd = check("output", outputs, contract.OUTPUT_AVD, 2, "tensor(float)")
    gender = check("output", outputs, contract.OUTPUT_GENDER, 2, "tensor(float)")

    width = _static_dim(emotion[1])
    if width is not None and width != len(info.labels):
        fail(
            f"metadata lists {len(info.labels)} labels but {contract.OUTPUT_EMOTION!r} "
            f"has {width} columns"
        )
    if _static_dim(avd[1]) not in (None, 3):
        fail(f"output {contract.OUTPUT_AVD!r} has {avd[1]} columns, the contract needs 3")
    if _static_dim(gender[1]) not in (None, 2):
        fail(f"output {contract.OUTPUT_GENDER!r} has {gender[1]} columns, the contract needs 2")

    declared = {s.name for s in info.state_inputs}
    for spec in info.state_inputs:
        shape = check("state input", inputs, spec.name, 2, "tensor(float)")
        if _static_dim(shape[1]) not in (None, spec.width):
            fail(f"state input {spec.name!r} has {shape[1]} columns, metadata says {spec.width}")
        if spec.update_output is not None and spec.update_output not in outputs:
            fail(f"state input {spec.name!r} names update output {spec.update_output!r}, "
                 "which the model lacks")
    known = {contract.INPUT_AUDIO, contract.INPUT_LENGTHS} | declared
    for name in inputs:
        if name not in known:
            fail(f"input {name!r} is neither audio, lengths nor a state input declared in the "
                 f"metadata key {contract.META_STATE_INPUTS!r}")


def _state_rows(
    spec: StateInput, batch: int, given: np.ndarray | Sequence[np.ndarray | None] | None
) -> np.ndarray:
    """A float32 [batch, width] state tensor; absent rows hold ``spec.empty``."""
    out = np.full((batch, spec.width), spec.empty, np.float32)
    if given is None:
        return out
    if isinstance(given, np.ndarray):
        arr = np.asarray(given, np.float32)
        if arr.shape != (batch, spec.width):
            raise ValueError(
                f"state {spec.name!r} must have shape ({batch}, {spec.width}), got {arr.shape}"
            )
        return np.ascontiguousarray(arr)
    if len(given) != batch:
        raise ValueError(f"state {spec.name!r} has {len(given)} rows for a batch of {batch}")
    for i, row in enumerate(given):
        if row is None:
            continue
        values = np.asarray(row, np.float32).reshape(-1)
        if values.size != spec.width:
            raise ValueError(f"state {spec.name!r} row {i} has {values.size} values, not {spec.width}")
        out[i] = values
    return out
