"""onnx-eval: an exported model scored through `serstream analyze` in the order the CV's online mode uses."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from serstream.contract import LABELS  # noqa: E402
from training.__main__ import main  # noqa: E402
from training.datasets import scan_corpora  # noqa: E402
from training.frontend import stats_width  # noqa: E402
from training.metrics import softmax  # noqa: E402
from training.onnxeval import OnnxEvalError, monitor_order, parse_speakers  # noqa: E402
from training.train import predict  # noqa: E402

ACTORS_1_2 = ["ravdess:01", "ravdess:02"]


def test_parse_speakers() -> None:
    assert parse_speakers("1,2,5-6") == (["ravdess:01", "ravdess:02", "ravdess:05", "ravdess:06"], None)
    assert parse_speakers("fold:3") == (["ravdess:09", "ravdess:10", "ravdess:11", "ravdess:12"], 3)
    assert parse_speakers("Fold6")[1] == 6
    assert parse_speakers("tess:OAF, 2") == (["ravdess:02", "tess:OAF"], None)
    for bad in ("", "fold:7", "fold:1,2", "abc", "4-2", "0"):
        with pytest.raises(OnnxEvalError):
            parse_speakers(bad)


def _index_of(corpus, root: Path) -> dict[str, int]:
    return {str((root / p).resolve()): i for i, p in enumerate(corpus.path)}


def test_monitor_order_is_the_order_predict_uses(trained) -> None:
    corpus, result, test, _, config, root = trained
    rows = monitor_order(scan_corpora(root, ["ravdess"]).utterances, ACTORS_1_2, order_seed=config.seed)
    index_of = _index_of(corpus, root)
    sequence = [index_of[str(r.path)] for r in rows]
    assert sorted(sequence) == sorted(test.tolist())
    assert [r.stream for r in rows] == sorted(r.stream for r in rows)  # one stream after the other
    assert [r.position for r in rows if r.stream == "ravdess:01"] == list(range(16))
    # Replay the monitor's adaptation one utterance at a time in this order: the
    # state after each final is the sum of the frame statistics heard so far.
    expected, state = {}, {}
    with torch.no_grad():
        for r, i in zip(rows, sequence):
            audio = torch.from_numpy(corpus.clip(i))[None]
            history = state.get(r.stream, torch.zeros(1, stats_width(result.model.config.frontend)))
            logits, _, _, _, frame_stats = result.model(audio, torch.tensor([audio.shape[1]]), history)
            expected[i] = logits[0].numpy()
            state[r.stream] = history + frame_stats
    replay = np.stack([expected[int(i)] for i in test])
    same = predict(result.model, corpus, test, mode="online", order_seed=config.seed)["emotion_logits"]
    other = predict(result.model, corpus, test, mode="online", order_seed=config.seed + 1)["emotion_logits"]
    gap_same, gap_other = np.abs(replay - same).max(), np.abs(replay - other).max()
    assert gap_same < 1e-4 < gap_other, (gap_same, gap_other)


def _file_probs(events_path: Path) -> dict[str, np.ndarray]:
    probs = {}
    for line in events_path.read_text().splitlines():
        event = json.loads(line)
        if event["type"] == "file" and event["probs"] is not None:
            probs[event["file"]] = np.array([event["probs"][name] for name in LABELS])
    return probs


def test_onnx_eval_follows_the_online_adaptation(trained, exported, tmp_path, capsys) -> None:
    corpus, result, test, _, config, root = trained
    out = tmp_path / "eval"
    assert main(["onnx-eval", "--model", str(exported), "--data", str(root), "--speakers", "1,2", "--out", str(out),
                 "--threads", "1"]) == 0
    assert capsys.readouterr().out.startswith("monitor path: UAR ")
    rows = monitor_order(scan_corpora(root, ["ravdess"]).utterances, ACTORS_1_2, order_seed=0)
    with (out / "streams.csv").open() as handle:
        assert [(r["file"], r["stream"]) for r in csv.DictReader(handle)] == [(str(r.path), r.stream) for r in rows]
    figures = json.loads((out / "onnx-eval.json").read_text())
    monitor = figures["monitor"]
    with (out / "predictions.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert monitor["n"] == len(table) == len(test) and figures["speakers"] == ACTORS_1_2
    hits = [r["label"] == r["predicted"] for r in table]
    assert monitor["accuracy"] == pytest.approx(np.mean(hits), abs=1e-4)
    recalls = [np.mean([h for h, r in zip(hits, table) if r["label"] == c]) for c in {r["label"] for r in table}]
    assert monitor["uar"] == pytest.approx(np.mean(recalls), abs=1e-4)

    # The monitor's file probabilities sit far closer to training's online
    # adaptation in this order than to no history or to another order.
    probs = _file_probs(out / "events.jsonl")
    index_of = _index_of(corpus, root)
    files = sorted(probs, key=lambda f: index_of[f])
    assert len(files) == len(test) and [index_of[f] for f in files] == sorted(test.tolist())
    monitor_probs = np.stack([probs[f] for f in files])
    temperature = json.loads(exported.with_suffix(".json").read_text())["temperature"]

    def gap(mode: str, seed: int) -> float:
        logits = predict(result.model, corpus, np.sort(test), mode=mode, order_seed=seed)["emotion_logits"]
        return float(np.abs(softmax(logits, temperature) - monitor_probs).max())

    online = gap("online", 0)
    assert online < gap("none", 0) / 3 and online < gap("online", 1) / 3, (online, gap("none", 0), gap("online", 1))


def test_fold_model_export_and_onnx_eval_beside_the_cv(trained, tmp_path, capsys) -> None:
    corpus, result, _, _, config, root = trained
    run = tmp_path / "cv"
    (run / "fold-1").mkdir(parents=True)
    torch.save(result.model.state_dict(), run / "fold-1" / "model.pt")  # as run_fold saves it
    onnx = tmp_path / "fold-1.onnx"
    args = ["export", "--checkpoint", str(run / "fold-1" / "model.pt"), "--export", str(onnx), "--temperature", "1.0"]
    assert main(args) == 2  # weights only, and no config.json two folders up
    assert "config.json" in capsys.readouterr().err.strip().splitlines()[-1]
    (run / "config.json").write_text(json.dumps(config.to_dict()))
    assert main(args[:-2]) == 2  # no temperature and no corpus to fit one on: one line, no traceback
    err = capsys.readouterr().err
    assert "export needs --temperature T" in err and "Traceback" not in err
    assert main(args) == 0
    cv_uar = {"none": 0.11, "online": 0.22, "full": 0.33}
    (run / "fold-1.json").write_text(json.dumps({"fold": 1, **{m: {"uar": v} for m, v in cv_uar.items()}}))
    out = tmp_path / "eval"
    assert main(["onnx-eval", "--model", str(onnx), "--data", str(root), "--speakers", "fold:1", "--out", str(out),
                 "--threads", "1", "--cv", str(run)]) == 0
    line = capsys.readouterr().out
    assert "CV (torch) UAR none 0.110  online 0.220  full 0.330" in line
    figures = json.loads((out / "onnx-eval.json").read_text())
    assert figures["fold"] == 1 and figures["speakers"] == [f"ravdess:0{a}" for a in range(1, 5)]
    assert figures["cv_uar"] == cv_uar and figures["monitor"]["n"] == 4 * 16


@pytest.mark.parametrize("change, message", [
    ({"--model": "missing.onnx"}, "not found"),
    ({"--speakers": "tess:XYZ"}, "no utterances of tess:XYZ"),
    ({"--data": "/nonexistent/data"}, "data folder /nonexistent/data does not exist"),
    ({"--speakers": "9"}, "no utterances of ravdess:09"),
    ({"--speakers": "nine"}, "neither an actor number"),
    ({"--cv": "."}, "--cv needs --speakers fold:K"),
    ({"--speakers": "fold:2", "--cv": "nowhere"}, "fold-2.json does not exist"),
])
def test_onnx_eval_bad_input_is_one_line(change, message, trained, exported, tmp_path, capsys) -> None:
    root = trained[-1]
    options = {"--model": str(exported), "--data": str(root), "--speakers": "1", "--out": str(tmp_path / "o"), **change}
    if options["--model"] == "missing.onnx":
        options["--model"] = str(tmp_path / "missing.onnx")
    assert main(["onnx-eval", *[x for kv in options.items() for x in kv]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("training: error:") and message in err[0], err
