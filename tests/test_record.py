"""``--record``: the SQLite writer, ``serstream history``, and real monitors killed mid-run.

Everything here uses real SQLite files and real ``serstream`` subprocesses;
the SIGKILL test reads the database the killed process left behind.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from serstream import events
from serstream.contract import LABELS
from serstream.history_cli import CALL_COLUMNS, TIMELINE_COLUMNS
from serstream.record import SCHEMA_VERSION, Recorder, RecordError
from tests.audio import speech_with_pauses, write_wav
from tests.conftest import serstream_command
from tests.test_cli import assert_one_line_error, run_cli

REPO = Path(__file__).resolve().parent.parent
TS = 1_732_250_000.0


def emotion(stream: str, utterance: int, kind: str = "final", top: int = 4, ts: float = TS) -> dict[str, Any]:
    probs = [0.05] * len(LABELS)
    probs[top] = 1.0 - 0.05 * (len(LABELS) - 1)
    mood = {"label": LABELS[top], "confidence": probs[top], "probs": dict(zip(LABELS, probs)),
            "arousal": 0.2, "valence": -0.1, "dominance": 0.3}
    return events.emotion_event(stream, seq=utterance, kind=kind, utterance=utterance, t0=utterance * 2.0,
                                t1=utterance * 2.0 + 1.5, labels=LABELS, probs=probs, avd=(0.5, -0.25, 0.125),
                                smoothed=mood, latency_ms=10.0, ts=ts + utterance)


def opened(stream: str) -> dict[str, Any]:
    return events.stream_opened(stream, source="file", codec="pcm_s16le", sample_rate=16000, channels=1, ts=TS)


def closed(stream: str) -> dict[str, Any]:
    return events.stream_closed(stream, source="file", codec="pcm_s16le", sample_rate=16000, channels=1,
                                ts=TS + 9, reason="end of file")


def record(path: Path, evs: list[dict[str, Any]], first_id: int = 1) -> Recorder:
    rec = Recorder(path, command="test")
    for i, event in enumerate(evs):
        assert rec.offer(first_id + i, events.dumps({"id": first_id + i, **event}).encode())
    rec.close()
    return rec


def query(path: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


# ------------------------------------------------------------------ the writer


def test_events_become_rows_and_a_restart_appends_a_run(tmp_path: Path) -> None:
    db = tmp_path / "rec.db"
    first = record(db, [opened("a"), emotion("a", 0, "partial"), emotion("a", 0), emotion("a", 1, top=2), closed("a")])
    assert (first.written, first.dropped) == (5, 0)
    assert query(db, "PRAGMA journal_mode") == [("wal",)]
    assert query(db, "SELECT version FROM schema_version") == [(SCHEMA_VERSION,)]
    # Partials are events, not utterances: one utterance row per final.
    rows = query(db, "SELECT run_id, event_id, stream, utterance, t0, t1, label, confidence, arousal, valence, "
                     "dominance, ts, probs FROM utterances ORDER BY id")
    assert [r[:11] for r in rows] == [
        (1, 3, "a", 0, 0.0, 1.5, "angry", 0.65, 0.5, -0.25, 0.125),
        (1, 4, "a", 1, 2.0, 3.5, "happy", 0.65, 0.5, -0.25, 0.125),
    ]
    assert json.loads(rows[0][12]) == emotion("a", 0)["probs"]
    assert query(db, "SELECT stream, source, opened_at, closed_at, close_reason FROM streams") == [
        ("a", "file", TS, TS + 9, "end of file")
    ]
    raw = query(db, "SELECT event_id, type, json FROM events ORDER BY id")
    assert [(r[0], r[1]) for r in raw] == [(1, "stream"), (2, "emotion"), (3, "emotion"), (4, "emotion"), (5, "stream")]
    assert json.loads(raw[2][2])["id"] == 3
    # A second run of the monitor appends: a new run row, the old rows stay.
    record(db, [opened("a"), emotion("a", 0, top=3)])
    assert query(db, "SELECT id, clean, events, dropped FROM runs ORDER BY id") == [(1, 1, 5, 0), (2, 1, 2, 0)]
    assert query(db, "SELECT run_id, label FROM utterances ORDER BY id") == [(1, "angry"), (1, "happy"), (2, "sad")]


def test_a_full_queue_drops_and_counts_instead_of_blocking(tmp_path: Path) -> None:
    db = tmp_path / "busy.db"
    Recorder(db).close()
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another writer holds the lock: the recorder's thread waits
    try:
        with pytest.raises(RecordError, match="locked"):
            Recorder(db, max_queue=1)  # the run row cannot be written within the timeout
    finally:
        blocker.execute("ROLLBACK")
    rec = Recorder(db, max_queue=3)
    blocker.execute("BEGIN IMMEDIATE")
    started = time.monotonic()
    results = [rec.offer(i, events.dumps({"id": i, **opened(f"s{i}")})) for i in range(1, 200)]
    assert time.monotonic() - started < 1.0  # offer never waited for the disk
    blocker.execute("ROLLBACK")
    blocker.close()
    rec.close()
    assert results.count(False) == rec.dropped > 0
    assert rec.written + rec.dropped == 199
    assert query(db, "SELECT COUNT(*) FROM events WHERE run_id = 2") == [(rec.written,)]


def test_a_new_recording_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    """Emotion readings are personal data: the file (and SQLite's -wal/-shm beside it) is 0600."""
    import stat

    old = os.umask(0o022)  # the usual umask would make a plain file world-readable
    try:
        db = tmp_path / "private.db"
        recorder = Recorder(db)
        try:
            assert recorder.offer(1, events.dumps({"id": 1, **opened("a")}).encode())
            time.sleep(1.5)  # one commit: the -wal file exists now
            for f in (db, db.with_name(db.name + "-wal")):
                if f.exists():
                    assert stat.S_IMODE(f.stat().st_mode) == 0o600, (f, oct(f.stat().st_mode))
            assert db.exists()
        finally:
            recorder.close()
        shared = tmp_path / "shared.db"
        shared.touch(mode=0o640)
        shared.chmod(0o640)
        Recorder(shared).close()
        assert stat.S_IMODE(shared.stat().st_mode) == 0o640  # an existing file keeps its owner's choice
    finally:
        os.umask(old)


def test_bad_paths_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(RecordError, match="cannot record to"):
        Recorder(tmp_path / "no" / "such" / "dir" / "x.db")
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(RecordError) as info:
        Recorder(junk)
    assert "\n" not in str(info.value)
    other = tmp_path / "other.db"
    conn = sqlite3.connect(other)
    conn.executescript("CREATE TABLE schema_version (version INTEGER); INSERT INTO schema_version VALUES (99);")
    conn.close()
    with pytest.raises(RecordError, match="version 99"):
        Recorder(other)


# ------------------------------------------------------------------ serstream history


def test_history_lists_streams_and_prints_a_timeline(tmp_path: Path) -> None:
    db = tmp_path / "rec.db"
    record(db, [opened("a"), opened("b"), emotion("a", 0), emotion("b", 0, top=1), emotion("a", 1, top=2), closed("a")])
    listing = run_cli("history", str(db))
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert lines[0].split() == ["stream", "runs", "utterances", "first", "last", "call", "role"]
    assert [ln.split()[:3] for ln in lines[1:]] == [["a", "1", "2"], ["b", "1", "1"]]
    table = run_cli("history", str(db), "--stream", "a")
    assert table.returncode == 0 and "angry" in table.stdout and "happy" in table.stdout
    assert len(table.stdout.splitlines()) == 3
    as_csv = run_cli("history", str(db), "--stream", "a", "--csv")
    rows = list(csv.reader(io.StringIO(as_csv.stdout)))
    assert tuple(rows[0]) == TIMELINE_COLUMNS
    assert [(r[2], r[3], r[4], r[5], r[6], r[7]) for r in rows[1:]] == [
        ("0", "0.00", "1.50", "angry", "0.650", "+0.500"), ("1", "2.00", "3.50", "happy", "0.650", "+0.500")
    ]
    before = db.stat().st_mtime_ns
    assert_one_line_error(run_cli("history", str(db), "--stream", "zz"), "no stream 'zz'")
    assert_one_line_error(run_cli("history", str(tmp_path / "missing.db")), "no recording at")
    junk = tmp_path / "junk.db"
    junk.write_text("hello")
    assert_one_line_error(run_cli("history", str(junk)), "not a serstream recording")
    assert db.stat().st_mtime_ns == before and not (tmp_path / "missing.db").exists()


# ------------------------------------------------------------------ calls (schema 2)


def party(stream: str, call: str, role: str) -> dict[str, Any]:
    return events.stream_opened(stream, source="websocket", codec="pcm_s16le", sample_rate=8000, channels=1,
                                ts=TS, call=call, role=role)


def party_emotion(stream: str, call: str, role: str, utterance: int, t0: float, top: int) -> dict[str, Any]:
    event = emotion(stream, utterance, top=top)
    return {**event, "t0": t0, "t1": t0 + 1.0, "call": call, "role": role}


def test_call_and_role_are_stored_and_history_prints_a_call(tmp_path: Path) -> None:
    db = tmp_path / "calls.db"
    record(db, [
        party("c1:caller", "c1", "caller"), party("c1:callee", "c1", "callee"), opened("lone"),
        party("c2:left", "c2", "left"),
        party_emotion("c1:caller", "c1", "caller", 0, 1.0, top=4),
        party_emotion("c1:callee", "c1", "callee", 0, 3.0, top=3),
        party_emotion("c1:caller", "c1", "caller", 1, 5.0, top=2),
        party_emotion("c2:left", "c2", "left", 0, 0.5, top=1),
        emotion("lone", 0),
    ])
    assert query(db, "SELECT version FROM schema_version") == [(2,)] == [(SCHEMA_VERSION,)]
    assert query(db, "SELECT stream, call, role FROM streams ORDER BY stream") == [
        ("c1:callee", "c1", "callee"), ("c1:caller", "c1", "caller"), ("c2:left", "c2", "left"),
        ("lone", None, None)]
    listing = run_cli("history", str(db))
    assert listing.returncode == 0, listing.stderr
    rows = {ln.split()[0]: ln.split() for ln in listing.stdout.splitlines()[1:]}
    assert rows["c1:caller"][-2:] == ["c1", "caller"] and len(rows["lone"]) == 7  # no call, no role
    # Both parties of c1, in stream-time order, each with its role; c2 and the lone stream left out.
    as_csv = run_cli("history", str(db), "--call", "c1", "--csv")
    assert as_csv.returncode == 0, as_csv.stderr
    table = list(csv.reader(io.StringIO(as_csv.stdout)))
    assert tuple(table[0]) == CALL_COLUMNS
    assert [(r[2], r[3], r[5], r[7]) for r in table[1:]] == [
        ("caller", "c1:caller", "1.00", "angry"), ("callee", "c1:callee", "3.00", "sad"),
        ("caller", "c1:caller", "5.00", "happy")]
    readable = run_cli("history", str(db), "--call", "c1")
    assert readable.returncode == 0 and len(readable.stdout.splitlines()) == 4
    assert_one_line_error(run_cli("history", str(db), "--call", "nope"), "no call 'nope'")
    assert run_cli("history", str(db), "--call", "c1", "--stream", "lone").returncode == 2


#: The version 1 layout of the streams table (before call/role), as a database of that version has it.
V1_STREAMS = """
CREATE TABLE schema_version (version INTEGER NOT NULL);
INSERT INTO schema_version VALUES (1);
CREATE TABLE runs (id INTEGER PRIMARY KEY, started_at REAL NOT NULL, ended_at REAL, command TEXT NOT NULL,
    serstream_version TEXT NOT NULL, clean INTEGER NOT NULL DEFAULT 0, events INTEGER NOT NULL DEFAULT 0,
    dropped INTEGER NOT NULL DEFAULT 0);
INSERT INTO runs (started_at, command, serstream_version, clean) VALUES (1.0, 'old', '0.9', 1);
CREATE TABLE streams (run_id INTEGER NOT NULL REFERENCES runs(id), stream TEXT NOT NULL,
    source TEXT, codec TEXT, sample_rate INTEGER, channels INTEGER, detail TEXT,
    opened_at REAL, closed_at REAL, close_reason TEXT, PRIMARY KEY (run_id, stream));
INSERT INTO streams (run_id, stream, source, opened_at) VALUES (1, 'old-stream', 'file', 1.0);
CREATE TABLE utterances (id INTEGER PRIMARY KEY, run_id INTEGER NOT NULL REFERENCES runs(id), event_id INTEGER,
    stream TEXT NOT NULL, utterance INTEGER NOT NULL, t0 REAL NOT NULL, t1 REAL NOT NULL, label TEXT NOT NULL,
    confidence REAL NOT NULL, probs TEXT NOT NULL, arousal REAL, valence REAL, dominance REAL, ts REAL NOT NULL);
CREATE TABLE events (id INTEGER PRIMARY KEY, run_id INTEGER NOT NULL REFERENCES runs(id), event_id INTEGER,
    ts REAL, stream TEXT, type TEXT, json TEXT NOT NULL);
"""


def test_a_version_1_recording_is_read_as_it_is_and_migrated_when_recorded_to(tmp_path: Path) -> None:
    db = tmp_path / "v1.db"
    conn = sqlite3.connect(db)
    conn.executescript(V1_STREAMS)
    conn.close()
    # Reading never changes it: listed without calls, and --call says why there are none.
    listing = run_cli("history", str(db))
    assert listing.returncode == 0 and "old-stream" in listing.stdout, listing.stderr
    assert_one_line_error(run_cli("history", str(db), "--call", "c1"), "recorded before calls were stored")
    assert query(db, "SELECT version FROM schema_version") == [(1,)]
    # Recording to it migrates it in place: the old rows stay, new ones carry their call.
    record(db, [party("c1:left", "c1", "left"), party_emotion("c1:left", "c1", "left", 0, 2.0, top=4)])
    assert query(db, "SELECT version FROM schema_version") == [(2,)]
    assert query(db, "SELECT run_id, stream, call, role FROM streams ORDER BY run_id") == [
        (1, "old-stream", None, None), (2, "c1:left", "c1", "left")]
    call = run_cli("history", str(db), "--call", "c1", "--csv")
    assert call.returncode == 0 and "c1:left" in call.stdout, call.stderr
    # A second recorder on the migrated file finds version 2: nothing to do.
    record(db, [opened("b")])
    assert query(db, "SELECT COUNT(*) FROM runs") == [(3,)]


# ------------------------------------------------------------------ a real monitor


def start_listen(model: Path, wav: Path, db: Path, *extra: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != "SERSTREAM_MODEL"}
    return subprocess.Popen(
        [*serstream_command(), "listen", "--model", str(model), "--file", str(wav), "--port", "0",
         "--record", str(db), "--quiet", "--threads", "1", *extra],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )


def poll_count(db: Path, sql: str, at_least: int, proc: subprocess.Popen[str], timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else proc.returncode
        if db.exists():
            try:
                conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=1)
                try:
                    (n,) = conn.execute(sql).fetchone()
                finally:
                    conn.close()
                if n >= at_least:
                    return int(n)
            except sqlite3.OperationalError:
                pass  # the tables are not there yet
        time.sleep(0.1)
    raise AssertionError(f"{sql} never reached {at_least}")


@pytest.fixture(scope="module")
def long_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 20 s of speech-like audio: six utterances with pauses (no external tool needed)."""
    pattern = tuple((0.8, 1.6 + 0.2 * i) for i in range(8))
    return write_wav(tmp_path_factory.mktemp("rec-audio") / "long.wav", speech_with_pauses(pattern))


def test_sigkill_leaves_a_database_with_everything_committed(tmp_path: Path, factory_model: Path,
                                                              long_wav: Path) -> None:
    db = tmp_path / "killed.db"
    proc = start_listen(factory_model, long_wav, db, "--loop")
    try:
        seen_utterances = poll_count(db, "SELECT COUNT(*) FROM utterances", 2, proc)
        seen_events = poll_count(db, "SELECT COUNT(*) FROM events", 1, proc)
        time.sleep(1.5)  # whatever is written now is committed within a second
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        n_utt = conn.execute("SELECT COUNT(*) FROM utterances").fetchone()[0]
        n_events = conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]
        assert n_utt >= seen_utterances and n_events > seen_events  # the 1.5 s before the kill are there
        assert conn.execute("SELECT ended_at, clean FROM runs").fetchall() == [(None, 0)]
        ids = [r[0] for r in conn.execute("SELECT event_id FROM events ORDER BY id")]
        assert ids == list(range(ids[0], ids[0] + len(ids)))  # no hole: every committed event in bus order
        started = conn.execute("SELECT started_at FROM runs").fetchone()[0]
        assert abs(ids[0] // 1_000_000 - started) < 5  # the run's ids start at its unix second x 10**6
    finally:
        conn.close()


def test_sigterm_flushes_the_final_estimates_and_closes_cleanly(tmp_path: Path, factory_model: Path,
                                                                  long_wav: Path) -> None:
    db = tmp_path / "stopped.db"
    proc = start_listen(factory_model, long_wav, db)
    try:
        poll_count(db, "SELECT COUNT(*) FROM utterances", 1, proc)
        # Stop in the middle of an utterance: its final comes from the flush.
        poll_count(db, "SELECT COUNT(*) FROM events WHERE type = 'emotion' AND json LIKE '%\"kind\":\"partial\"%' "
                       "AND json LIKE '%\"utterance\":2,%'", 1, proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert not Path(f"{db}-wal").exists() or Path(f"{db}-wal").stat().st_size == 0
    conn = sqlite3.connect(db)
    try:
        (ended, clean, n_events, dropped), = conn.execute("SELECT ended_at, clean, events, dropped FROM runs")
        assert ended is not None and clean == 1 and dropped == 0
        assert conn.execute("SELECT COUNT(*) FROM events").fetchone()[0] == n_events
        utterances = [r[0] for r in conn.execute("SELECT utterance FROM utterances ORDER BY id")]
        assert utterances[:3] == [0, 1, 2]  # utterance 2 was in progress: its final was flushed
        last = json.loads(conn.execute("SELECT json FROM events WHERE stream = 'file:long.wav' "
                                       "ORDER BY id DESC LIMIT 1").fetchone()[0])
        assert (last["type"], last["state"]) == ("stream", "closed")
        assert conn.execute("SELECT closed_at IS NOT NULL FROM streams").fetchall() == [(1,)]
    finally:
        conn.close()


def test_unusable_record_path_is_one_line_exit_2(tmp_path: Path, factory_model: Path, long_wav: Path) -> None:
    missing_dir = tmp_path / "nope" / "rec.db"
    line = assert_one_line_error(run_cli("listen", "--model", str(factory_model), "--file", str(long_wav),
                                         "--port", "0", "--record", str(missing_dir)), str(missing_dir))
    assert "cannot record" in line
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not sqlite at all" * 64)
    assert_one_line_error(run_cli("serve", "--model", str(factory_model), "--port", "0", "--record", str(junk)),
                          "junk.db")
    assert_one_line_error(run_cli("serve", "--model", str(factory_model), "--port", "0", "--record", str(tmp_path)),
                          "cannot record")
    assert_one_line_error(run_cli("serve", "--history-s", "-1"), "--history-s")
