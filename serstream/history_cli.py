"""``serstream history PATH [--stream ID | --call ID] [--csv]``: read a ``--record`` database.

Without ``--stream`` it lists the recorded streams (runs, utterances, first
and last time, and the call and role of a call's party); with it, prints that
stream's timeline, one row per final emotion estimate (a table for people, or
CSV with ``--csv``). ``--call`` prints one timeline of every party of the call,
in time order, each row naming its role and stream, so both sides of a
conversation read together. The database is opened read-only: reading never
creates or changes a recording (a version 1 recording, from before calls were
stored, lists without calls and has none to show).
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

from serstream.record import RecordError, open_readonly, schema_version

__all__ = ["STREAM_COLUMNS", "TIMELINE_COLUMNS", "CALL_COLUMNS", "add_history_arguments", "run_history"]

PROG = "serstream"

STREAM_COLUMNS = ("stream", "runs", "utterances", "first", "last", "call", "role")
TIMELINE_COLUMNS = ("time", "run", "utterance", "t0", "t1", "label", "confidence",
                    "arousal", "valence", "dominance")
#: ``--call``: the timeline columns with the party (role and stream) after the run.
CALL_COLUMNS = ("time", "run", "role", "stream", "utterance", "t0", "t1", "label", "confidence",
                "arousal", "valence", "dominance")


def add_history_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="PATH", help="a database written with --record")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--stream", metavar="ID", help="print this stream's timeline (default: list the streams)")
    which.add_argument("--call", metavar="ID",
                       help="print the timeline of every party of this call, in time order, with their roles")
    parser.add_argument("--csv", action="store_true", help="CSV on stdout instead of a table")


def _clock(ts: float | None) -> str:
    if ts is None:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) + f".{int((ts % 1) * 1000):03d}"


def _values(row: Sequence[Any]) -> tuple[str, ...]:
    """t0, t1, label, confidence, arousal, valence, dominance as printed."""
    return (f"{row[0]:.2f}", f"{row[1]:.2f}", row[2], f"{row[3]:.3f}",
            *("" if v is None else f"{v:+.3f}" for v in row[4:7]))


def _call_rows(conn: Any, call: str) -> tuple[tuple[str, ...], list[tuple[Any, ...]]]:
    rows = conn.execute(
        "SELECT u.ts, u.run_id, s.role, u.stream, u.utterance, u.t0, u.t1, u.label, u.confidence, "
        " u.arousal, u.valence, u.dominance "
        "FROM utterances u JOIN streams s ON s.run_id = u.run_id AND s.stream = u.stream "
        "WHERE s.call = ? ORDER BY u.run_id, u.t0, s.role, u.id", (call,)
    ).fetchall()
    return CALL_COLUMNS, [(_clock(r[0]), r[1], r[2] or "", r[3], r[4], *_values(r[5:12])) for r in rows]


def _rows(conn: Any, stream: str | None, calls: bool = True) -> tuple[tuple[str, ...], list[tuple[Any, ...]]]:
    if stream is None:
        party = "MAX(s.call), MAX(s.role)" if calls else "NULL, NULL"
        rows = conn.execute(
            "SELECT s.stream, COUNT(DISTINCT s.run_id), "
            " (SELECT COUNT(*) FROM utterances u WHERE u.stream = s.stream), "
            " MIN(COALESCE(s.opened_at, s.closed_at)), MAX(COALESCE(s.closed_at, s.opened_at)), "
            f" {party} "
            "FROM streams s GROUP BY s.stream ORDER BY MIN(COALESCE(s.opened_at, s.closed_at)), s.stream"
        ).fetchall()
        return STREAM_COLUMNS, [(r[0], r[1], r[2], _clock(r[3]), _clock(r[4]), r[5] or "", r[6] or "")
                                for r in rows]
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
    call = getattr(args, "call", None)
    try:
        calls = schema_version(conn) >= 2
        if call is not None:
            if not calls:
                err.write(f"{PROG}: error: {args.path} was recorded before calls were stored "
                          f"(recording schema version 1): no call {call!r}\n")
                return 2
            columns, rows = _call_rows(conn, call)
            if not rows and conn.execute("SELECT 1 FROM streams WHERE call = ? LIMIT 1", (call,)).fetchone() is None:
                err.write(f"{PROG}: error: no call {call!r} in {args.path} "
                          f"(list the streams and their calls with: serstream history {args.path})\n")
                return 2
        else:
            columns, rows = _rows(conn, args.stream, calls)
        if call is None and args.stream is not None and not rows:
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
