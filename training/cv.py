"""Speaker-independent cross-validation: one process per fold, figures per fold and summarised.

Each fold trains on every speaker but its test actors (TESS and any other
corpus always train), picks the epoch on two validation actors, fits the
calibration temperature on them, and scores the test actors three ways:
no speaker history, online history (the monitor's way), and full history.
With ``tta`` a fourth mode, ``online_tta``, scores online history with
test-time augmentation (:data:`training.train.TTA_VARIANTS`); its temperature
is fitted on the validation actors scored the same way. Run folders from
before TTA simply lack that mode.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from serstream.contract import LABELS

from .cache import CachedCorpus
from .train import TrainConfig, predict, train_model

if TYPE_CHECKING:
    from .model import EmotionNet

__all__ = ["MODES", "TTA_MODE", "fold_metrics", "result_modes", "run_fold", "run_cv", "score_split", "utterance_view"]

MODES = ("none", "online", "full")
#: Online history with test-time augmentation: an extra mode, present only when asked for.
TTA_MODE = "online_tta"
ALL_MODES = (*MODES, TTA_MODE)


def fold_metrics(pred: dict, temperature: float) -> dict:
    """Every figure the model card reports, for one fold's test predictions."""
    from . import metrics as M
    from .targets import avd_target

    y = pred["label"]
    logits = pred["emotion_logits"]
    present = np.unique(y)
    p_raw = M.softmax(logits) if hasattr(M, "softmax") else _softmax(logits)
    p_cal = _softmax(logits / temperature)
    yhat = logits.argmax(1)
    avd_true = np.array([
        avd_target(LABELS[label], {0: "normal", 1: "strong"}.get(int(i))) for label, i in zip(y, pred["intensity"])
    ])
    g = pred["gender"]
    known = g >= 0
    out = {
        "n": int(len(y)),
        "accuracy": M.accuracy(y, yhat),
        "uar": M.uar(y, yhat),
        "macro_f1": M.macro_f1(y, yhat),
        "top3": M.top_k_accuracy(y, logits, 3),
        "ccc_arousal": M.ccc(avd_true[:, 0], pred["avd"][:, 0]),
        "ccc_valence": M.ccc(avd_true[:, 1], pred["avd"][:, 1]),
        "ece_raw": M.ece(p_raw, y),
        "ece_calibrated": M.ece(p_cal, y),
        "gender_accuracy": float(np.mean(pred["gender_logits"][known].argmax(1) == g[known])) if known.any() else float("nan"),
        "confusion": M.confusion_matrix(y, yhat, len(LABELS)).tolist(),
        "classes_present": [LABELS[c] for c in present],
    }
    if known.any() and len(np.unique(g[known])) == 2:
        names = np.where(g == 1, "male", np.where(g == 0, "female", "unknown"))
        out["uar_gap_female_minus_male"] = M.gender_uar_gap(y, yhat, names)
    return {k: (round(float(v), 4) if isinstance(v, (float, np.floating)) else v) for k, v in out.items()}


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def score_split(model: EmotionNet, corpus: CachedCorpus, val_idx: np.ndarray, test_idx: np.ndarray, seed: int,
                run_dir: Path, tta: bool = False) -> dict:
    """Predict validation and test utterances, save the predictions, and score every mode.

    Returns ``{"temperature", ["temperature_tta",] mode: figures, ...}``.
    Predictions are saved first (``run_dir/predictions.npz``), figures second: a
    metrics change can be re-scored without retraining (:func:`rescore_fold`).
    """
    val = {"val": predict(model, corpus, val_idx, mode="online", order_seed=seed)}
    preds = {mode: predict(model, corpus, test_idx, mode=mode, order_seed=seed) for mode in MODES}
    if tta:
        val["val_tta"] = predict(model, corpus, val_idx, mode="online", order_seed=seed, tta=True)
        preds[TTA_MODE] = predict(model, corpus, test_idx, mode="online", order_seed=seed, tta=True)
    # allow_pickle=True is numpy's default, spelt out: otherwise mypy checks the ** arrays against that bool
    np.savez(Path(run_dir) / "predictions.npz", allow_pickle=True,
             **{f"{s}.{k}": v for s, p in val.items() for k, v in p.items()},
             **{f"{m}.{k}": v for m, p in preds.items() for k, v in p.items()})
    return _figures(val, preds)


def _figures(val: dict[str, dict], preds: dict[str, dict]) -> dict:
    """Temperatures from the validation predictions, then every mode's figures."""
    from . import metrics as M  # imported late: a metrics bug must not cost a training run

    temperature = M.fit_temperature(val["val"]["emotion_logits"], val["val"]["label"])
    figures: dict = {"temperature": round(float(temperature), 4)}
    temperature_tta = temperature
    if TTA_MODE in preds and "val_tta" in val:
        temperature_tta = M.fit_temperature(val["val_tta"]["emotion_logits"], val["val_tta"]["label"])
        figures["temperature_tta"] = round(float(temperature_tta), 4)
    for mode in ALL_MODES:
        if mode in preds:
            figures[mode] = fold_metrics(preds[mode], temperature_tta if mode == TTA_MODE else temperature)
    return figures


def run_fold(corpus: CachedCorpus, split, config: TrainConfig, out_dir: Path, progress: bool = False,
             tta: bool = False) -> dict:
    """Train and evaluate one fold; writes ``fold-K.json`` and confusion PNGs in ``out_dir``."""
    import torch

    fold_dir = Path(out_dir) / f"fold-{split.index}"
    fold_dir.mkdir(parents=True, exist_ok=True)
    train_idx = corpus.indices(split.train_speakers)
    val_idx = corpus.indices(split.val_speakers)
    test_idx = corpus.indices(split.test_speakers)
    log_file = open(fold_dir / "train.log", "a")

    def log(msg: str) -> None:
        print(f"[fold {split.index}] {msg}", file=sys.stderr, flush=True)
        print(msg, file=log_file, flush=True)

    log(f"train {len(train_idx)} utterances, val {len(val_idx)}, test {len(test_idx)}")
    result = train_model(corpus, train_idx, val_idx, config, fold_dir, progress=progress, log=log)
    torch.save(result.model.state_dict(), fold_dir / "model.pt")
    scores = score_split(result.model, corpus, val_idx, test_idx, config.seed, fold_dir, tta=tta)
    from . import metrics as M  # imported late: a metrics bug must not cost a training run

    figures = {"fold": split.index, "test_speakers": list(split.test_speakers), "val_speakers": list(split.val_speakers),
               "best_epoch": result.best_epoch, "best_val_uar": result.best_val_uar, "history": result.history, **scores}
    cm = np.asarray(figures["online"]["confusion"])
    M.plot_confusion(cm, list(LABELS), fold_dir / "confusion-online.png", f"fold {split.index} (online adaptation)")
    (Path(out_dir) / f"fold-{split.index}.json").write_text(json.dumps(figures, indent=1))
    log("test UAR " + " ".join(f"{m}={figures[m]['uar']}" for m in ALL_MODES if m in figures))
    return figures


def add_tta(corpus: CachedCorpus, cv_dir: Path) -> list[dict]:
    """Score every finished fold of ``cv_dir`` again from its saved weights, now with the TTA mode.

    For a CV run made without ``--tta``: no retraining, the same validation and
    test actors (from ``fold-K.json``), the same seed; ``fold-K.json`` keeps its
    training history and gains ``online_tta`` and ``temperature_tta``.
    """
    import torch

    from .model import EmotionNet, ModelConfig

    cv_dir = Path(cv_dir)
    config = json.loads((cv_dir / "config.json").read_text())
    model_config = ModelConfig.from_dict(config["model"])
    results = []
    for fold_json in sorted(cv_dir.glob("fold-*.json")):
        figures = json.loads(fold_json.read_text())
        fold_dir = cv_dir / fold_json.stem
        if not (fold_dir / "model.pt").is_file():
            continue
        model = EmotionNet(model_config)
        model.load_state_dict(torch.load(fold_dir / "model.pt", weights_only=True))
        model.eval()
        val_idx = corpus.indices(figures["val_speakers"])
        test_idx = corpus.indices(figures["test_speakers"])
        figures.update(score_split(model, corpus, val_idx, test_idx, int(config.get("seed", 0)), fold_dir, tta=True))
        fold_json.write_text(json.dumps(figures, indent=1))
        print(f"[{fold_json.stem}] " + " ".join(f"{m}={figures[m]['uar']}" for m in ALL_MODES if m in figures),
              file=sys.stderr, flush=True)
        results.append(figures)
    return results


def _fold_worker(args) -> dict:
    # A pool spawns a fresh process per fold, which imports the code as it is
    # on disk then: jobs from a run_cv started before TTA have four fields.
    corpus_path, split, config, out_dir, *rest = args
    z = np.load(corpus_path, allow_pickle=False)
    corpus = CachedCorpus(**{k: z[k] for k in z.files})
    return run_fold(corpus, split, config, Path(out_dir), tta=bool(rest[0]) if rest else False)


def run_cv(corpus_path: Path, splits: Sequence, config: TrainConfig, out_dir: Path, workers: int = 2,
           tta: bool = False) -> list[dict]:
    """Run folds in ``workers`` processes of ``config.threads`` threads each.

    On a 2-core machine two single-thread processes outran one two-thread
    process by 1.45x in the calibration runs.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=1))
    jobs = [(str(corpus_path), s, config, str(out_dir), tta) for s in splits]
    if workers <= 1:
        return [_fold_worker(j) for j in jobs]
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, maxtasksperchild=1) as pool:
        return list(pool.imap(_fold_worker, jobs))


def result_modes(results: Sequence[dict]) -> list[str]:
    """The adaptation modes that at least one result holds, in report order."""
    return [m for m in ALL_MODES if any(m in r for r in results)]


def summarise(results: Sequence[dict]) -> dict:
    """Mean, std and per-fold values of every figure, per mode (``online_tta`` over the folds that have it)."""
    keys = ("accuracy", "uar", "macro_f1", "top3", "ccc_arousal", "ccc_valence", "ece_raw", "ece_calibrated",
            "gender_accuracy", "uar_gap_female_minus_male")
    summary: dict[str, dict] = {}
    for mode in result_modes(results):
        summary[mode] = {}
        for k in keys:
            vals = [r[mode][k] for r in results if mode in r and k in r[mode]]
            if vals:
                summary[mode][k] = {"mean": round(float(np.mean(vals)), 4), "std": round(float(np.std(vals)), 4),
                                    "folds": vals}
    return summary


def rescore_fold(fold_dir: Path) -> dict:
    """Figures from a fold's saved predictions (after a metrics change, without retraining)."""
    z = np.load(Path(fold_dir) / "predictions.npz", allow_pickle=False)
    groups: dict[str, dict[str, np.ndarray]] = {}
    for key in z.files:
        prefix, name = key.split(".", 1)
        groups.setdefault(prefix, {})[name] = z[key]
    val = {k: v for k, v in groups.items() if k in ("val", "val_tta")}
    preds = {k: v for k, v in groups.items() if k in ALL_MODES}
    return {"fold": int(Path(fold_dir).name.split("-")[1]), **_figures(val, preds)}


def collect(cv_dir: Path) -> list[dict]:
    """Every finished fold of a CV run: its fold-K.json, or a re-score of its saved predictions."""
    results = []
    for fold_dir in sorted(Path(cv_dir).glob("fold-*/")):
        js = Path(cv_dir) / f"{fold_dir.name}.json"
        if js.exists():
            results.append(json.loads(js.read_text()))
        elif (fold_dir / "predictions.npz").exists():
            figures = rescore_fold(fold_dir)
            js.write_text(json.dumps(figures, indent=1))
            results.append(figures)
    return results


def markdown_report(results: Sequence[dict]) -> str:
    """The model card's table: mean UAR/accuracy per mode, then per fold and mean +/- std, for each mode."""
    cols = ("accuracy", "uar", "macro_f1", "top3", "ccc_arousal", "ccc_valence", "ece_raw", "ece_calibrated", "gender_accuracy",
            "uar_gap_female_minus_male")
    modes = result_modes(results)
    lines = ["\n**Speaker history modes side by side** (mean +/- std over the folds that have the mode)\n",
             "| speaker history | folds | uar | accuracy | macro_f1 |", "|---|---|---|---|---|"]
    for mode in modes:
        have = [r for r in results if mode in r]
        cells = [f"{np.mean([r[mode][c] for r in have]):.3f} +/- {np.std([r[mode][c] for r in have]):.3f}"
                 for c in ("uar", "accuracy", "macro_f1")]
        lines.append(f"| {mode} | {len(have)} | " + " | ".join(cells) + " |")
    for mode in modes:
        have = sorted((r for r in results if mode in r), key=lambda r: r["fold"])
        lines.append(f"\n**Speaker history: {mode}**\n")
        lines.append("| fold (test actors) | " + " | ".join(cols) + " |")
        lines.append("|---" * (len(cols) + 1) + "|")
        for r in have:
            actors = f"{4 * r['fold'] - 3}-{4 * r['fold']}"
            lines.append(f"| {r['fold']} ({actors}) | " + " | ".join(f"{r[mode].get(c, float('nan')):.3f}" for c in cols) + " |")
        means = [np.nanmean([r[mode].get(c, np.nan) for r in have]) for c in cols]
        stds = [np.nanstd([r[mode].get(c, np.nan) for r in have]) for c in cols]
        lines.append("| **mean +/- std** | " + " | ".join(f"{m:.3f} +/- {s:.3f}" for m, s in zip(means, stds)) + " |")
    lines.append(per_class_markdown(results, "online"))
    return "\n".join(lines) + "\n"


def summed_confusion(results: Sequence[dict], mode: str) -> np.ndarray:
    """The test folds' confusion matrices of ``mode`` added up (rows: true label, contract order)."""
    have = [np.asarray(r[mode]["confusion"]) for r in results if mode in r and "confusion" in r[mode]]
    return np.sum(have, axis=0) if have else np.zeros((len(LABELS), len(LABELS)), dtype=np.int64)


def per_class_markdown(results: Sequence[dict], mode: str) -> str:
    """Recall of each class over all test folds, with the two labels it is most often mistaken for."""
    cm = summed_confusion(results, mode)
    lines = [f"\n**Per class, {mode}, all test folds summed**\n", "| class | n | recall | most often called |",
             "|---|---|---|---|"]
    for i, label in enumerate(LABELS):
        n = int(cm[i].sum())
        if n == 0:
            continue
        others = sorted((j for j in range(len(LABELS)) if j != i), key=lambda j: -cm[i, j])[:2]
        mistaken = ", ".join(f"{LABELS[j]} {cm[i, j] / n:.2f}" for j in others if cm[i, j] > 0)
        lines.append(f"| {label} | {n} | {cm[i, i] / n:.2f} | {mistaken} |")
    return "\n".join(lines)


def utterance_view(corpus: CachedCorpus) -> list:
    """Lightweight stand-ins for Utterance objects (speaker, corpus, gender), enough for fold construction."""
    from types import SimpleNamespace

    genders = {0: "female", 1: "male", -1: None}
    return [SimpleNamespace(speaker=str(s), corpus=str(c), gender=genders[int(g)])
            for s, c, g in zip(corpus.speaker, corpus.corpus, corpus.gender)]
