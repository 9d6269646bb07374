"""Find evaluation data files and read them, with one-line errors for missing files and bad lines."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kiln import settings
from kiln.errors import DataFormatError, DataNotFoundError


def data_file(relative: str, data_dir: Path | None = None) -> Path:
    """The path of a shared data file; a missing one says where it was expected and how to point elsewhere."""
    root = data_dir or settings.data_dir()
    path = root / relative
    if not path.is_file():
        raise DataNotFoundError(
            f"data file {relative} not found under {root}; pass --data DIR or set KILN_DATA_DIR "
            "to the folder that holds it"
        )
    return path


def user_file(path: Path) -> Path:
    if path.is_dir():  # it was said not to exist, which sent the user looking for a typo
        raise DataNotFoundError(f"data file {path} is a folder; pass the .jsonl file inside it")
    if not path.is_file():
        raise DataNotFoundError(f"data file {path} does not exist; check the path")
    return path


def read_text(path: Path) -> str:
    """The whole file as text; one that is not UTF-8 is a one-line error, not a UnicodeDecodeError."""
    try:
        return path.read_text(encoding="utf-8-sig")  # a byte-order mark is not part of the text
    except UnicodeDecodeError as exc:
        raise DataFormatError(f"{path}: {_not_utf8(exc)}") from None


def _not_utf8(exc: UnicodeDecodeError) -> str:
    return f"not UTF-8 text ({exc.reason} at byte {exc.start}); save the file as UTF-8"


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; a malformed line names its file and line."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                # a byte-order mark opens files saved by some Windows editors; json.loads refuses it
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise DataFormatError(f"{path}:{number}: {_not_utf8(exc)}") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataFormatError(f"{path}:{number}: not valid JSON ({exc.msg}); fix or remove the line") from exc
            if not isinstance(record, dict):
                raise DataFormatError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            yield number, record


def require(path: Path, number: int, record: dict[str, Any], field: str, kind: type | tuple[type, ...]) -> Any:
    """record[field], checked to be of `kind`, or an error naming the file, line and field."""
    if field not in record:
        raise DataFormatError(f"{path}:{number}: missing field {field!r}")
    value = record[field]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise DataFormatError(f"{path}:{number}: field {field!r} has the wrong type ({type(value).__name__})")
    return value
