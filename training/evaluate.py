"""Result files and tables of the generalisation evaluations (``loco``, ``ased-cv``, ``cv``).

Each command trains its folds with :func:`training.cv.run_cv`; the functions
here read the saved ``fold-K/predictions.npz`` and write one JSON per run:

- ``loco.json``: per held-out corpus, 4-class UAR (neutral/happy/sad/angry) and
  UAR over the held-out corpus's own classes, speaker history none and online;
  their mean over the held-out corpora; pooled calibration and gender gaps.
- ``ased-cv.json``: per fold, UAR over ASED's classes on all sentences and on
  the common sentences (SS 01-02) only, per history mode; mean +/- std.
- ``generalisation.json`` (beside a cv run's ``summary.json``): pooled
  calibration and per-corpus gender gaps.

Every file holds a ``headline`` dict of its key figures: ``report --compare``
sets runs side by side from them (e.g. the v0.4 and v0.3 recipes on the same folds),
and pools runs that differ only in their seed (:func:`pool_headlines`): across three
seeds of one recipe a held-out corpus's UAR moved by up to 13 points and the LOCO
mean by up to 5.7 (models/README.md), more than most differences between recipes,
so one seed per recipe decides nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .generalise import (
    calibration_and_fairness,
    four_class_indices,
    gender_bias_check,
    gender_gap_by_intensity,
    held_out_temperatures,
    load_predictions,
    misreadings_by_gender,
    open_figures,
    recall_by_gender,
    restricted_figures,
    select,
    speaker_uar_by_gender,
)

__all__ = [
    "ASED_FILE",
    "CV_FILE",
    "LOCO_FILE",
    "ased_cv_results",
    "calibration_markdown",
    "compare_markdown",
    "cv_generalisation",
    "gender_markdown",
    "headline_of",
    "loco_markdown",
    "loco_results",
    "pool_headlines",
    "rescore",
    "ased_markdown",
]

LOCO_FILE = "loco.json"
ASED_FILE = "ased-cv.json"
CV_FILE = "generalisation.json"
LOCO_MODES = ("none", "online")
ASED_MODES = ("none", "online", "full")


#: ``ased-cv --n-folds``'s default: 13 speakers per fold.
DEFAULT_ASED_FOLDS = 5


def _fold_preds(out_dir: Path, indices: Sequence[int]) -> dict[int, dict]:
    found = {}
    for k in indices:
        fold_dir = Path(out_dir) / f"fold-{k}"
        if (fold_dir / "predictions.npz").is_file():
            found[k] = load_predictions(fold_dir)
    return found


def _calibration(preds: Sequence[Mapping], modes: Sequence[str], held_out_corpora: bool = False) -> dict:
    """Per mode, :func:`calibration_and_fairness`; with ``held_out_corpora`` (each fold tests a corpus
    no fold model trained on) also the temperature fitted across held-out corpora (``held_out_temperature``)."""
    out = {m: c for m in modes if (c := calibration_and_fairness(list(preds), m))}
    if held_out_corpora:
        for mode, c in out.items():
            if cross := held_out_temperatures([p[mode] for p in preds if mode in p]):
                c["held_out_temperature"] = cross
    return out


def loco_results(out_dir: Path, held_out: Sequence[str], config: Mapping | None = None) -> dict:
    """Score every finished leave-one-corpus-out fold of ``out_dir``; writes ``loco.json``."""
    preds = _fold_preds(out_dir, range(1, len(held_out) + 1))
    per: dict[str, dict] = {}
    for k, p in preds.items():
        corpus = held_out[k - 1]
        row: dict = {"fold": k, "train_corpora": [c for c in held_out if c != corpus]}
        for mode in LOCO_MODES:
            if mode in p:
                row[mode] = {"four_class": restricted_figures(p[mode], four_class_indices()),
                             "own_classes": restricted_figures(p[mode]), "open": open_figures(p[mode])}
        per[corpus] = row
    mean = {}
    for mode in LOCO_MODES:
        u4 = [r[mode]["four_class"]["uar"] for r in per.values() if mode in r and r[mode]["four_class"]["n"]]
        uo = [r[mode]["own_classes"]["uar"] for r in per.values() if mode in r]
        un = [r[mode]["open"]["uar"] for r in per.values() if mode in r]
        if uo:
            mean[mode] = {"uar_four_class": round(float(np.mean(u4)), 4) if u4 else None,
                          "uar_own_classes": round(float(np.mean(uo)), 4), "uar_open": round(float(np.mean(un)), 4),
                          "held_out": len(uo)}
    results = {"held_out": per, "mean": mean, "complete": len(per) == len(held_out),
               "corpora": list(held_out), "calibration": _calibration(list(preds.values()), LOCO_MODES, held_out_corpora=True),
               "config": dict(config or {})}
    results["headline"] = headline_of("loco", results)
    (Path(out_dir) / LOCO_FILE).write_text(json.dumps(results, indent=1))
    return results


def ased_cv_results(out_dir: Path, n_folds: int, config: Mapping | None = None) -> dict:
    """Score every finished ASED fold of ``out_dir``; writes ``ased-cv.json``."""
    preds = _fold_preds(out_dir, range(1, n_folds + 1))
    folds = {}
    for k, p in preds.items():
        row: dict = {"fold": k}
        for mode in ASED_MODES:
            if mode not in p:
                continue
            test = select(p[mode], np.char.startswith(p[mode]["speaker"].astype(str), "ased:"))
            row["test_speakers"] = sorted(set(test["speaker"].tolist()))
            common = select(test, test["common"] == 1)
            row[mode] = {"all": restricted_figures(test), "open": open_figures(test),
                         "common": restricted_figures(common) if len(common["label"]) else {"n": 0}}
        folds[str(k)] = row
    summary: dict[str, dict] = {}
    for mode in ASED_MODES:
        for part in ("all", "common"):
            vals = [r[mode][part]["uar"] for r in folds.values() if mode in r and "uar" in r[mode][part]]
            if vals:
                summary.setdefault(mode, {})[part] = {"uar_mean": round(float(np.mean(vals)), 4),
                                                      "uar_std": round(float(np.std(vals)), 4), "folds": vals}
    results = {"folds": folds, "summary": summary, "n_folds": n_folds, "complete": len(folds) == n_folds,
               "calibration": _calibration(list(preds.values()), ("online",)), "config": dict(config or {})}
    results["headline"] = headline_of("ased-cv", results)
    (Path(out_dir) / ASED_FILE).write_text(json.dumps(results, indent=1))
    return results


def rescore(out_dir: Path, kind: str, results: Mapping) -> dict:
    """A loco / ased-cv run's result file scored anew from its saved fold predictions (rewritten in place).

    ``report`` calls this so that a run finished before a figure was added (e.g.
    the gender gap's speaker interval) shows it; a folder without predictions
    (only the result file was kept) is returned as it is.
    """
    if not any(Path(out_dir).glob("fold-*/predictions.npz")):
        return dict(results)
    if kind == "loco":
        return loco_results(out_dir, results["corpora"], results.get("config"))
    # ased-cv.json records its fold count since 2026-12-03; earlier files: a complete run's count
    # is its folds', a partial run was the default 5 (only "complete" depends on it)
    n_folds = results.get("n_folds") or (len(results["folds"]) if results.get("complete") else DEFAULT_ASED_FOLDS)
    return ased_cv_results(out_dir, int(n_folds), results.get("config"))


def cv_generalisation(out_dir: Path, summary: Mapping | None = None) -> dict:
    """Pooled calibration and per-corpus gender gaps of a RAVDESS cv run; writes ``generalisation.json``."""
    dirs = sorted(Path(out_dir).glob("fold-*/predictions.npz"))
    preds = [load_predictions(d.parent) for d in dirs]
    results = {"calibration": _calibration(preds, ("none", "online")), "folds": len(preds),
               "recall_by_gender": recall_by_gender(preds, "online"), "gender_bias_check": gender_bias_check(preds, "online"),
               "gender_gap_by_intensity": gender_gap_by_intensity(preds, "online"),
               "misreadings_by_gender": misreadings_by_gender(preds, "online"),
               "speaker_uar_by_gender": speaker_uar_by_gender(preds, "online")}
    if summary:
        results["uar"] = {m: s["uar"]["mean"] for m, s in summary.items() if "uar" in s}
    results["headline"] = headline_of("cv", results)
    (Path(out_dir) / CV_FILE).write_text(json.dumps(results, indent=1))
    return results


def headline_of(kind: str, results: Mapping) -> dict:
    """The key figures of a run, flat: what ``report --compare`` puts side by side."""
    h: dict = {}
    if kind == "loco":
        for mode, m in results.get("mean", {}).items():
            h[f"loco mean 4-class UAR ({mode})"] = m["uar_four_class"]
            h[f"loco mean own-class UAR ({mode})"] = m["uar_own_classes"]
            h[f"loco mean 8-way UAR ({mode})"] = m.get("uar_open")
        for corpus, r in results.get("held_out", {}).items():
            for mode in LOCO_MODES:
                if mode in r:
                    h[f"-> {corpus} 4-class UAR ({mode})"] = r[mode]["four_class"].get("uar")
                    h[f"-> {corpus} own-class UAR ({mode})"] = r[mode]["own_classes"].get("uar")
                    h[f"-> {corpus} 8-way UAR ({mode})"] = r[mode].get("open", {}).get("uar")
                    h[f"-> {corpus} share given an absent label ({mode})"] = r[mode].get("open", {}).get(
                        "predicted_absent")
    elif kind == "ased-cv":
        for mode, parts in results.get("summary", {}).items():
            for part, s in parts.items():
                h[f"ASED UAR {part} sentences ({mode})"] = s["uar_mean"]
        opened = [r["online"]["open"] for r in results.get("folds", {}).values() if "online" in r and "open" in r["online"]]
        if opened:
            h["ASED 8-way UAR, fold mean (online)"] = round(float(np.mean([o["uar"] for o in opened])), 4)
            h["ASED share given an absent label (online)"] = round(
                float(sum(o["predicted_absent"] * o["n"] for o in opened) / sum(o["n"] for o in opened)), 4)
    elif kind == "cv":
        for mode, u in results.get("uar", {}).items():
            h[f"RAVDESS UAR ({mode})"] = u
    cal = results.get("calibration", {}).get("online")
    if cal:
        h["ECE pooled, online (pooled T)"] = cal["ece_pooled"]
        h["temperature fitted on (clips)"] = cal["temperature_fitted_on"]
        if "held_out_temperature" in cal:
            h["ECE fold mean, online (T from the other held-out corpora)"] = cal["held_out_temperature"]["ece_mean"]
        for corpus, gap in cal["uar_gap_female_minus_male"].items():
            h[f"F-M UAR gap {corpus} (online)"] = gap
    return h


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def loco_markdown(results: Mapping) -> str:
    lines = ["\n**Leave-one-corpus-out** (UAR %, argmax over the scored classes; 8-way: argmax over all "
             "labels as the shipped model answers, absent: % of clips given a label the corpus lacks)\n",
             "| held out | trained on | n | 4-class none | 4-class online | own classes | own none | own online "
             "| 8-way online | absent online |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for corpus, r in results["held_out"].items():
        f = {m: r.get(m, {}) for m in LOCO_MODES}
        own = f["online"].get("own_classes", {}) or f["none"].get("own_classes", {})
        lines.append(f"| {corpus} | {'+'.join(r['train_corpora'])} | {own.get('n', 0)} | "
                     f"{_pct(f['none'].get('four_class', {}).get('uar'))} | {_pct(f['online'].get('four_class', {}).get('uar'))} | "
                     f"{len(own.get('classes', []))} | {_pct(f['none'].get('own_classes', {}).get('uar'))} | "
                     f"{_pct(f['online'].get('own_classes', {}).get('uar'))} | "
                     f"{_pct(f['online'].get('open', {}).get('uar'))} | "
                     f"{_pct(f['online'].get('open', {}).get('predicted_absent'))} |")
    m = results.get("mean", {})
    lines.append(f"| **mean** | | | {_pct(m.get('none', {}).get('uar_four_class'))} | "
                 f"{_pct(m.get('online', {}).get('uar_four_class'))} | | {_pct(m.get('none', {}).get('uar_own_classes'))} | "
                 f"{_pct(m.get('online', {}).get('uar_own_classes'))} | {_pct(m.get('online', {}).get('uar_open'))} | |")
    if not results.get("complete", True):
        lines.append(f"\n(partial: {len(results['held_out'])} of {len(results['corpora'])} held-out corpora finished)")
    return "\n".join(lines) + "\n" + calibration_markdown(results.get("calibration", {}))


def ased_markdown(results: Mapping) -> str:
    modes = [m for m in ASED_MODES if m in results["summary"]]
    head = " | ".join(f"all {m} | common {m}" for m in modes)
    lines = ["\n**ASED 5-fold speaker-independent** (folds: speakers dealt round-robin by PP; UAR % over ASED's "
             "classes; common = sentences 01-02)\n",
             f"| fold | test speakers | {head} |", "|---" * (2 + 2 * len(modes)) + "|"]
    for k, r in sorted(results["folds"].items(), key=lambda kv: int(kv[0])):
        spk = sorted(r.get("test_speakers", []), key=lambda x: int(x.split(":")[1]))
        pps = [x.split(":")[1] for x in spk]
        span = (f"{','.join(pps[:2])},...,{pps[-1]}" if len(pps) > 3 else ",".join(pps)) if pps else "-"
        cells = " | ".join(f"{_pct(r[m]['all'].get('uar'))} | {_pct(r[m]['common'].get('uar'))}" for m in modes)
        lines.append(f"| {k} | {span} ({len(spk)}) | {cells} |")
    cells = " | ".join(f"{_pct(results['summary'][m][p]['uar_mean'])} +/- {_pct(results['summary'][m][p]['uar_std'])}"
                       for m in modes for p in ("all", "common") if p in results["summary"][m])
    lines.append(f"| **mean +/- std** | | {cells} |")
    h = headline_of("ased-cv", results)
    if "ASED 8-way UAR, fold mean (online)" in h:
        lines.append(f"\n8-way argmax (the shipped model's answer), online: UAR {_pct(h['ASED 8-way UAR, fold mean (online)'])} %, "
                     f"{_pct(h['ASED share given an absent label (online)'])} % of clips given a label ASED lacks.")
    return "\n".join(lines) + "\n" + calibration_markdown(results.get("calibration", {}))


def _figure(value: float | None) -> str:
    """A UAR in [0, 1] as a 3-decimal figure, or '-' when there is none."""
    return "-" if value is None else f"{value:.3f}"


def _interval(bounds) -> str:
    return "" if not bounds else f" [{100 * bounds[0]:+.1f}, {100 * bounds[1]:+.1f}]"


def calibration_markdown(calibration: Mapping) -> str:
    if not calibration:
        return ""
    lines = ["\n**Calibration (one temperature fitted on all folds' validation clips pooled) and gender gap**\n",
             "| history | T | fitted on | ECE raw | ECE after T (pooled) | ECE after T (fold mean) | F-M UAR gap per corpus "
             "[95 % over speakers] |",
             "|---|---|---|---|---|---|---|"]
    for mode, c in calibration.items():
        intervals = c.get("uar_gap_interval_95", {})  # absent in result files older than 2026-12-03
        gaps = ", ".join(f"{k} {'-' if v is None else f'{100 * v:+.1f}'}{_interval(intervals.get(k))}"
                         for k, v in c["uar_gap_female_minus_male"].items())
        lines.append(f"| {mode} | {c['temperature']:.3f} | {c['temperature_fitted_on']} | {c['ece_raw_pooled']:.3f} | "
                     f"{c['ece_pooled']:.3f} | {c['ece_mean']:.3f} | {gaps} |")
    cross = {mode: c["held_out_temperature"] for mode, c in calibration.items() if "held_out_temperature" in c}
    if cross:
        lines += ["\n**Calibration across held-out corpora** (each held-out corpus at the temperature fitted on the "
                  "other held-out corpora's test clips; T all: fitted on every held-out corpus)\n",
                  "| history | T per held-out fold | ECE raw per fold | ECE after T per fold | ECE after T (mean) | T all |",
                  "|---|---|---|---|---|---|"]
        for mode, x in cross.items():
            per_fold = {key: " / ".join(f"{f[key]:{fmt}}" for f in x["folds"])
                        for key, fmt in (("temperature", ".2f"), ("ece_raw", ".3f"), ("ece", ".3f"))}
            lines.append(f"| {mode} | {per_fold['temperature']} | {per_fold['ece_raw']} | {per_fold['ece']} | "
                         f"{x['ece_mean']:.3f} | {x['temperature_all']:.3f} ({x['fitted_on_all']} clips) |")
    return "\n".join(lines) + "\n"


def gender_markdown(results: Mapping) -> str:
    """A cv run's recall per class and gender, and the per-gender bias check (online)."""
    by_gender = results.get("recall_by_gender") or {}
    if not by_gender:
        return ""
    classes = [c for c in next(iter(by_gender.values()))["recall"]]
    lines = ["\n**Recall per class and gender, online, all test folds pooled**\n",
             "| gender | n | UAR | " + " | ".join(classes) + " |", "|---|---|---|" + "---|" * len(classes)]
    for name, g in by_gender.items():
        lines.append(f"| {name} | {g['n']} | {g['uar']:.3f} | " +
                     " | ".join(f"{g['recall'].get(c, float('nan')):.2f}" for c in classes) + " |")
    by_level = results.get("gender_gap_by_intensity") or {}
    if by_level:
        n_classes = next(iter(by_level.values()))["classes"]
        lines += [f"\n**UAR by gender and intensity, online** (over the {n_classes} classes recorded at every "
                  "intensity)\n", "| intensity | n | female | male | F-M |", "|---|---|---|---|---|"]
        for level, r in by_level.items():
            gap = r.get("gap_female_minus_male")
            lines.append(f"| {level} | {r['n']} | {_figure(r.get('female'))} | {_figure(r.get('male'))} | "
                         f"{'-' if gap is None else f'{100 * gap:+.1f}'} |")
    misread = results.get("misreadings_by_gender") or {}
    if misread:
        names = list(misread)
        lines += ["\n**Where each gender's misreadings go, online** (the two wrong labels given most often, share "
                  "of the class's clips)\n", "| class | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for c in classes:
            cells = [", ".join(f"{label} {100 * share:.0f} %" for label, share in misread[g].get(c, [])) or "-"
                     for g in names]
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
    speakers = results.get("speaker_uar_by_gender") or {}
    if speakers:
        lines += ["\n**Each test speaker's UAR, online, lowest first**\n", "| gender | mean | median | speakers |",
                  "|---|---|---|---|"]
        for name, g in speakers.items():
            lines.append(f"| {name} | {g['mean']:.3f} | {g['median']:.3f} | "
                         + ", ".join(f"{spk.split(':')[-1]} {v:.2f}" for spk, v in g["speakers"]) + " |")
        if "above_female_median" in speakers.get("male", {}):
            lines.append(f"\n{speakers['male']['above_female_median']} of {len(speakers['male']['speakers'])} men read "
                         f"above the women's median; {speakers['female']['below_male_median']} of "
                         f"{len(speakers['female']['speakers'])} women below the men's.")
    check = results.get("gender_bias_check") or {}
    if check:
        a, b = check["as_is"], check["gender_bias"]
        lines.append(f"\nWith a per-gender class bias fitted on the other folds' validation speakers (the gender the "
                     f"model predicts picks it): UAR {100 * a['uar']:.1f} -> {100 * b['uar']:.1f}, female-minus-male "
                     f"{100 * a['uar_gap_female_minus_male']:+.1f} -> {100 * b['uar_gap_female_minus_male']:+.1f} points.")
    return "\n".join(lines) + "\n"


def find_result(run_dir: Path) -> tuple[str, dict] | None:
    """(kind, results) of the evaluation file in ``run_dir`` (loco, ased-cv or cv), or None."""
    for kind, name in (("loco", LOCO_FILE), ("ased-cv", ASED_FILE), ("cv", CV_FILE)):
        path = Path(run_dir) / name
        if path.is_file():
            return kind, json.loads(path.read_text())
    return None


def pool_headlines(headlines: Sequence[Mapping]) -> dict[str, dict]:
    """Per figure, over runs that differ only in their seed: mean, min, max and how many runs had it."""
    keys: list[str] = []
    for h in headlines:
        keys += [k for k in h if k not in keys]
    pooled = {}
    for k in keys:
        values = [float(h[k]) for h in headlines if h.get(k) is not None]
        if values:
            pooled[k] = {"mean": float(np.mean(values)), "min": min(values), "max": max(values), "n": len(values)}
    return pooled


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, Mapping):  # pooled seeds
        if v["n"] == 1:
            return f"{v['mean']:.3f}"
        return f"{v['mean']:.3f} ({v['min']:.3f} to {v['max']:.3f}, {v['n']} seeds)"
    return str(v) if isinstance(v, int) else f"{v:.3f}"


def compare_markdown(runs: Sequence[tuple[str, Mapping]]) -> str:
    """Headline figures of several runs side by side: one row per figure, one column per run.

    A column may be pooled seeds (:func:`pool_headlines`): its cells read "mean (min to max, n seeds)".
    """
    keys: list[str] = []
    for _, h in runs:
        keys += [k for k in h if k not in keys]
    lines = ["| figure | " + " | ".join(name for name, _ in runs) + " |", "|---" * (len(runs) + 1) + "|"]
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(_cell(h.get(k)) for _, h in runs) + " |")
    return "\n".join(lines) + "\n"
