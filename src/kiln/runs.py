"""The runs database: every eval and bench result, with the model's identity, settings and versions.

One SQLite file ($KILN_HOME/runs.sqlite); each result is written in a single transaction at the end
of its run, so an interrupted run leaves the database as it was. A result with a run key is stored
once: storing it again (a resumed run that had stored it before its checkpoint was removed) is a no-op.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kiln import settings
from kiln.errors import DataFormatError, InvalidParameterError

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at TEXT NOT NULL,          -- UTC, ISO 8601
    kind TEXT NOT NULL,                -- 'eval' or 'bench'
    model TEXT NOT NULL,               -- as given with -m
    model_sha256 TEXT NOT NULL,
    model_size_bytes INTEGER NOT NULL,
    task TEXT NOT NULL,                -- the eval task, or 'bench'
    settings TEXT NOT NULL,            -- JSON
    metrics TEXT NOT NULL,             -- JSON
    versions TEXT NOT NULL,            -- JSON: machine and software versions
    duration_s REAL NOT NULL,
    worst TEXT NOT NULL DEFAULT '[]',  -- JSON: the worst items, for the report
    run_key TEXT                       -- an eval run's key, kept across --resume; NULL for bench
);
CREATE INDEX IF NOT EXISTS runs_model ON runs (model_sha256, task);
"""
RUN_KEY_INDEX = "CREATE UNIQUE INDEX IF NOT EXISTS runs_run_key ON runs (run_key)"  # NULLs stay distinct


@dataclass
class Run:
    kind: str
    model: str
    model_sha256: str
    model_size_bytes: int
    task: str
    settings: dict[str, Any]
    metrics: dict[str, Any]
    versions: dict[str, Any]
    duration_s: float
    worst: list[dict[str, Any]] = field(default_factory=list)
    run_key: str | None = None  # a result stored again under the same key is kept once
    created_at: str = ""
    id: int | None = None


def db_path() -> Path:
    return settings.home_dir() / "runs.sqlite"


def _connect(path: Path, writing: bool = True) -> sqlite3.Connection:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # KILN_HOME is a file, or in a place that cannot be written
        raise InvalidParameterError(
            f"cannot make the folder {path.parent} for the runs database ({exc.strerror}); set KILN_HOME to a "
            "writable folder"
        ) from exc
    try:  # a folder in the database's place fails here, not in the first statement
        conn = sqlite3.connect(path)
    except sqlite3.DatabaseError as exc:
        raise DataFormatError(
            f"{path} is not a usable runs database ({exc}); move it aside and kiln starts a new one"
        ) from exc
    try:
        conn.executescript(SCHEMA)
        if "run_key" not in {row[1] for row in conn.execute("PRAGMA table_info(runs)")}:
            conn.execute("ALTER TABLE runs ADD COLUMN run_key TEXT")  # a database from before run keys
        conn.execute(RUN_KEY_INDEX)
        _check_columns(path, conn, writing)
    except sqlite3.DatabaseError as exc:  # a damaged or foreign file: say which, and how to start afresh
        conn.close()
        raise DataFormatError(
            f"{path} is not a usable runs database ({exc}); move it aside and kiln starts a new one"
        ) from exc
    return conn


COLUMNS = ("id", "created_at", "kind", "model", "model_sha256", "model_size_bytes", "task", "settings", "metrics",
           "versions", "duration_s", "worst", "run_key")


def _check_columns(path: Path, conn: sqlite3.Connection, writing: bool) -> None:
    """Refuse a runs table this kiln cannot read, or when `writing` one it cannot write (a newer kiln's, with
    a column it must fill), before the command's work: the INSERT failed only once an evaluation was done."""
    # PRAGMA table_info rows: (cid, name, type, notnull, default, pk)
    columns = {row[1]: row for row in conn.execute("PRAGMA table_info(runs)")}
    missing = [c for c in COLUMNS if c not in columns]
    required = [name for name, row in columns.items()
                if writing and name not in COLUMNS and row[3] and row[4] is None]
    if missing or required:
        what = (f"lacks the column(s) {', '.join(missing)}" if missing
                else f"requires the column(s) {', '.join(required)}, which this kiln does not know (a newer kiln's?)")
        conn.close()
        raise DataFormatError(f"{path}: its runs table {what}; use the kiln that made it, or set KILN_HOME to "
                              "another folder to start a new database")


def check(path: Path | None = None) -> None:
    """Open the database once, so a command refuses a damaged one before its work, not after it."""
    _connect(path or db_path()).close()


def add(run: Run, path: Path | None = None) -> int:
    """Store one finished run (one transaction) and return its id; a run_key stored before keeps its row."""
    run.created_at = run.created_at or datetime.now(UTC).isoformat(timespec="seconds")
    conn = _connect(path or db_path())
    try:
        with conn:
            stored = conn.execute("SELECT id FROM runs WHERE run_key = ?", (run.run_key,)).fetchone()
            if stored is not None:  # a resumed run whose result was stored before its checkpoint went
                run.id = int(stored[0])
                return run.id
            cursor = conn.execute(
                "INSERT INTO runs (created_at, kind, model, model_sha256, model_size_bytes, task, settings, metrics,"
                " versions, duration_s, worst, run_key) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (run.created_at, run.kind, run.model, run.model_sha256, run.model_size_bytes, run.task,
                 json.dumps(run.settings), json.dumps(run.metrics), json.dumps(run.versions), run.duration_s,
                 json.dumps(run.worst), run.run_key),
            )
        run.id = int(cursor.lastrowid or 0)
        return run.id
    finally:
        conn.close()


def query(model: str | None = None, kind: str | None = None, path: Path | None = None) -> list[Run]:
    """Runs, oldest first; `model` matches the name given with -m or a prefix of the sha256."""
    sql, args = "SELECT * FROM runs WHERE 1=1", []
    if model:
        # a prefix of the hash, not a pattern: % and _ in `model` matched every run
        sql += " AND (model = ? OR substr(model_sha256, 1, ?) = ?)"
        args += [model, len(model), model]
    if kind:
        sql += " AND kind = ?"
        args.append(kind)
    conn = _connect(path or db_path(), writing=False)
    conn.row_factory = sqlite3.Row
    try:
        rows = conn.execute(sql + " ORDER BY id", args).fetchall()
    finally:
        conn.close()
    return [
        Run(kind=r["kind"], model=r["model"], model_sha256=r["model_sha256"],
            model_size_bytes=r["model_size_bytes"], task=r["task"], settings=json.loads(r["settings"]),
            metrics=json.loads(r["metrics"]), versions=json.loads(r["versions"]), duration_s=r["duration_s"],
            worst=json.loads(r["worst"]), run_key=r["run_key"], created_at=r["created_at"], id=r["id"])
        for r in rows
    ]
