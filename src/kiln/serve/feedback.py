"""The requests database: each served request and response (PII redacted) and the user's rating of it.

One SQLite file ($KILN_HOME/requests.sqlite) in WAL mode; every write is one transaction on its own
connection, so the server's worker threads can log concurrently. `export` writes the JSONL that the next
distillation round trains on; choosing which records to train on is left to that step.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kiln import settings
from kiln.errors import InvalidParameterError
from kiln.files import final_path, is_stream
from kiln.serve.redact import redact

SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id TEXT PRIMARY KEY,               -- the response id the client saw, e.g. chatcmpl-...
    created_at TEXT NOT NULL,          -- UTC, ISO 8601
    model TEXT NOT NULL,               -- the served model's name
    version TEXT NOT NULL,             -- its version (artifact hash or registry version)
    request TEXT NOT NULL,             -- JSON body, every string redacted
    response TEXT NOT NULL,            -- generated text, redacted
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    rating NUMERIC,                    -- NULL until rated; NUMERIC keeps 4 as 4 and 4.5 as 4.5
    comment TEXT,                      -- redacted
    rated_at TEXT
);
"""

RATING_RANGE = (-1, 5)
BUSY_TIMEOUT_S = 30.0  # how long a writer waits for another thread's transaction before giving up


def db_path() -> Path:
    return settings.home_dir() / "requests.sqlite"


def redact_json(value: Any) -> Any:
    """A copy of a JSON value with every string value redacted; keys, numbers, booleans and null kept."""
    if isinstance(value, str):
        return redact(value)[0]
    if isinstance(value, dict):
        return {key: redact_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [redact_json(item) for item in value]
    return value


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class FeedbackStore:
    """Logged requests and their ratings in one SQLite file (default: $KILN_HOME/requests.sqlite)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or db_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as conn:
            conn.execute("PRAGMA journal_mode=WAL")  # persistent: readers never block the writer
            conn.executescript(SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # A connection per call: sqlite3 connections must not be shared between threads.
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        try:
            yield conn
        finally:
            conn.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        # BEGIN IMMEDIATE takes the write lock up front, so concurrent writers wait (busy timeout) instead of
        # failing when a read transaction would have to be upgraded.
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def log_request(self, response_id: str, model: str, version: str, request: dict[str, Any], response_text: str,
                    prompt_tokens: int, completion_tokens: int) -> None:
        """Store one served request and its response, both redacted; a repeated id raises sqlite3.IntegrityError."""
        body = json.dumps(redact_json(request), ensure_ascii=False)
        with self._transaction() as conn:
            conn.execute(
                "INSERT INTO requests (id, created_at, model, version, request, response, prompt_tokens,"
                " completion_tokens) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (response_id, _now(), model, version, body, redact(response_text)[0], prompt_tokens,
                 completion_tokens),
            )

    def add_feedback(self, response_id: str, rating: int | float, comment: str | None) -> bool:
        """Rate a logged response (a later rating replaces an earlier one); False if the id was never logged."""
        lo, hi = RATING_RANGE
        # bool is an int subclass, so it is excluded by name; NaN fails the range comparison.
        is_number = isinstance(rating, int | float) and not isinstance(rating, bool)
        if not (is_number and lo <= rating <= hi):
            raise InvalidParameterError(f"rating {rating!r} is out of range; give a number from {lo} to {hi}",
                                        param="rating")
        with self._transaction() as conn:
            cursor = conn.execute(
                "UPDATE requests SET rating = ?, comment = ?, rated_at = ? WHERE id = ?",
                (rating, None if comment is None else redact(comment)[0], _now(), response_id),
            )
            return cursor.rowcount > 0

    def export(self, out: Path, only_rated: bool = False) -> int:
        """Write one JSON line per logged response, oldest first, and return how many were written."""
        sql = "SELECT id, model, version, created_at, request, response, rating, comment FROM requests"
        sql += " WHERE rating IS NOT NULL" if only_rated else ""
        if is_stream(out):  # -o /dev/stdout: written into (files.is_stream)
            try:
                return self._write_jsonl(out, sql + " ORDER BY rowid")
            except OSError as exc:
                raise InvalidParameterError(f"cannot write {out} ({exc.strerror or exc}); choose a writable path") \
                    from exc
        out = final_path(out)
        # renamed at the end: a failed export leaves no half file (a hidden name with the pid: not one of the user's)
        partial = out.with_name(f".{out.name}.{os.getpid()}.partial")
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            count = self._write_jsonl(partial, sql + " ORDER BY rowid")
            os.replace(partial, out)
        except OSError as exc:
            raise InvalidParameterError(f"cannot write {out} ({exc.strerror or exc}); choose a writable path") from exc
        finally:
            if partial.exists():  # only after a failure: on success it was renamed
                partial.unlink()
        return count

    def _write_jsonl(self, path: Path, sql: str) -> int:
        count = 0
        with self._connect() as conn, path.open("w", encoding="utf-8") as f:
            conn.execute("BEGIN")  # one snapshot for the whole file, even while the server keeps writing
            for rid, model, version, created_at, request, response, rating, comment in conn.execute(sql):
                record: dict[str, Any] = {"id": rid, "model": model, "version": version, "created_at": created_at}
                body = json.loads(request)
                record.update({key: body[key] for key in ("messages", "prompt") if key in body})
                record.update({"response": response, "rating": rating, "comment": comment})
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                count += 1
            conn.execute("COMMIT")
        return count
