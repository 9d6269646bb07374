"""Per-item results of a run in progress, appended as they finish, so `--resume` can skip them.

The file lives under $KILN_HOME/partial/, named by a hash of everything that defines the run
(model, baseline, task, settings); it is removed once the run's result is stored. It also keeps the
run's key, under which the result is stored, so a resumed run does not store the same result twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

from kiln import settings


class Checkpoint:
    def __init__(self, identity: dict[str, Any]) -> None:
        key = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:24]
        self.path: Path = settings.home_dir() / "partial" / f"{key}.jsonl"
        self.run_key: str | None = None  # read by load(), made by key()

    def start(self) -> None:
        """Begin a fresh run: an empty file, so a run interrupted before its first batch can be resumed too."""
        self.discard()
        self.append([])

    def load(self) -> dict[int, dict[str, Any]]:
        """Records already finished, by item index (a torn last line from a crash is ignored)."""
        done: dict[int, dict[str, Any]] = {}
        if not self.path.is_file():
            return done
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "run_key" in record:
                self.run_key = str(record["run_key"])
            else:
                done[int(record["index"])] = record
        return done

    def key(self) -> str:
        """The run's key for the runs database: the one in the file, or a new one, written before it is used."""
        if self.run_key is None:
            self.run_key = uuid.uuid4().hex
            self.append([{"run_key": self.run_key}])
        return self.run_key

    def append(self, records: list[dict[str, Any]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)
