"""``python -m training`` (also ``serstream-train``): train, cross-validate, export, baseline.

Examples:
  python -m training cv --data ../shared/data --out runs/cv [--tta] [--corpora ravdess,tess,ased]
  python -m training loco --data ../shared/data --out runs/loco [--recipe v0.3]
  python -m training ased-cv --data ../shared/data --out runs/ased-cv
  python -m training report --loco runs/loco --compare runs/loco runs/loco-v03
  python -m training ensemble --out runs/loco-ens runs/loco runs/loco-s1 runs/loco-s2
  python -m training crosscorpus --data ../shared/data --out runs/cross
  python -m training report --cv runs/cv [--crosscorpus runs/cross]
  python -m training train --data ../shared/data --out runs/final --export models/serstream-default.onnx
  python -m training onnx-eval --model models/serstream-default.onnx --data ../shared/data --speakers fold:3 --out runs/onnx-eval
  python -m training baseline --data ../shared/data
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

__all__ = ["UsageError", "main"]


def _pseudo_count(text: str) -> float:
    """``--prior-frames`` / ``--prior-windows``: a finite count of 0 or more."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a count of 0 (off) or more, got {text!r}")
    return value


def _cepstral_count(text: str) -> int:
    """``--cepstral-stats``: checked when the command line is parsed, before any corpus is read."""
    from .frontend import FrontendConfig

    bands = FrontendConfig().n_mels
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= bands:
        raise argparse.ArgumentTypeError(f"must be 0 (off) to {bands} (the log-mel bands), got {text!r}")
    return value


class UsageError(Exception):
    """A bad argument that is not about a corpus (a missing checkpoint, a wrong corpus role); one line."""


def _config(args: argparse.Namespace):
    """The TrainConfig of a training command: its recipe, then any flag given explicitly.

    ValueError when the result is inconsistent (window statistics z-scored without cepstra)."""
    from .train import DEFAULT_RECIPE, RECIPES, TrainConfig

    cfg = TrainConfig()
    updates = dict(RECIPES[getattr(args, "recipe", None) or DEFAULT_RECIPE])
    model = replace(cfg.model, **updates.pop("model"))
    updates.update({k: getattr(args, k) for k in ("epochs", "steps_per_epoch", "seed", "threads", "device", "lr", "crop_s",
                                                  "patience", "pitch_prob", "stretch_prob", "ema_decay", "mask_loss",
                                                  "sampling", "corpus_weight", "other_corpus_prob", "other_corpus_pick",
                                                  "unmasked_weight", "select")
                    if getattr(args, k, None) is not None})
    if args.no_augment:
        updates["augment"] = False
    if getattr(args, "cepstral_stats", None) is not None:
        model = replace(model, cepstral_stats=args.cepstral_stats)
    if getattr(args, "speaker_window_stats", None) is not None:
        model = replace(model, speaker_window_stats=args.speaker_window_stats)
        if not args.speaker_window_stats and getattr(args, "prior_windows", None) is None:
            model = replace(model, prior_windows=0.0)  # the recipe's window prior goes with its window statistics
    if getattr(args, "prior_frames", None) is not None:
        model = replace(model, prior_frames=args.prior_frames)
    if getattr(args, "prior_windows", None) is not None:
        model = replace(model, prior_windows=args.prior_windows)
    if getattr(args, "prior_cold_only", None) is not None:
        model = replace(model, prior_cold_only=args.prior_cold_only)
    if getattr(args, "f0_stats", None) is not None:
        model = replace(model, f0_stats=args.f0_stats)
    if model.prior_cold_only and not (model.prior_frames or model.prior_windows):
        raise ValueError("--prior-cold-only needs --prior-frames or --prior-windows")
    if model.prior_windows and not model.speaker_window_stats:
        raise ValueError("--prior-windows needs the speaker window statistics (--recipe v0.5's and v0.6's)")
    if model.speaker_window_stats and not model.cepstral_stats:
        raise ValueError("--speaker-window-stats needs --cepstral-stats K (K > 0): it z-scores those statistics "
                         "(--recipe v0.5 and v0.6 set both; --no-speaker-window-stats turns it off)")
    return replace(cfg, model=model, **updates)


def _load(args: argparse.Namespace, corpora: list[str] | None = None):
    from .cache import build_cache
    from .datasets import scan_corpora

    scan = scan_corpora(Path(args.data), corpora or args.corpora.split(","))
    print(scan.summary(), file=sys.stderr)
    if scan.skipped or scan.anomalies:
        print(scan.details(), file=sys.stderr)
    corpus = build_cache(scan.utterances, Path(args.data), Path(args.cache) if args.cache else None)
    return corpus


def _cache_path(args: argparse.Namespace, corpora: list[str] | None = None) -> Path:
    from .cache import _key, default_cache_dir
    from .datasets import scan_corpora

    scan = scan_corpora(Path(args.data), corpora or args.corpora.split(","))
    return Path(args.cache or default_cache_dir()) / f"corpus-{_key(scan.utterances, Path(args.data).resolve())}.npz"


def cmd_cv(args: argparse.Namespace) -> int:
    from .cv import run_cv, summarise, utterance_view
    from .folds import make_split, ravdess_actor_folds

    corpus = _load(args)
    config = _config(args)
    folds = ravdess_actor_folds()
    wanted = [int(f) for f in args.folds.split(",")] if args.folds != "all" else [f.index for f in folds]
    splits = [make_split(utterance_view(corpus), f, seed=args.seed or 0) for f in folds if f.index in wanted]
    results = run_cv(_cache_path(args), splits, config, Path(args.out), workers=args.workers, tta=args.tta)
    summary = summarise(results)
    (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=1))
    for mode, s in summary.items():
        print(f"{mode:>10}: UAR {s['uar']['mean']:.3f} +/- {s['uar']['std']:.3f}  accuracy {s['accuracy']['mean']:.3f}  "
              f"folds {s['uar']['folds']}")
    from .evaluate import calibration_markdown, cv_generalisation

    print(calibration_markdown(cv_generalisation(Path(args.out), summary)["calibration"]))
    return 0


def _corpus_list(args: argparse.Namespace) -> list[str]:
    from .datasets import canonical_corpus_name

    names = [canonical_corpus_name(c) for c in args.corpora.split(",") if c.strip()]
    if len(set(names)) != len(names):
        raise UsageError(f"--corpora names a corpus twice: {args.corpora}")
    return names


def cmd_loco(args: argparse.Namespace) -> int:
    """Leave-one-corpus-out: train on the others, test on each corpus in turn; writes OUT/loco.json."""
    from .cv import run_cv, utterance_view
    from .evaluate import loco_markdown, loco_results
    from .generalise import loco_splits

    corpora = _corpus_list(args)
    if len(corpora) < 2:
        raise UsageError("loco needs at least two corpora in --corpora")
    corpus = _load(args, corpora)
    config = _config(args)
    try:
        splits = loco_splits(utterance_view(corpus), corpora, seed=args.seed or 0)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    wanted = [c for c in args.held_out.split(",")] if args.held_out != "all" else corpora
    unknown = [c for c in wanted if c not in corpora]
    if unknown:
        raise UsageError(f"--held-out {','.join(unknown)} is not among --corpora {','.join(corpora)}")
    splits = [s for s, c in zip(splits, corpora) if c in wanted]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "splits.json").write_text(json.dumps(
        {c: {"fold": s.index, "val_speakers": sorted(s.val_speakers), "train_speakers": len(s.train_speakers),
             "test_speakers": len(s.test_speakers)} for s, c in zip(splits, wanted)}, indent=1))
    run_cv(_cache_path(args, corpora), splits, config, out, workers=args.workers)
    print(loco_markdown(loco_results(out, corpora, config.to_dict())))
    return 0


def cmd_ased_cv(args: argparse.Namespace) -> int:
    """ASED 5-fold speaker-independent (13 speakers per fold, dealt round-robin by PP); writes OUT/ased-cv.json."""
    from .cv import run_cv, utterance_view
    from .evaluate import ased_cv_results, ased_markdown
    from .generalise import ased_folds, ased_split

    corpora = _corpus_list(args)
    if "ased" not in corpora:
        raise UsageError("ased-cv needs ased in --corpora")
    corpus = _load(args, corpora)
    config = _config(args)
    view = utterance_view(corpus)
    try:
        folds = ased_folds({u.speaker for u in view}, n_folds=args.n_folds)
        wanted = [int(f) for f in args.folds.split(",")] if args.folds != "all" else [f.index for f in folds]
        splits = [ased_split(view, f, min_val_clips=args.val_clips, seed=args.seed or 0) for f in folds if f.index in wanted]
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    run_cv(_cache_path(args, corpora), splits, config, Path(args.out), workers=args.workers)
    print(ased_markdown(ased_cv_results(Path(args.out), args.n_folds, config.to_dict())))
    return 0


def cmd_crosscorpus(args: argparse.Namespace) -> int:
    """Train on RAVDESS alone, score the test corpus (TESS) per speaker-history mode."""
    from .crosscorpus import crosscorpus_markdown, run_crosscorpus
    from .datasets import canonical_corpus_name

    if canonical_corpus_name(args.test_corpus) == "ravdess":
        raise UsageError("crosscorpus trains on ravdess: --test-corpus must name another corpus")
    corpus = _load(args, ["ravdess", canonical_corpus_name(args.test_corpus)])
    config = _config(args)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    # Beside crosscorpus.json, as a CV run keeps it: `export` reads it for the model's shape.
    (Path(args.out) / "config.json").write_text(json.dumps(config.to_dict(), indent=1))
    figures = run_crosscorpus(corpus, config, Path(args.out), test_corpus=canonical_corpus_name(args.test_corpus),
                              seed=args.seed or 0, tta=args.tta)
    print(crosscorpus_markdown(figures))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train on every speaker (no held-out test set) and export; the epoch count comes from the CV."""
    import numpy as np
    import torch

    from .train import train_model

    corpus = _load(args)
    config = _config(args)
    idx = np.arange(len(corpus))
    result = train_model(corpus, idx, None, config, Path(args.out))
    torch.save({"model": result.model.state_dict(), "config": config.to_dict(), "corpora": args.corpora},
               Path(args.out) / "model.pt")
    if args.export:
        return _export(result.model, corpus, config, args)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export a trained ``model.pt`` to ONNX with its metadata.

    From ``train`` the file holds the weights and the config; a CV fold's or
    the cross-corpus run's ``model.pt`` holds only weights, and the config
    comes from ``--train-config`` (default: the run's ``config.json``, two
    folders up), so a fold's model can go through ``onnx-eval``.
    """
    import torch

    from .model import EmotionNet, ModelConfig
    from .train import TrainConfig

    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_file():
        raise UsageError(f"checkpoint {checkpoint} not found")
    saved = torch.load(checkpoint, weights_only=False)
    if "model" not in saved:  # a bare state dict from a CV fold or the cross-corpus run
        config_path = Path(args.train_config) if args.train_config else checkpoint.parent.parent / "config.json"
        if not config_path.is_file():
            raise UsageError(f"{checkpoint} holds only weights; its run's config.json ({config_path}) is missing "
                               f"(give --train-config)")
        saved = {"model": saved, "config": json.loads(config_path.read_text())}
    model_config = ModelConfig.from_dict(saved["config"]["model"])
    model = EmotionNet(model_config)
    model.load_state_dict(saved["model"])
    config = TrainConfig(**{k: v for k, v in saved["config"].items() if k != "model"}, model=model_config)
    # The corpora the checkpoint was trained on (train records them), unless --corpora says otherwise.
    args.corpora = args.corpora or saved.get("corpora") or "ravdess,tess"
    if args.temperature is None and not args.data:
        raise UsageError("export needs --temperature T (the CV's pooled one) or --data PATH to fit one on RAVDESS")
    corpus = _load(args) if args.temperature is None else None
    return _export(model.eval(), corpus, config, args)


def _export(model, corpus, config, args: argparse.Namespace) -> int:
    import numpy as np

    from .export import export_onnx
    from .train import predict

    temperature = args.temperature
    if temperature is None:
        from . import metrics as M

        idx = np.flatnonzero(corpus.corpus == "ravdess")
        pred = predict(model, corpus, idx, mode="online", order_seed=config.seed)
        temperature = M.fit_temperature(pred["emotion_logits"], pred["label"])
        print(f"temperature fitted on training RAVDESS speakers: {temperature:.3f} (prefer --temperature from the CV)", file=sys.stderr)
    if args.export:
        # Corpus names only: a local path says nothing to the model's users.
        extra = {"training_data": args.corpora, "train_config": config.to_dict()}
        if args.cv_summary:
            extra["cv_results"] = json.loads(Path(args.cv_summary).read_text())
        export_onnx(model, Path(args.export), temperature=temperature, version=args.version, extra=extra)
        print(f"exported {args.export}", file=sys.stderr)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Print the CV figures of a (possibly partial) run and the cross-corpus figures as Markdown tables.

    Writes summary.json in the CV folder. The cross-corpus table comes from
    ``--crosscorpus`` (a crosscorpus.json or its folder), else from a
    crosscorpus.json inside the ``--cv`` folder.
    """
    from serstream.contract import LABELS

    from .crosscorpus import crosscorpus_markdown, find_crosscorpus
    from .cv import collect, markdown_report, summarise, summed_confusion
    from .metrics import plot_confusion

    if args.loco or args.ased_cv or args.compare:
        rc = _report_generalisation(args)
        if rc or not (args.cv or args.crosscorpus):
            return rc
    if not args.cv and not args.crosscorpus:
        print("training: error: report needs --cv DIR, --crosscorpus PATH, --loco DIR, --ased-cv DIR or --compare DIR...",
              file=sys.stderr)
        return 2
    cross = None
    if args.crosscorpus:
        cross = find_crosscorpus(Path(args.crosscorpus))
        if cross is None:
            print(f"training: error: no crosscorpus.json at {args.crosscorpus}", file=sys.stderr)
            return 2
    elif args.cv:
        cross = find_crosscorpus(Path(args.cv))
    results = collect(Path(args.cv)) if args.cv and Path(args.cv).is_dir() else []
    if not results and cross is None:
        print(f"training: error: no finished folds and no crosscorpus.json in {args.cv}", file=sys.stderr)
        return 2
    if results:
        (Path(args.cv) / "summary.json").write_text(json.dumps(summarise(results), indent=1))
        print(f"{len(results)} fold(s) finished: {sorted(r['fold'] for r in results)}")
        print(markdown_report(results))
        png = plot_confusion(summed_confusion(results, "online"), list(LABELS), Path(args.cv) / "confusion-online.png",
                             f"{len(results)} test folds summed (online adaptation)")
        print(f"summed confusion matrix: {png}", file=sys.stderr)
        from .evaluate import calibration_markdown, cv_generalisation, gender_markdown

        generalisation = cv_generalisation(Path(args.cv), summarise(results))
        print(calibration_markdown(generalisation["calibration"]))
        print(gender_markdown(generalisation))
    if cross is not None:
        try:
            figures = json.loads(cross.read_text())
            table = crosscorpus_markdown(figures)
        except (ValueError, KeyError, TypeError) as exc:
            print(f"training: error: {cross} is not a crosscorpus.json: {type(exc).__name__} {exc}", file=sys.stderr)
            return 2
        print(table)
    return 0


def _report_generalisation(args: argparse.Namespace) -> int:
    """Tables of loco / ased-cv runs, a cv run's calibration, and headline figures of runs side by side."""
    from .evaluate import (
        ASED_FILE,
        LOCO_FILE,
        ased_markdown,
        compare_markdown,
        find_result,
        loco_markdown,
        pool_headlines,
        rescore,
    )

    for flag, kind, name, table in (("loco", "loco", LOCO_FILE, loco_markdown),
                                    ("ased_cv", "ased-cv", ASED_FILE, ased_markdown)):
        folder = getattr(args, flag)
        if folder:
            path = Path(folder) / name
            if not path.is_file():
                raise UsageError(f"no {name} in {folder} (is it the --out folder of a finished run?)")
            try:
                results = json.loads(path.read_text())
            except ValueError as exc:
                raise UsageError(f"{path} is not valid JSON ({exc})") from None
            print(table(rescore(Path(folder), kind, results)))
    if args.compare:
        runs: list[tuple[str, dict]] = []
        for column in args.compare:
            # "DIR", or "NAME=DIR,DIR,...": runs that differ only in their seed, pooled into one column
            name, sep, folders = column.partition("=")
            if not sep:
                name, folders = Path(column).name, column
            found = []
            for folder in folders.split(","):
                try:
                    result = find_result(Path(folder))
                except ValueError as exc:  # a truncated or hand-edited result file
                    raise UsageError(f"{folder}: its result file is not valid JSON ({exc})") from None
                if result is None:
                    raise UsageError(f"{folder} holds no loco.json, ased-cv.json or generalisation.json")
                found.append(result)
            if len({kind for kind, _ in found}) > 1:
                raise UsageError(f"{column}: pooled runs must be of one kind, got {sorted({k for k, _ in found})}")
            headlines = [r["headline"] for _, r in found]
            runs.append((name, headlines[0] if not sep else pool_headlines(headlines)))
        print(compare_markdown(runs))
    return 0


def cmd_ensemble(args: argparse.Namespace) -> int:
    """Average several loco / ased-cv runs' test predictions clip by clip; print the ensemble's table."""
    from .ensemble import EnsembleError, ensemble_runs
    from .evaluate import ased_markdown, loco_markdown

    try:
        kind, results = ensemble_runs([Path(r) for r in args.runs], Path(args.out))
    except EnsembleError as exc:
        raise UsageError(str(exc)) from None
    print(f"ensemble of {len(args.runs)} runs ({kind}); none = no speaker history, the clean comparison")
    print((loco_markdown if kind == "loco" else ased_markdown)(results))
    return 0


def cmd_onnx_eval(args: argparse.Namespace) -> int:
    """Score an ONNX model through the monitor's analysis path; one summary line out."""
    from .onnxeval import run_onnx_eval, summary_line

    result = run_onnx_eval(Path(args.model), Path(args.data), args.speakers, Path(args.out), order_seed=args.seed,
                           threads=args.threads, cv_dir=Path(args.cv) if args.cv else None)
    print(summary_line(result))
    return 0


def cmd_add_tta(args: argparse.Namespace) -> int:
    import torch

    from .cv import add_tta, collect, markdown_report

    if args.threads:
        torch.set_num_threads(args.threads)
    if not Path(args.cv, "config.json").is_file():
        raise UsageError(f"{args.cv} is not a cv run folder (no config.json)")
    corpus = _load(args)
    if not add_tta(corpus, Path(args.cv)):
        raise UsageError(f"{args.cv} has no finished folds (fold-K.json with fold-K/model.pt)")
    print(markdown_report(collect(Path(args.cv))))
    return 0


def cmd_baseline(args: argparse.Namespace) -> int:
    from . import baseline

    return baseline.main_from_args(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("cv", "train", "baseline", "crosscorpus", "loco", "ased-cv"):
        p = sub.add_parser(name, help=_HELP.get(name), description=_HELP.get(name))
        p.add_argument("--data", required=True, help="folder holding corpus subfolders (ravdess/, tess/, ...)")
        if name in ("loco", "ased-cv"):
            p.add_argument("--corpora", default="ravdess,tess,ased",
                           help="corpora read (default ravdess,tess,ased)" + (
                               "; each is held out in turn" if name == "loco" else "; all but ASED's test fold train"))
        elif name != "crosscorpus":  # its corpora are fixed: RAVDESS and --test-corpus
            p.add_argument("--corpora", default="ravdess,tess",
                           help="corpora read (default ravdess,tess; add ased for v0.4's data)")
        p.add_argument("--cache", default=None, help="decoded-audio cache folder (default ~/.cache/serstream)")
        p.add_argument("--out", default=f"runs/{name}")
        p.add_argument("--seed", type=int, default=0)
        if name != "baseline":  # the network's training flags; the linear baseline would ignore them
            p.add_argument("--epochs", type=int)
            p.add_argument("--steps-per-epoch", dest="steps_per_epoch", type=int)
            p.add_argument("--threads", type=int)
            p.add_argument("--device", choices=("cpu", "cuda"))
            p.add_argument("--lr", type=float)
            p.add_argument("--crop-s", dest="crop_s", type=float)
            p.add_argument("--no-augment", action="store_true")
            p.add_argument("--patience", type=int, help="epochs without a better validation UAR before stopping (default 6)")
            p.add_argument("--ema-decay", dest="ema_decay", type=float,
                           help="per-step decay of the weight average used for validation and the saved model "
                                "(default 0.997; 0 = off)")
            p.add_argument("--select", choices=("best", "last"), default=None,
                           help="weights a fold keeps: best (the best validation epoch, early stopping by --patience; "
                                "--recipe v0.3's and balanced's) or last (all epochs, the last weight average, as "
                                "`train` ships; --recipe v0.4's)")
            p.add_argument("--cepstral-stats", dest="cepstral_stats", type=_cepstral_count, default=None,
                           help="also feed the head each window's mean and std of this many cepstral coefficients "
                                "(DCT of the normalised log-mel; default the recipe's: 20 in v0.5 and v0.6, 0 = off in the others)")
            p.add_argument("--speaker-window-stats", dest="speaker_window_stats", action=argparse.BooleanOptionalAction,
                           default=None,
                           help="also feed those statistics of the raw log-mel, z-scored by the speaker's earlier "
                                "windows (carried in the speaker state; needs --cepstral-stats; --recipe v0.5's and v0.6's)")
            p.add_argument("--prior-frames", dest="prior_frames", type=_pseudo_count, default=None,
                           help="add a typical training speaker's band statistics (at each window's own level) to "
                                "every speaker's as this many pseudo-frames, so a first window is not normalised "
                                "against itself alone (default the recipe's: 200 in v0.6, 0 = off in the others)")
            p.add_argument("--prior-windows", dest="prior_windows", type=_pseudo_count, default=None,
                           help="the same for the z-scored window statistics, in pseudo-windows (default the recipe's: 1 in v0.6, "
                                "0 = off in the others)")
            p.add_argument("--prior-cold-only", dest="prior_cold_only", action=argparse.BooleanOptionalAction,
                           default=None,
                           help="add the prior only while a speaker has no history (the first windows), so later "
                                "windows read exactly as without it")
            p.add_argument("--f0-stats", dest="f0_stats", action=argparse.BooleanOptionalAction, default=None,
                           help="also feed the heads each window's pitch statistics from a fixed in-graph F0 tracker "
                                "(mean against the speaker's, spread, slope, movement, voicing, periodicity; "
                                "training/pitch.py; off in every recipe so far)")
            p.add_argument("--pitch-prob", dest="pitch_prob", type=float,
                           help="per-utterance chance of a +/-2 semitone pitch shift (default 0)")
            p.add_argument("--stretch-prob", dest="stretch_prob", type=float,
                           help="per-utterance chance of a 0.9-1.1x tempo change (default 0)")
        if name in ("cv", "train", "crosscorpus", "loco", "ased-cv"):
            p.add_argument("--recipe", choices=("v0.6", "v0.5", "v0.4", "balanced", "v0.3"), default="v0.6",
                           help="v0.6 (default, v0.6.0's): v0.5's plus a population prior for a speaker's first windows "
                                "(--prior-frames 200 --prior-windows 1); "
                                "v0.5 (v0.5.0's): v0.4's training with window statistics of 20 cepstra "
                                "z-scored against the speaker's earlier windows; "
                                "v0.4 (v0.4.0's): emotion loss over each corpus's classes, RAVDESS-led "
                                "batches with other corpora drawn corpus first, last weights kept, v0.3.0's graph; "
                                "balanced: the masked loss with corpus -> speaker -> class batches; "
                                "v0.3: plain 8-class loss, RAVDESS-led batches (v0.3.0's recipe). "
                                "The flags below override it")
            p.add_argument("--mask-loss", dest="mask_loss", action=argparse.BooleanOptionalAction, default=None,
                           help="emotion loss over the classes each example's corpus has (absent logits -inf)")
            p.add_argument("--unmasked-weight", dest="unmasked_weight", type=float, default=None,
                           help="with --mask-loss: weight w of the plain 8-label loss, (1-w) masked + w plain "
                                "(default 0); pushes classes a corpus lacks down a little on its clips")
            p.add_argument("--sampling", choices=("balanced", "v0.3"), default=None,
                           help="balanced: corpus (by --corpus-weight) -> speaker -> class -> clip; "
                                "v0.3: RAVDESS speakers, other corpora at --other-corpus-prob")
            p.add_argument("--corpus-weight", dest="corpus_weight", choices=("sqrt-speakers", "sqrt-size", "uniform"),
                           default=None, help="how balanced sampling picks a corpus (default sqrt-speakers)")
            p.add_argument("--other-corpus-prob", dest="other_corpus_prob", type=float, default=None,
                           help="v0.3 sampling: chance a speaker group comes from a corpus other than RAVDESS (0.25)")
            p.add_argument("--other-corpus-pick", dest="other_corpus_pick", choices=("speaker", "corpus"), default=None,
                           help="v0.3 sampling: draw an other-corpus group uniformly over those corpora's speakers "
                                "(speaker, v0.3.0's) or a corpus first, then a speaker (corpus)")
        if name in ("cv", "baseline", "ased-cv"):  # train has one model and no folds
            p.add_argument("--folds", default="all", help="fold numbers, e.g. 1,3,5 (RAVDESS actors 1-4 = fold 1; "
                           "ASED PP 01, 06, ..., 61 = fold 1; baseline: 'ased' for ASED's 5 speaker folds, 'loco' to leave each corpus out in turn)")
        if name in ("cv", "baseline", "loco", "ased-cv"):
            p.add_argument("--workers", type=int, default=2, help="folds trained in parallel processes")
        if name in ("cv", "crosscorpus"):
            p.add_argument("--tta", action="store_true",
                           help="also score online history with test-time augmentation (mode 'online_tta': "
                                "mean logits over a 5 ms shift, a 90%% centre crop and +/-6 dB)")
    sub.choices["loco"].add_argument("--held-out", dest="held_out", default="all",
                                     help="held-out corpora to run, e.g. ased (default all); the others' folds are skipped")
    sub.choices["ased-cv"].add_argument("--n-folds", dest="n_folds", type=int, default=5,
                                        help="ASED folds (default 5: 13 speakers each)")
    sub.choices["ased-cv"].add_argument("--val-clips", dest="val_clips", type=int, default=120,
                                        help="ASED validation speakers per fold are drawn (female, male, ...) until "
                                             "they hold this many clips (default 120; ASED speakers hold 8-70 each)")
    sub.choices["crosscorpus"].add_argument("--test-corpus", default="tess",
                                            help="corpus to test on, never trained on (default tess)")
    tr = sub.choices["train"]
    tr.add_argument("--export", default=None, help="write the ONNX model here")
    tr.add_argument("--temperature", type=float, default=None)
    tr.add_argument("--version", default="0.1.0")
    tr.add_argument("--cv-summary", default=None, help="summary.json of a CV run, embedded in the metadata")
    sub.choices["baseline"].add_argument("--speaker-norm", action="store_true")
    sub.choices["baseline"].add_argument("--features", default="all",
                                         help="feature groups joined by +, e.g. mfcc_mean+mfcc_std (default all): "
                                              "mfcc, mfcc_mean, mfcc_std, dmfcc, melmean, melstd, prosody")
    rep = sub.add_parser("report", help="figures of a CV run and a cross-corpus run as Markdown tables",
                         description="Print a CV run's figures per fold and mode (writes its summary.json) and, "
                         "when found, the cross-corpus figures: from --crosscorpus, else from a crosscorpus.json "
                         "inside the --cv folder.")
    rep.add_argument("--cv", default=None, help="the --out folder of a cv run")
    rep.add_argument("--crosscorpus", default=None, metavar="PATH",
                     help="crosscorpus.json, or the --out folder of a crosscorpus run")
    rep.add_argument("--loco", default=None, help="the --out folder of a loco run: its table")
    rep.add_argument("--ased-cv", dest="ased_cv", default=None, help="the --out folder of an ased-cv run: its table")
    rep.add_argument("--compare", nargs="+", default=None, metavar="DIR",
                     help="loco / ased-cv / cv run folders: their headline figures side by side; "
                          "NAME=DIR,DIR,... pools runs that differ only in their seed into one column "
                          "(mean, min to max)")
    rs = sub.add_parser("add-tta", help="score a finished cv run's folds again from their weights, adding the TTA mode",
                        description="For a cv run made without --tta: reload each fold's model.pt, score the same "
                        "validation and test actors with and without test-time augmentation, and update fold-K.json.")
    rs.add_argument("--cv", required=True, help="the --out folder of a cv run")
    rs.add_argument("--data", required=True, help="folder holding corpus subfolders (ravdess/, tess/, ...)")
    rs.add_argument("--corpora", default="ravdess,tess")
    rs.add_argument("--cache", default=None)
    rs.add_argument("--threads", type=int, default=None)
    ex = sub.add_parser("export", help="export a trained model.pt to ONNX")
    ex.add_argument("--checkpoint", required=True)
    ex.add_argument("--export", required=True, help="ONNX file to write")
    ex.add_argument("--data", default=None, help="corpora, only to fit the temperature when --temperature is not given")
    ex.add_argument("--corpora", default=None,
                    help="the training corpora, for the metadata (default: those the checkpoint records, "
                         "else ravdess,tess)")
    ex.add_argument("--cache", default=None)
    ex.add_argument("--temperature", type=float, default=None)
    ex.add_argument("--version", default="0.1.0")
    ex.add_argument("--cv-summary", default=None)
    ex.add_argument("--train-config", default=None,
                    help="config.json of the run, for a weights-only model.pt (default: two folders up)")
    oe = sub.add_parser("onnx-eval", help=_HELP["onnx-eval"], description=_HELP["onnx-eval"])
    oe.add_argument("--model", required=True, help="ONNX model (from export)")
    oe.add_argument("--data", required=True, help="folder holding corpus subfolders (ravdess/, tess/, ...)")
    oe.add_argument("--speakers", required=True,
                    help="fold:K (RAVDESS fold K's test actors), or RAVDESS actor numbers and ranges and "
                    "corpus:speaker ids, e.g. 1,2,5-8 or tess:OAF")
    oe.add_argument("--out", default="runs/onnx-eval")
    oe.add_argument("--seed", type=int, default=0, help="the --seed of the cv run: it fixes the online order")
    oe.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (default: all cores)")
    oe.add_argument("--cv", default=None, help="a cv run's --out folder: print its figures for the fold beside")
    en = sub.add_parser("ensemble", help=_HELP["ensemble"], description=_HELP["ensemble"])
    en.add_argument("runs", nargs="+", metavar="RUN", help="--out folders of finished loco or ased-cv runs")
    en.add_argument("--out", required=True, help="folder for the averaged predictions and their loco.json / ased-cv.json")
    return parser


_HELP = {
    "cv": "speaker-independent cross-validation over the six RAVDESS actor folds",
    "train": "train on every speaker and optionally export",
    "baseline": "classical baseline (utterance statistics + a linear model) on the same folds",
    "crosscorpus": "train on RAVDESS alone (2 of its actors validate), test on another corpus (default TESS); "
                   "UAR over the classes the test corpus holds (TESS: 7, no calm); writes OUT/crosscorpus.json",
    "loco": "leave-one-corpus-out: train on the other corpora, test on each in turn; 4-class UAR "
            "(neutral/happy/sad/angry) and UAR over the held-out corpus's own classes; writes OUT/loco.json",
    "ased-cv": "ASED 5-fold speaker-independent (13 speakers per fold, dealt round-robin by PP), all and common sentences; "
               "writes OUT/ased-cv.json",
    "onnx-eval": "score an exported ONNX model through serstream analyze (VAD, windows, online speaker state), "
                 "one stream per speaker in the order the CV's online mode uses",
    "ensemble": "average the test predictions of several loco or ased-cv runs (e.g. seeds of one recipe) clip by "
                "clip and score them: what an ensemble of their models reads (no calibration: their validation "
                "speakers differ)",
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if hasattr(args, "recipe"):  # an inconsistent recipe + flags fails here, before any corpus is read
        try:
            _config(args)
        except ValueError as exc:
            parser.error(str(exc))
    from .datasets import DatasetError
    from .onnxeval import OnnxEvalError

    commands = {"cv": cmd_cv, "train": cmd_train, "baseline": cmd_baseline, "export": cmd_export, "report": cmd_report,
                "crosscorpus": cmd_crosscorpus, "loco": cmd_loco, "ased-cv": cmd_ased_cv, "onnx-eval": cmd_onnx_eval, "add-tta": cmd_add_tta,
                "ensemble": cmd_ensemble}
    try:
        return commands[args.command](args)
    except (DatasetError, OnnxEvalError, UsageError) as exc:
        print(f"training: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
