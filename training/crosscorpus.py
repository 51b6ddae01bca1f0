"""Cross-corpus check: train on RAVDESS alone, test on another corpus (TESS by default).

Every RAVDESS actor trains except two validation actors (one male, one
female, drawn as a CV fold draws them), which pick the epoch and fit the
calibration temperature. The test corpus is never seen in training. Its
utterances are scored with the same figures as a CV fold (:func:`fold_metrics`)
for each speaker-history mode. TESS has no "calm": UAR averages recall over
the classes the test corpus holds (7 for TESS), while the model still chooses
among all labels, so a "calm" answer counts as an error. ``predicted_absent``
says how often that happened.

Out: ``OUT/crosscorpus.json`` (figures) and ``OUT/crosscorpus/`` (model,
training log, checkpoint, predictions, confusion matrix).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from serstream.contract import LABELS

from .cache import CachedCorpus
from .cv import ALL_MODES, score_split, utterance_view
from .datasets import DatasetError
from .folds import RAVDESS_CORPUS, cross_corpus_split
from .train import TrainConfig, train_model

__all__ = ["RESULT_FILE", "RUN_DIR", "crosscorpus_markdown", "find_crosscorpus", "run_crosscorpus"]

RESULT_FILE = "crosscorpus.json"
RUN_DIR = "crosscorpus"


def _split(corpus: CachedCorpus, test_corpus: str, seed: int):
    """The cross-corpus split; DatasetError (one line) when a corpus is missing from the cache."""
    present = set(map(str, np.unique(corpus.corpus)))
    for name, role in ((RAVDESS_CORPUS, "training"), (test_corpus, "test")):
        if name not in present:
            raise DatasetError(f"cross-corpus check: no {name} utterances to use as the {role} corpus "
                               f"(found: {', '.join(sorted(present)) or 'none'})")
    try:
        return cross_corpus_split(utterance_view(corpus), test_corpus=test_corpus, seed=seed)
    except ValueError as exc:  # e.g. too few RAVDESS actors for validation and training
        raise DatasetError(str(exc)) from None


def _absent_share(figures: Mapping[str, Any]) -> float:
    """Share of test utterances given a label that the test corpus does not hold."""
    cm = np.asarray(figures["confusion"])
    absent = [i for i, name in enumerate(LABELS) if name not in figures["classes_present"]]
    return round(float(cm[:, absent].sum() / max(cm.sum(), 1)), 4)


def run_crosscorpus(corpus: CachedCorpus, config: TrainConfig, out_dir: Path, *, test_corpus: str = "tess",
                    seed: int = 0, tta: bool = False, progress: bool = False) -> dict:
    """Train on RAVDESS, score ``test_corpus``; writes ``out_dir/crosscorpus.json`` and returns its content."""
    import torch

    split = _split(corpus, test_corpus, seed)
    out_dir = Path(out_dir)
    run_dir = out_dir / RUN_DIR
    run_dir.mkdir(parents=True, exist_ok=True)
    train_idx, val_idx, test_idx = (corpus.indices(s) for s in (split.train_speakers, split.val_speakers, split.test_speakers))
    log_file = open(run_dir / "train.log", "a")

    def log(msg: str) -> None:
        print(f"[crosscorpus] {msg}", file=sys.stderr, flush=True)
        print(msg, file=log_file, flush=True)

    log(f"train {len(train_idx)} {RAVDESS_CORPUS} utterances, val {len(val_idx)}, test {len(test_idx)} {test_corpus}")
    result = train_model(corpus, train_idx, val_idx, config, run_dir, progress=progress, log=log)
    torch.save(result.model.state_dict(), run_dir / "model.pt")
    scores = score_split(result.model, corpus, val_idx, test_idx, config.seed, run_dir, tta=tta)
    from . import metrics as M  # imported late: a metrics bug must not cost a training run

    classes = [name for name in LABELS if name in scores["online"]["classes_present"]]
    absent = [name for name in LABELS if name not in classes]
    for mode in ALL_MODES:
        if mode in scores:
            scores[mode]["predicted_absent"] = _absent_share(scores[mode])
    figures = {
        "train_corpus": RAVDESS_CORPUS,
        "test_corpus": test_corpus,
        "train_speakers": sorted(split.train_speakers),
        "val_speakers": sorted(split.val_speakers),
        "test_speakers": sorted(split.test_speakers),
        "classes_scored": classes,
        "classes_absent": absent,
        "scoring": (f"UAR is the mean recall over the {len(classes)} classes present in {test_corpus} "
                    f"({', '.join(classes)}); absent from it: {', '.join(absent) or 'none'}. The model still "
                    f"chooses among all {len(LABELS)} labels, so an absent label counts as an error "
                    f"(share in 'predicted_absent')."),
        "best_epoch": result.best_epoch,
        "best_val_uar": result.best_val_uar,
        "history": result.history,
        **scores,
    }
    M.plot_confusion(np.asarray(figures["online"]["confusion"]), list(LABELS), run_dir / "confusion-online.png",
                     f"{RAVDESS_CORPUS} -> {test_corpus} (online adaptation)")
    (out_dir / RESULT_FILE).write_text(json.dumps(figures, indent=1))
    log("test UAR " + " ".join(f"{m}={figures[m]['uar']}" for m in ALL_MODES if m in figures))
    return figures


def find_crosscorpus(path: Path) -> Path | None:
    """``path`` itself when it is a file, else ``path/crosscorpus.json`` when that exists."""
    path = Path(path)
    if path.is_file():
        return path
    candidate = path / RESULT_FILE
    return candidate if candidate.is_file() else None


def crosscorpus_markdown(figures: Mapping[str, Any]) -> str:
    """One row per speaker-history mode, the same columns as the CV table plus ``predicted_absent``."""
    cols = ("n", "accuracy", "uar", "macro_f1", "top3", "ccc_arousal", "ccc_valence", "ece_raw", "ece_calibrated",
            "gender_accuracy", "predicted_absent")
    n_train = len(figures["train_speakers"]) + len(figures["val_speakers"])
    lines = [
        f"\n**Cross-corpus: trained on {figures['train_corpus']} ({n_train} speakers, "
        f"{len(figures['val_speakers'])} of them for validation), tested on {figures['test_corpus']} "
        f"({len(figures['test_speakers'])} unseen speakers)**\n",
        figures["scoring"] + "\n",
        "| speaker history | " + " | ".join(cols) + " |",
        "|---" * (len(cols) + 1) + "|",
    ]
    for mode in ALL_MODES:
        if mode in figures:
            row = figures[mode]
            cells = [str(row[c]) if c == "n" else f"{row.get(c, float('nan')):.3f}" for c in cols]
            lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
