"""Several runs of one evaluation, their predictions averaged: what an ensemble of their models scores.

The issue behind v0.4 lists "several models distilled into one" among the things
that might generalise. Before building distillation, this measures its ceiling
from runs that already exist: the seeds of one recipe in ``loco`` or ``ased-cv``.
Each averaged row is the mean of the members' class probabilities (returned as
its log, so every scorer that takes logits reads it unchanged); arousal, valence
and dominance are averaged too.

What can and cannot be averaged:

- Test rows are the same clips in the same order in every seed (the held-out
  corpus, or the fold's test speakers). That is checked (labels, speakers,
  sentences, genders equal) before anything is averaged.
- Validation rows are not: each seed draws its own validation speakers. The
  ensemble therefore has no validation predictions and no temperature or
  calibration figures; it answers only "how many clips does it get right".
- In the ``online`` and ``full`` modes each seed replayed a speaker's clips in
  its own order, so the members of an averaged row had heard different earlier
  clips of that speaker. ``none`` (no speaker history) is the clean comparison.
"""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .cache import save_npz_atomically
from .evaluate import DEFAULT_ASED_FOLDS, ased_cv_results, find_result, loco_results
from .generalise import load_predictions
from .metrics import softmax

__all__ = ["EnsembleError", "average_predictions", "ensemble_runs"]

#: Row identity: these arrays must be equal in every member for a row to be the same clip.
ROW_KEYS = ("label", "speaker", "sentence", "gender")
PROBABILITY_KEYS = ("emotion_logits", "gender_logits")
class EnsembleError(ValueError):
    """Runs that cannot be averaged (different kinds, folds, corpora or clips); one line."""


def average_predictions(members: Sequence[Mapping[str, Mapping[str, np.ndarray]]]) -> dict[str, dict[str, np.ndarray]]:
    """One fold's predictions (as :func:`load_predictions` gives them) of several runs, averaged per row.

    Every test mode that all members have is averaged; validation rows are left out (see the
    module docstring). Raises EnsembleError when a mode's rows are not the same clips in all.
    """
    if len(members) < 2:
        raise EnsembleError("an ensemble needs at least two runs")
    modes = [m for m in members[0] if m != "val" and not m.startswith("val_") and all(m in p for p in members)]
    out: dict[str, dict[str, np.ndarray]] = {}
    for mode in modes:
        first = members[0][mode]
        for other in members[1:]:
            for key in ROW_KEYS:
                if key not in first:
                    continue
                theirs = other[mode].get(key)
                if theirs is None or not np.array_equal(first[key], theirs):
                    raise EnsembleError(f"mode {mode}: the runs' rows are not the same clips ({key} differs)")
        averaged = {k: np.asarray(v) for k, v in first.items() if k not in PROBABILITY_KEYS and k != "avd"}
        for key in PROBABILITY_KEYS:
            if all(key in p[mode] for p in members):
                mean = np.mean([softmax(p[mode][key]) for p in members], axis=0)
                averaged[key] = np.log(np.maximum(mean, 1e-12)).astype(np.float32)
        if all("avd" in p[mode] for p in members):
            averaged["avd"] = np.mean([p[mode]["avd"] for p in members], axis=0).astype(np.float32)
        out[mode] = averaged
    if not out:
        raise EnsembleError("the runs share no test mode")
    return out


def ensemble_runs(run_dirs: Sequence[Path], out_dir: Path) -> tuple[str, dict]:
    """Average the finished folds of several ``loco`` or ``ased-cv`` runs into ``out_dir``; score them.

    Returns (kind, results) as :func:`training.evaluate.find_result` would read them back.
    """
    found = []
    for run in run_dirs:
        try:
            result = find_result(Path(run))
        except ValueError as exc:  # a truncated or hand-edited loco.json / ased-cv.json
            raise EnsembleError(f"{run}: its result file is not valid JSON ({exc})") from None
        if result is None or result[0] not in ("loco", "ased-cv"):
            raise EnsembleError(f"{run} holds no loco.json or ased-cv.json (a finished loco or ased-cv run)")
        found.append(result)
    kinds = {kind for kind, _ in found}
    if len(kinds) > 1:
        raise EnsembleError(f"the runs are of different kinds: {sorted(kinds)}")
    kind = found[0][0]
    if kind == "loco":
        corpora = [r["corpora"] for _, r in found]
        if any(c != corpora[0] for c in corpora):
            raise EnsembleError(f"the runs held out different corpora: {corpora}")
    folds = sorted(set.intersection(*[{int(p.parent.name.split("-")[1]) for p in Path(run).glob("fold-*/predictions.npz")}
                                      for run in run_dirs]))
    if not folds:
        raise EnsembleError("the runs have no finished fold in common")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for k in folds:
        members = []
        for run in run_dirs:
            try:
                members.append(load_predictions(Path(run) / f"fold-{k}"))
            except (OSError, ValueError, zipfile.BadZipFile) as exc:  # truncated or not an .npz
                raise EnsembleError(f"{run}/fold-{k}/predictions.npz cannot be read: {type(exc).__name__}: {exc}") from None
        averaged = average_predictions(members)
        (out_dir / f"fold-{k}").mkdir(exist_ok=True)
        save_npz_atomically(out_dir / f"fold-{k}" / "predictions.npz",
                            **{f"{mode}.{key}": v for mode, arrays in averaged.items() for key, v in arrays.items()})
    config = {"ensemble_of": [str(Path(r)) for r in run_dirs]}  # recorded in the result file
    if kind == "loco":
        if (Path(run_dirs[0]) / "splits.json").is_file():  # which corpus each fold held out
            shutil.copy(Path(run_dirs[0]) / "splits.json", out_dir / "splits.json")
        results = loco_results(out_dir, found[0][1]["corpora"], config)  # writes loco.json
    else:
        # ased-cv.json records --n-folds since 2026-12-03; in earlier files a complete run's count
        # is its folds', a partial run was one of the default 5 (only "complete" depends on it)
        n_folds = max(r.get("n_folds") or (len(r["folds"]) if r.get("complete") else DEFAULT_ASED_FOLDS)
                      for _, r in found)
        results = ased_cv_results(out_dir, n_folds, config)  # writes ased-cv.json
    return kind, results
