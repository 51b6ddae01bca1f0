"""``serstream history PATH [--stream ID] [--csv]``: read a ``--record`` database.

Without ``--stream`` it lists the recorded streams (runs, utterances, first
and last time); with it, prints that stream's timeline, one row per final
emotion estimate (a table for people, or CSV with ``--csv``). The database
is opened read-only: reading never creates or changes a recording.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

from serstream.record import RecordError, open_readonly

__all__ = ["STREAM_COLUMNS", "TIMELINE_COLUMNS", "add_history_arguments", "run_history"]

PROG = "serstream"

STREAM_COLUMNS = ("stream", "runs", "utterances", "first", "last")
TIMELINE_COLUMNS = ("time", "run", "utterance", "t0", "t1", "label", "confidence",
                    "arousal", "valence", "dominance")


def add_history_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="PATH", help="a database written with --record")
    parser.add_argument("--stream", metavar="ID", help="print this stream's timeline (default: list the streams)")
    parser.add_argument("--csv", action="store_true", help="CSV on stdout instead of a table")


def _clock(ts: float | None) -> str:
    if ts is None:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) + f".{int((ts % 1) * 1000):03d}"


def _rows(conn: Any, stream: str | None) -> tuple[tuple[str, ...], list[tuple[Any, ...]]]:
    if stream is None:
        rows = conn.execute(
            "SELECT s.stream, COUNT(DISTINCT s.run_id), "
            " (SELECT COUNT(*) FROM utterances u WHERE u.stream = s.stream), "
            " MIN(COALESCE(s.opened_at, s.closed_at)), MAX(COALESCE(s.closed_at, s.opened_at)) "
            "FROM streams s GROUP BY s.stream ORDER BY MIN(COALESCE(s.opened_at, s.closed_at)), s.stream"
        ).fetchall()
        return STREAM_COLUMNS, [(r[0], r[1], r[2], _clock(r[3]), _clock(r[4])) for r in rows]
    rows = conn.execute(
        "SELECT ts, run_id, utterance, t0, t1, label, confidence, arousal, valence, dominance "
        "FROM utterances WHERE stream = ? ORDER BY ts, id", (stream,)
    ).fetchall()
    return TIMELINE_COLUMNS, [
        (_clock(r[0]), r[1], r[2], f"{r[3]:.2f}", f"{r[4]:.2f}", r[5], f"{r[6]:.3f}",
         *("" if v is None else f"{v:+.3f}" for v in r[7:10]))
        for r in rows
    ]


def _table(columns: Sequence[str], rows: list[tuple[Any, ...]], out: TextIO) -> None:
    cells = [list(columns)] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    out.writelines("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() + "\n" for row in cells)


def run_history(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Print the listing or timeline; 0, or 2 with one ``serstream: error:`` line."""
    try:
        conn = open_readonly(args.path)
    except RecordError as exc:
        err.write(f"{PROG}: error: {' '.join(str(exc).split())}\n")
        return 2
    try:
        columns, rows = _rows(conn, args.stream)
        if args.stream is not None and not rows:
            known = conn.execute("SELECT 1 FROM streams WHERE stream = ? LIMIT 1", (args.stream,)).fetchone()
            if known is None:
                err.write(f"{PROG}: error: no stream {args.stream!r} in {args.path} "
                          f"(list them with: serstream history {args.path})\n")
                return 2
    except Exception as exc:  # noqa: BLE001 - a damaged database is one line, not a traceback
        err.write(f"{PROG}: error: cannot read {args.path}: {' '.join(str(exc).split())}\n")
        return 2
    finally:
        conn.close()
    if args.csv:
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(rows)
    else:
        _table(columns, rows, out)
    return 0
