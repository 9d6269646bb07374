"""Putting finished outputs in place so an interruption never leaves a half-written one or loses the last good one."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from kiln.errors import InvalidParameterError


def check_replaceable(out: Path, marker: str, what: str) -> None:
    """Refuse an output folder that writing a `what` there would destroy: a file, or a non-empty folder
    without `marker` (the file every earlier `what` holds), whose files the replacement would delete.
    Callers run it before any work, so a wrong -o costs nothing."""
    if out.exists() and not out.is_dir():
        raise InvalidParameterError(f"output {out} is a file, not a folder; pass a new folder for the {what}")
    if out.is_dir() and not (out / marker).is_file() and any(out.iterdir()):
        raise InvalidParameterError(f"output folder {out} is not empty and not a kiln {what}; writing would "
                                    "replace its files, so pass a new or empty folder")


def replace_folder(new: Path, out: Path) -> None:
    """Move the finished folder `new` to `out`. A previous `out` is renamed aside first and deleted only once
    `new` is in place: deleting it first lost the last good output to a Ctrl-C between the two steps."""
    old = out.with_name(f".{out.name}.{os.getpid()}.old")
    shutil.rmtree(old, ignore_errors=True)
    try:
        if out.exists():
            os.replace(out, old)
        os.replace(new, out)
    except BaseException:  # a Ctrl-C (or a failed rename) between the two: the previous output goes back
        if old.exists() and not out.exists():
            os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_text(path: Path, text: str) -> None:
    """Write `path` whole or not at all (a temporary file beside it, then a rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
