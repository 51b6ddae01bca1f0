"""Evaluate an exported model through the monitor's own path (``serstream analyze``).

Training measures online speaker adaptation with :func:`training.train.predict`
on silence-trimmed cached audio: each speaker's utterances in a fixed shuffled
order, each normalised with the statistics of the ones before it. The monitor
does the same thing its own way: VAD segments, windows, ONNX Runtime, and a
speaker state that grows from the model's ``frame_stats`` output. This module
feeds the original files to that path in the same order (one stream per
speaker, ``file,stream`` CSV), reads each file's ``file`` summary event (the
top label of its segment-weighted probabilities) and scores them with the
training metrics. Figures close to the CV's ``online`` mode for the same
model and speakers say the two adaptations agree.

Out: ``streams.csv`` (the analysed order), ``events.jsonl`` (every event),
``predictions.csv`` (one row per file) and ``onnx-eval.json`` (figures).
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from serstream.contract import LABELS

from .datasets import scan_corpora
from .folds import ravdess_actor_folds

__all__ = [
    "OnnxEvalError",
    "StreamFile",
    "monitor_order",
    "parse_speakers",
    "run_onnx_eval",
    "score_files",
    "write_stream_csv",
]

RESULT_FILE = "onnx-eval.json"
_FOLD = re.compile(r"^fold[:\-]?(\d+)$", re.IGNORECASE)
_ACTORS = re.compile(r"^(\d+)(?:-(\d+))?$")


class OnnxEvalError(ValueError):
    """Bad input to the evaluation (speakers, model); the message is one line."""


@dataclass(frozen=True)
class StreamFile:
    """One file in the analysed order: its stream (speaker), place in the stream and true label index."""

    stream: str
    position: int
    path: Path
    label: int


def parse_speakers(text: str) -> tuple[list[str], int | None]:
    """Speaker ids and the fold (or None) from ``--speakers``.

    ``fold:3`` (or ``fold3``): RAVDESS fold 3's test actors (9-12).
    Otherwise a comma list of RAVDESS actor numbers or ranges (``1,2,5-8``)
    and full speaker ids (``ravdess:01``, ``tess:OAF``).
    """
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise OnnxEvalError("--speakers is empty")
    fold = _FOLD.match(items[0])
    if fold:
        if len(items) > 1:
            raise OnnxEvalError(f"--speakers: a fold ({items[0]}) cannot be combined with other speakers")
        folds = {f.index: f for f in ravdess_actor_folds()}
        index = int(fold.group(1))
        if index not in folds:
            raise OnnxEvalError(f"--speakers: no fold {index}; RAVDESS folds are 1-{len(folds)}")
        return sorted(folds[index].test_speakers), index
    speakers: list[str] = []
    for item in items:
        actors = _ACTORS.match(item)
        if actors:
            first, last = int(actors.group(1)), int(actors.group(2) or actors.group(1))
            if not 1 <= first <= last:
                raise OnnxEvalError(f"--speakers: bad actor range {item!r}")
            speakers.extend(f"ravdess:{a:02d}" for a in range(first, last + 1))
        elif ":" in item:
            speakers.append(item)
        else:
            raise OnnxEvalError(f"--speakers: {item!r} is neither an actor number, a range, a corpus:speaker id "
                                f"nor fold:K")
    return sorted(set(speakers)), None


def monitor_order(utterances: Sequence, speakers: Iterable[str], order_seed: int = 0) -> list[StreamFile]:
    """The given speakers' utterances, speaker by speaker, each in the order ``predict(mode="online")`` uses.

    ``utterances`` must be in scan order (the cache's order), so the positions
    that :func:`speaker_orders` shuffles are the same ones training shuffled.
    """
    from .train import speaker_orders  # imported here: train imports torch, nothing else here needs it

    wanted = list(speakers)
    speaker = np.array([u.speaker for u in utterances])
    missing = sorted(set(wanted) - set(speaker.tolist()))
    if missing:
        known = sorted(set(speaker.tolist()))
        raise OnnxEvalError(f"no utterances of {', '.join(missing)} (found {len(known)} speakers: "
                            f"{', '.join(known[:6])}{', ...' if len(known) > 6 else ''})")
    idx = np.flatnonzero(np.isin(speaker, wanted))
    rows = []
    for spk, positions in speaker_orders(speaker[idx], order_seed).items():
        for k, pos in enumerate(positions):
            u = utterances[int(idx[pos])]
            rows.append(StreamFile(spk, k, Path(u.path).resolve(), LABELS.index(u.label)))
    return rows


def write_stream_csv(rows: Sequence[StreamFile], path: Path) -> Path:
    """``file,stream`` rows in order: the input of ``serstream analyze --csv``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "stream"])
        writer.writerows([str(r.path), r.stream] for r in rows)
    return path


def _load_model(model_path: Path, threads: int | None) -> Any:
    from serstream.contract import ContractError
    from serstream.inference.session import DeviceError, EmotionModel

    try:
        model = EmotionModel.load(model_path, device="cpu", threads=threads)
    except (ContractError, DeviceError) as exc:
        raise OnnxEvalError(" ".join(str(exc).split())) from None
    unknown = [label for label in model.info.labels if label not in LABELS]
    if unknown:
        raise OnnxEvalError(f"{model_path}: labels {unknown} are not in the training label space")
    return model


def analyze_csv(model_path: Path, csv_path: Path, events_path: Path, threads: int | None = None) -> tuple[dict[str, dict], Any]:
    """Run ``serstream analyze --csv`` in-process; every event to ``events_path``; file events by path."""
    from serstream import events
    from serstream.analyze import AnalyzeConfig, analyze, read_stream_csv

    model = _load_model(model_path, threads)
    streams = read_stream_csv(csv_path)  # the CSV the way the CLI reads it, not our rows
    by_file: dict[str, dict] = {}
    with Path(events_path).open("w", encoding="utf-8") as out:
        def emit(event: dict[str, Any]) -> None:
            out.write(events.dumps(event) + "\n")
            if event.get("type") == "file":
                by_file[str(Path(event["file"]).resolve())] = event

        # The CLI's defaults (VAD aggressiveness 2, 0.5 s hop, 32-window batches) are AnalyzeConfig's.
        summary = analyze(model, streams, emit, AnalyzeConfig())
    return by_file, summary


def score_files(rows: Sequence[StreamFile], file_events: Mapping[str, Mapping[str, Any]]) -> dict:
    """UAR, accuracy, macro F1 and confusion of the files' top labels.

    A file with no estimate (no speech found, or unreadable) counts as an
    error in accuracy and UAR (the monitor said nothing about it); macro F1
    and the confusion matrix cover the files with an estimate.
    """
    from . import metrics as M

    y = np.array([r.label for r in rows], dtype=np.int64)
    pred = np.array([_predicted(file_events.get(str(r.path))) for r in rows], dtype=np.int64)
    scored = pred >= 0
    figures: dict[str, Any] = {
        "n": int(len(rows)),
        "n_without_estimate": int((~scored).sum()),
        "accuracy": M.accuracy(y, pred),
        "uar": M.uar(y, pred),
        "macro_f1": M.macro_f1(y[scored], pred[scored]) if scored.any() else float("nan"),
        "confusion": M.confusion_matrix(y[scored], pred[scored], len(LABELS)).tolist() if scored.any()
        else np.zeros((len(LABELS), len(LABELS)), np.int64).tolist(),
        "classes_present": [LABELS[c] for c in np.unique(y)],
    }
    streams = np.array([r.stream for r in rows])
    figures["uar_by_speaker"] = {str(s): round(M.uar(y[streams == s], pred[streams == s]), 4) for s in np.unique(streams)}
    return {k: (round(float(v), 4) if isinstance(v, float) else v) for k, v in figures.items()}


def _predicted(event: Mapping[str, Any] | None) -> int:
    label = event.get("label") if event else None
    return LABELS.index(label) if label is not None else -1


def _write_predictions(rows: Sequence[StreamFile], file_events: Mapping[str, Mapping[str, Any]], path: Path) -> None:
    with Path(path).open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "stream", "position", "label", "predicted", "confidence", "segments"])
        for r in rows:
            event = file_events.get(str(r.path)) or {}
            probs = event.get("probs") or {}
            label = event.get("label")
            writer.writerow([str(r.path), r.stream, r.position, LABELS[r.label], label or "",
                             f"{probs[label]:.4f}" if label in probs else "", event.get("segments", "")])


def _cv_figures(cv_dir: Path, fold: int) -> dict[str, float]:
    """The CV run's UAR per mode for this fold (torch path), to print beside the monitor's."""
    path = Path(cv_dir) / f"fold-{fold}.json"
    if not path.is_file():
        raise OnnxEvalError(f"--cv: {path} does not exist (has fold {fold} finished?)")
    result = json.loads(path.read_text())
    return {mode: result[mode]["uar"] for mode in ("none", "online", "full", "online_tta") if mode in result}


def run_onnx_eval(model_path: Path, data: Path, speakers_text: str, out_dir: Path, *, order_seed: int = 0,
                  threads: int | None = None, cv_dir: Path | None = None) -> dict:
    """Analyse the speakers' files with ``model_path`` as the monitor would; writes and returns the figures."""
    model_path, out_dir = Path(model_path), Path(out_dir)
    if not model_path.is_file():
        raise OnnxEvalError(f"model file {model_path} not found")
    speakers, fold = parse_speakers(speakers_text)
    if cv_dir is not None and fold is None:
        raise OnnxEvalError("--cv needs --speakers fold:K (the CV figures are per fold)")
    corpora = sorted({s.split(":", 1)[0] for s in speakers})
    scan = scan_corpora(Path(data), corpora)
    rows = monitor_order(scan.utterances, speakers, order_seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = write_stream_csv(rows, out_dir / "streams.csv")
    file_events, summary = analyze_csv(model_path, csv_path, out_dir / "events.jsonl", threads)
    _write_predictions(rows, file_events, out_dir / "predictions.csv")
    result = {
        "model": str(model_path),
        "speakers": sorted({r.stream for r in rows}),
        "fold": fold,
        "order_seed": order_seed,
        "analyze": {"files": summary.files, "failed": len(summary.failed), "segments": summary.segments,
                    "windows": summary.windows, "seconds": round(summary.seconds, 2)},
        "monitor": score_files(rows, file_events),
    }
    if cv_dir is not None and fold is not None:  # (--cv without a fold was refused above)
        result["cv_uar"] = _cv_figures(cv_dir, fold)
    (out_dir / RESULT_FILE).write_text(json.dumps(result, indent=1))
    return result


def summary_line(result: Mapping[str, Any]) -> str:
    """One line for the terminal: the monitor's figures and, when known, the CV's."""
    m = result["monitor"]
    line = (f"monitor path: UAR {m['uar']:.3f}  accuracy {m['accuracy']:.3f}  over {m['n']} files of "
            f"{len(result['speakers'])} speakers ({m['n_without_estimate']} without an estimate)")
    if "cv_uar" in result:
        line += "; CV (torch) UAR " + "  ".join(f"{k} {v:.3f}" for k, v in result["cv_uar"].items())
    return line
