"""The model registry: named models, their versions (artifact path + sha256), which one is live, canaries.

`kiln registry add|list|promote|rollback|canary` edits it; `kiln serve --registry` serves the live
version of every name (and a canary's share of traffic) and follows changes while it runs. One SQLite
file ($KILN_HOME/registry.sqlite); every change is one transaction and is recorded in a history table,
which is what rollback walks back.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from kiln import settings
from kiln.errors import InvalidParameterError
from kiln.model.source import resolve

SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    state TEXT NOT NULL,             -- candidate | live | canary | retired
    canary_share REAL NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS history (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    action TEXT NOT NULL,            -- add | promote | rollback | canary
    at TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class Version:
    name: str
    version: str
    path: str
    sha256: str
    state: str
    canary_share: float
    created_at: str


def _check_label(kind: str, value: str, example: str) -> None:
    """A name clients send as the request's `model`, a version they get back in X-Kiln-Model-Version: an empty one,
    or one with spaces or control characters, was registered, and an empty name was taken for every model."""
    if not value or len(value) > 128 or any(c.isspace() or not c.isprintable() for c in value):
        raise InvalidParameterError(f"a {kind} must be 1-128 printable characters without spaces, not {value!r}; "
                                    f"e.g. {example}")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Registry:
    def __init__(self, path: Path | None = None) -> None:
        self.path = path or settings.home_dir() / "registry.sqlite"

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path)
        conn.executescript(SCHEMA)
        conn.row_factory = sqlite3.Row
        return conn

    def versions(self, name: str | None = None) -> list[Version]:
        conn = self._connect()
        try:
            # `is not None`: an empty name listed every model's versions, so `add ""` saw another model's live one
            one = name is not None
            sql = "SELECT * FROM versions" + (" WHERE name = ?" if one else "") + " ORDER BY name, created_at"
            rows = conn.execute(sql, (name,) if one else ()).fetchall()
        finally:
            conn.close()
        return [Version(**dict(r)) for r in rows]

    def get(self, name: str, version: str) -> Version:
        found = [v for v in self.versions(name) if v.version == version]
        if not found:
            known = ", ".join(v.version for v in self.versions(name)) or "none"
            raise InvalidParameterError(f"model {name!r} has no version {version!r}; its versions: {known}")
        return found[0]

    def add(self, name: str, path: str, version: str | None = None) -> Version:
        """Register `path` (any -m value) under `name`; the first version of a name goes live."""
        _check_label("model name", name, "chat or org/chat-int8")
        if version is not None:  # an empty --version fell back to the sha256 label without a word
            _check_label("version label", version, "v2 or 2026-11-28")
        source = resolve(path)
        sha = source.sha256
        label = version or sha[:12]
        if any(v.version == label for v in self.versions(name)):
            raise InvalidParameterError(f"model {name!r} already has a version {label!r}; pass --version")
        state = "candidate" if any(v.state == "live" for v in self.versions(name)) else "live"
        conn = self._connect()
        try:
            with conn:
                conn.execute("INSERT INTO versions VALUES (?, ?, ?, ?, ?, 0, ?)",
                             (name, label, str(Path(path).resolve()) if path != "default" else path, sha, state,
                              _now()))
                conn.execute("INSERT INTO history (name, version, action, at) VALUES (?, ?, ?, ?)",
                             (name, label, "add" if state == "candidate" else "promote", _now()))
        finally:
            conn.close()
        return self.get(name, label)

    @staticmethod
    def _set_live(conn: sqlite3.Connection, name: str, version: str) -> None:
        conn.execute("UPDATE versions SET state = 'retired', canary_share = 0 WHERE name = ? AND "
                     "state IN ('live', 'canary')", (name,))
        conn.execute("UPDATE versions SET state = 'live', canary_share = 0 WHERE name = ? AND version = ?",
                     (name, version))

    def promote(self, name: str, version: str) -> Version:
        """Make `version` live; the live one is retired; any canary ends."""
        self.get(name, version)
        conn = self._connect()
        try:
            with conn:
                self._set_live(conn, name, version)
                conn.execute("INSERT INTO history (name, version, action, at) VALUES (?, ?, 'promote', ?)",
                             (name, version, _now()))
        finally:
            conn.close()
        return self.get(name, version)

    def rollback(self, name: str) -> Version:
        """Make the version live before the current one live again (each rollback walks one further back)."""
        conn = self._connect()
        try:
            promotions = conn.execute("SELECT id, version FROM history WHERE name = ? AND action = 'promote' "
                                      "ORDER BY id", (name,)).fetchall()
            if len(promotions) < 2:
                raise InvalidParameterError(f"model {name!r} has no earlier live version to roll back to")
            current, previous = promotions[-1], promotions[-2]
            with conn:
                self._set_live(conn, name, previous["version"])
                conn.execute("UPDATE history SET action = 'rolled_back' WHERE id = ?", (current["id"],))
                conn.execute("INSERT INTO history (name, version, action, at) VALUES (?, ?, 'rollback', ?)",
                             (name, previous["version"], _now()))
        finally:
            conn.close()
        return self.get(name, previous["version"])

    def canary(self, name: str, version: str, share: float) -> Version:
        """Send `share` of `name`'s traffic to `version` (0 ends the canary)."""
        if not 0 <= share <= 1:
            raise InvalidParameterError(f"--share {share} must be in [0, 1]")
        current = self.get(name, version)
        if current.state == "live":
            raise InvalidParameterError(f"{name!r} version {version!r} is already live")
        conn = self._connect()
        try:
            with conn:
                conn.execute("UPDATE versions SET state = 'candidate', canary_share = 0 WHERE name = ? AND "
                             "state = 'canary'", (name,))
                conn.execute("UPDATE versions SET state = ?, canary_share = ? WHERE name = ? AND version = ?",
                             ("canary" if share > 0 else "candidate", share, name, version))
                conn.execute("INSERT INTO history (name, version, action, at) VALUES (?, ?, 'canary', ?)",
                             (name, version, _now()))
        finally:
            conn.close()
        return self.get(name, version)

    def serving(self) -> dict[str, tuple[Version, Version | None]]:
        """For each name: (live version, canary version or None)."""
        out: dict[str, tuple[Version, Version | None]] = {}
        for name in sorted({v.name for v in self.versions()}):
            versions = self.versions(name)
            live = next((v for v in versions if v.state == "live"), None)
            if live is not None:
                out[name] = (live, next((v for v in versions if v.state == "canary"), None))
        return out
