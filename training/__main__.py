"""``python -m training`` (also ``serstream-train``): train, cross-validate, export, baseline.

Examples:
  python -m training cv --data ../shared/data --out runs/cv
  python -m training train --data ../shared/data --out runs/final --export models/serstream-default.onnx
  python -m training baseline --data ../shared/data
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

__all__ = ["main"]


def _config(args: argparse.Namespace):
    from .train import TrainConfig

    cfg = TrainConfig()
    updates = {k: getattr(args, k) for k in ("epochs", "steps_per_epoch", "seed", "threads", "device", "lr", "crop_s")
               if getattr(args, k, None) is not None}
    if args.no_augment:
        updates["augment"] = False
    return replace(cfg, **updates)


def _load(args: argparse.Namespace):
    from .cache import build_cache
    from .datasets import scan_corpora

    scan = scan_corpora(Path(args.data), args.corpora.split(","), check_audio=False)
    print(scan.summary(), file=sys.stderr)
    corpus = build_cache(scan.utterances, Path(args.data), Path(args.cache) if args.cache else None)
    return corpus


def _cache_path(args: argparse.Namespace) -> Path:
    from .cache import _key, default_cache_dir
    from .datasets import scan_corpora

    scan = scan_corpora(Path(args.data), args.corpora.split(","))
    return Path(args.cache or default_cache_dir()) / f"corpus-{_key(scan.utterances, Path(args.data).resolve())}.npz"


def cmd_cv(args: argparse.Namespace) -> int:
    from .cv import run_cv, summarise
    from .folds import make_split, ravdess_actor_folds

    corpus = _load(args)
    config = _config(args)
    folds = ravdess_actor_folds()
    wanted = [int(f) for f in args.folds.split(",")] if args.folds != "all" else [f.index for f in folds]
    splits = [make_split(_utterance_view(corpus), f, seed=args.seed or 0) for f in folds if f.index in wanted]
    results = run_cv(_cache_path(args), splits, config, Path(args.out), workers=args.workers)
    summary = summarise(results)
    (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=1))
    for mode in ("none", "online", "full"):
        s = summary[mode]
        print(f"{mode:>6}: UAR {s['uar']['mean']:.3f} +/- {s['uar']['std']:.3f}  accuracy {s['accuracy']['mean']:.3f}  "
              f"folds {s['uar']['folds']}")
    return 0


def _utterance_view(corpus):
    """Lightweight stand-ins for Utterance objects, enough for fold construction."""
    from types import SimpleNamespace

    genders = {0: "female", 1: "male", -1: None}
    return [SimpleNamespace(speaker=str(s), corpus=str(c), gender=genders[int(g)])
            for s, c, g in zip(corpus.speaker, corpus.corpus, corpus.gender)]


def cmd_train(args: argparse.Namespace) -> int:
    """Train on every speaker (no held-out test set) and export; the epoch count comes from the CV."""
    import numpy as np
    import torch

    from .train import train_model

    corpus = _load(args)
    config = _config(args)
    idx = np.arange(len(corpus))
    result = train_model(corpus, idx, None, config, Path(args.out))
    torch.save({"model": result.model.state_dict(), "config": config.to_dict()}, Path(args.out) / "model.pt")
    if args.export:
        return _export(result.model, corpus, config, args)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export a trained ``model.pt`` (from ``train``) to ONNX with its metadata."""
    import torch

    from .model import EmotionNet, ModelConfig
    from .train import TrainConfig

    saved = torch.load(Path(args.checkpoint), weights_only=False)
    model_config = ModelConfig.from_dict(saved["config"]["model"])
    model = EmotionNet(model_config)
    model.load_state_dict(saved["model"])
    config = TrainConfig(**{k: v for k, v in saved["config"].items() if k != "model"}, model=model_config)
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
        extra = {"training_data": f"{args.corpora} from {args.data}", "train_config": config.to_dict()}
        if args.cv_summary:
            extra["cv_results"] = json.loads(Path(args.cv_summary).read_text())
        export_onnx(model, Path(args.export), temperature=temperature, version=args.version, extra=extra)
        print(f"exported {args.export}", file=sys.stderr)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Print the CV figures of a (possibly partial) run as a Markdown table and write summary.json."""
    from .cv import collect, markdown_report, summarise

    results = collect(Path(args.cv))
    if not results:
        print(f"training: error: no finished folds in {args.cv}", file=sys.stderr)
        return 2
    (Path(args.cv) / "summary.json").write_text(json.dumps(summarise(results), indent=1))
    print(f"{len(results)} fold(s) finished: {sorted(r['fold'] for r in results)}")
    print(markdown_report(results))
    return 0


def cmd_baseline(args: argparse.Namespace) -> int:
    from . import baseline

    return baseline.main_from_args(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("cv", "train", "baseline"):
        p = sub.add_parser(name)
        p.add_argument("--data", required=True, help="folder holding corpus subfolders (ravdess/, tess/, ...)")
        p.add_argument("--corpora", default="ravdess,tess")
        p.add_argument("--cache", default=None, help="decoded-audio cache folder (default ~/.cache/serstream)")
        p.add_argument("--out", default=f"runs/{name}")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--epochs", type=int)
        p.add_argument("--steps-per-epoch", dest="steps_per_epoch", type=int)
        p.add_argument("--threads", type=int)
        p.add_argument("--device", choices=("cpu", "cuda"))
        p.add_argument("--lr", type=float)
        p.add_argument("--crop-s", dest="crop_s", type=float)
        p.add_argument("--no-augment", action="store_true")
        p.add_argument("--folds", default="all", help="fold numbers, e.g. 1,3,5 (RAVDESS actors 1-4 = fold 1)")
        p.add_argument("--workers", type=int, default=2, help="folds trained in parallel processes")
    tr = sub.choices["train"]
    tr.add_argument("--export", default=None, help="write the ONNX model here")
    tr.add_argument("--temperature", type=float, default=None)
    tr.add_argument("--version", default="0.1.0")
    tr.add_argument("--cv-summary", default=None, help="summary.json of a CV run, embedded in the metadata")
    sub.choices["baseline"].add_argument("--speaker-norm", action="store_true")
    rep = sub.add_parser("report", help="figures of a CV run as a Markdown table")
    rep.add_argument("--cv", required=True, help="the --out folder of a cv run")
    ex = sub.add_parser("export", help="export a trained model.pt to ONNX")
    ex.add_argument("--checkpoint", required=True)
    ex.add_argument("--export", required=True, help="ONNX file to write")
    ex.add_argument("--data", default=None, help="corpora, only to fit the temperature when --temperature is not given")
    ex.add_argument("--corpora", default="ravdess,tess")
    ex.add_argument("--cache", default=None)
    ex.add_argument("--temperature", type=float, default=None)
    ex.add_argument("--version", default="0.1.0")
    ex.add_argument("--cv-summary", default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .datasets import DatasetError

    try:
        return {"cv": cmd_cv, "train": cmd_train, "baseline": cmd_baseline, "export": cmd_export, "report": cmd_report}[args.command](args)
    except DatasetError as exc:
        print(f"training: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
