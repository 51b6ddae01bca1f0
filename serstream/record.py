"""Recording every event to an embedded SQLite database (``--record PATH``).

The database (standard library ``sqlite3``, WAL journal) survives restarts:
each run of ``serstream listen``/``serve`` appends a row to ``runs`` and its
events after the earlier runs'. Tables (see docs/recording.md):

* ``schema_version(version)``: :data:`SCHEMA_VERSION`, checked on open;
* ``runs``: one row per monitor run (start, end, command, clean shutdown);
* ``streams``: one row per stream and run (source, codec, opened/closed, and
  the ``call``/``role`` of a call's party stream);
* ``utterances``: one row per **final** emotion estimate, the columns a
  person queries (stream, utterance, t0, t1, label, confidence, probs JSON,
  arousal, valence, dominance, wall time, event id);
* ``events``: every event as the raw JSON sent on ``/events``.

Writes happen on one writer thread fed by a bounded queue: :meth:`Recorder.offer`
never blocks (what does not fit is dropped and counted in ``dropped``), and
the writer commits at least once per ``commit_interval_s`` (1 s), so a
process killed with SIGKILL loses at most the last second. :meth:`Recorder.close`
writes what is queued, marks the run ended and closes the database.
No audio is stored.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serstream.errors import RecordError

__all__ = ["SCHEMA_SQL", "SCHEMA_VERSION", "READABLE_VERSIONS", "RecordError", "Recorder", "RecorderStats",
           "open_readonly", "schema_version"]

log = logging.getLogger(__name__)

#: Version of the table layout below. Version 1 (before ``streams.call``/``role``) is migrated
#: in place when a recorder opens it, and read as it is; other versions are refused.
SCHEMA_VERSION = 2
#: Versions :func:`open_readonly` reads (a version 1 database has no calls).
READABLE_VERSIONS = (1, 2)

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    started_at REAL NOT NULL,          -- unix seconds
    ended_at REAL,                     -- NULL: still running, or killed
    command TEXT NOT NULL,
    serstream_version TEXT NOT NULL,
    clean INTEGER NOT NULL DEFAULT 0,  -- 1 once closed by a normal shutdown
    events INTEGER NOT NULL DEFAULT 0,
    dropped INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS streams (
    run_id INTEGER NOT NULL REFERENCES runs(id),
    stream TEXT NOT NULL,
    source TEXT, codec TEXT, sample_rate INTEGER, channels INTEGER, detail TEXT,
    opened_at REAL, closed_at REAL, close_reason TEXT,
    call TEXT, role TEXT,              -- a call's party stream (schema 2); NULL for a lone stream
    PRIMARY KEY (run_id, stream)
);
CREATE TABLE IF NOT EXISTS utterances (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL REFERENCES runs(id),
    event_id INTEGER,                  -- the bus id of the final emotion event
    stream TEXT NOT NULL,
    utterance INTEGER NOT NULL,
    t0 REAL NOT NULL, t1 REAL NOT NULL,
    label TEXT NOT NULL, confidence REAL NOT NULL,
    probs TEXT NOT NULL,               -- JSON object label -> probability
    arousal REAL, valence REAL, dominance REAL,
    ts REAL NOT NULL                   -- unix seconds when the estimate was made
);
CREATE INDEX IF NOT EXISTS utterances_stream_ts ON utterances (stream, ts);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL REFERENCES runs(id),
    event_id INTEGER,
    ts REAL, stream TEXT, type TEXT,
    json TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_run_event ON events (run_id, event_id);
"""

#: From version 1 to 2: the parties of calls (event schema revision 1.2's ``call`` and ``role``).
_MIGRATE_1_TO_2 = """
ALTER TABLE streams ADD COLUMN call TEXT;
ALTER TABLE streams ADD COLUMN role TEXT;
UPDATE schema_version SET version = 2;
"""
#: After the layout is current (version 1 tables lack the column until migrated).
_INDEXES_SQL = "CREATE INDEX IF NOT EXISTS streams_call ON streams (call);"


@dataclass(frozen=True)
class RecorderStats:
    """Counters of a recorder: events written, dropped (queue full or a failed write), commits."""

    written: int
    dropped: int
    commits: int
    queued: int


def _create_private(path: Path) -> None:
    """Create a new database file readable by its owner only (0600): it holds personal data.

    SQLite gives its -wal and -shm files the main file's permissions, so they follow.
    An existing file keeps the permissions its owner gave it.
    """
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return
    except OSError as exc:
        raise RecordError(f"cannot record to {path}: {exc.strerror or exc}") from None
    os.close(fd)


def _connect(path: Path) -> sqlite3.Connection:
    _create_private(path)
    try:
        conn = sqlite3.connect(str(path), timeout=5.0, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a committed transaction survives a process crash
        # (SIGKILL); only an OS crash or power loss may lose the last commits.
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(SCHEMA_SQL)
        row = conn.execute("SELECT version FROM schema_version").fetchone()
        if row is None:
            conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
        elif int(row[0]) == 1:
            # One transaction: a failure leaves the version 1 database as it was.
            conn.executescript(f"BEGIN; {_MIGRATE_1_TO_2} COMMIT;")
            log.info("recording: %s migrated from schema version 1 to 2 (streams.call, streams.role)", path)
        elif int(row[0]) != SCHEMA_VERSION:
            conn.close()
            raise RecordError(f"{path}: recording schema version {row[0]}, this serstream writes "
                              f"{SCHEMA_VERSION}; record to another file")
        conn.executescript(_INDEXES_SQL)
        return conn
    except sqlite3.Error as exc:
        raise RecordError(f"cannot record to {path}: {exc}") from None


def open_readonly(path: str | os.PathLike[str]) -> sqlite3.Connection:
    """Open a recording for reading (never creates one); :class:`RecordError` with one line."""
    p = Path(path)
    if not p.is_file():
        raise RecordError(f"no recording at {p}")
    try:
        conn = sqlite3.connect(f"{p.resolve().as_uri()}?mode=ro", uri=True, timeout=5.0)
        row = conn.execute("SELECT version FROM schema_version").fetchone()
    except sqlite3.Error as exc:
        raise RecordError(f"{p} is not a serstream recording: {exc}") from None
    if row is None or int(row[0]) not in READABLE_VERSIONS:
        conn.close()
        raise RecordError(f"{p}: recording schema version {row[0] if row else 'missing'}, "
                          f"this serstream reads {' and '.join(map(str, READABLE_VERSIONS))}")
    return conn


def schema_version(conn: sqlite3.Connection) -> int:
    """The table layout version of an open recording."""
    row = conn.execute("SELECT version FROM schema_version").fetchone()
    return int(row[0]) if row else 0


_STOP = object()


class Recorder:
    """Writes events to SQLite on a thread of its own; :meth:`offer` never blocks.

    The database is opened (and the run row written) in the constructor, so a
    bad path fails before the monitor starts: :class:`RecordError`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        command: str = "",
        version: str = "",
        max_queue: int = 20_000,
        commit_interval_s: float = 1.0,
    ) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.path = Path(path)
        self.commit_interval_s = float(commit_interval_s)
        self._conn = _connect(self.path)
        try:
            cur = self._conn.execute(
                "INSERT INTO runs (started_at, command, serstream_version) VALUES (?, ?, ?)",
                (time.time(), command, version),
            )
        except sqlite3.Error as exc:
            self._conn.close()
            raise RecordError(f"cannot record to {self.path}: {exc}") from None
        self.run_id = int(cur.lastrowid or 0)
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_queue)
        self.written = 0
        self.dropped = 0
        self.commits = 0
        self.write_failures = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="serstream-recorder", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ producer side

    def offer(self, event_id: int | None, payload: bytes | str) -> bool:
        """Queue one serialised event (any thread, never blocks); False when dropped (counted)."""
        if self._closed:
            self.dropped += 1
            return False
        try:
            self._queue.put_nowait((event_id, payload))
        except queue.Full:
            self.dropped += 1
            return False
        return True

    def offer_entry(self, entry: Any) -> None:
        """Bus listener form: a :class:`~serstream.core.history.HistoryEntry`."""
        self.offer(entry.id, entry.payload)

    def stats(self) -> RecorderStats:
        return RecorderStats(self.written, self.dropped, self.commits, self._queue.qsize())

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, mark the run ended (clean) and close the database."""
        if self._closed:
            return
        self._closed = True
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout)

    # ------------------------------------------------------------ writer thread

    def _run(self) -> None:
        conn = self._conn
        in_tx = False
        last_commit = time.monotonic()
        stop = False
        while not stop:
            # In a transaction: wake in time for its commit; idle: just wait.
            wait = max(0.0, last_commit + self.commit_interval_s - time.monotonic()) if in_tx \
                else self.commit_interval_s
            try:
                item = self._queue.get(timeout=wait)
            except queue.Empty:
                item = None
            if item is _STOP:
                stop = True
            elif item is not None:
                if not in_tx:
                    conn.execute("BEGIN")
                    in_tx = True
                try:
                    self._write(*item)
                    self.written += 1
                except (sqlite3.Error, ValueError, TypeError, KeyError) as exc:
                    self.dropped += 1
                    self.write_failures += 1
                    if self.write_failures == 1:
                        log.error("recording: an event could not be written (%s: %s); "
                                  "further failures only counted", type(exc).__name__, exc)
            if in_tx and (stop or time.monotonic() - last_commit >= self.commit_interval_s):
                in_tx = not self._commit()
                last_commit = time.monotonic()
            elif not in_tx:
                last_commit = time.monotonic()
        try:
            conn.execute("UPDATE runs SET ended_at = ?, clean = 1, events = ?, dropped = ? WHERE id = ?",
                         (time.time(), self.written, self.dropped, self.run_id))
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            log.error("recording: could not close the run cleanly: %s", exc)
        finally:
            conn.close()

    def _commit(self) -> bool:
        try:
            self._conn.execute("COMMIT")
            self.commits += 1
            return True
        except sqlite3.Error as exc:
            self.write_failures += 1
            log.error("recording: commit failed: %s", exc)
            return False

    def _write(self, event_id: int | None, payload: bytes | str) -> None:
        text = payload.decode("utf-8") if isinstance(payload, (bytes, bytearray)) else str(payload)
        event = json.loads(text)
        if not isinstance(event, Mapping):
            raise ValueError("an event must be a JSON object")
        kind = str(event.get("type", ""))
        stream = str(event.get("stream", ""))
        ts = _float(event.get("ts"))
        conn = self._conn
        conn.execute(
            "INSERT INTO events (run_id, event_id, ts, stream, type, json) VALUES (?, ?, ?, ?, ?, ?)",
            (self.run_id, event_id, ts, stream, kind, text),
        )
        if kind == "emotion" and event.get("kind") == "final":
            conn.execute(
                "INSERT INTO utterances (run_id, event_id, stream, utterance, t0, t1, label, confidence, "
                "probs, arousal, valence, dominance, ts) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (self.run_id, event_id, stream, int(event["utterance"]), float(event["t0"]),
                 float(event["t1"]), str(event["label"]), float(event["confidence"]),
                 json.dumps(event.get("probs", {}), separators=(",", ":")), _float(event.get("arousal")),
                 _float(event.get("valence")), _float(event.get("dominance")), ts or 0.0),
            )
        elif kind == "stream":
            if event.get("state") == "open":
                conn.execute(
                    "INSERT OR REPLACE INTO streams (run_id, stream, source, codec, sample_rate, channels, "
                    "detail, opened_at, call, role) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (self.run_id, stream, event.get("source"), event.get("codec"), event.get("sample_rate"),
                     event.get("channels"), event.get("detail"), ts, _text(event.get("call")),
                     _text(event.get("role"))),
                )
            else:
                cur = conn.execute(
                    "UPDATE streams SET closed_at = ?, close_reason = ? WHERE run_id = ? AND stream = ?",
                    (ts, event.get("reason"), self.run_id, stream),
                )
                if cur.rowcount == 0:  # opened before the recording began
                    conn.execute(
                        "INSERT INTO streams (run_id, stream, source, codec, sample_rate, channels, detail, "
                        "closed_at, close_reason, call, role) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (self.run_id, stream, event.get("source"), event.get("codec"),
                         event.get("sample_rate"), event.get("channels"), event.get("detail"), ts,
                         event.get("reason"), _text(event.get("call")), _text(event.get("role"))),
                    )


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
