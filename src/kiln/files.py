"""Putting finished outputs in place so an interruption never leaves a half-written one or loses the last good one."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from kiln.errors import InvalidParameterError


def check_replaceable(out: Path, marker: str, what: str) -> None:
    """Refuse an output folder that writing a `what` there would destroy: a file, or a non-empty folder
    without `marker` (the file every earlier `what` holds), whose files the replacement would delete.
    Callers run it before any work, so a wrong -o costs nothing: that includes a place the folder cannot
    be made (under a file, or in a read-only folder), which was found only when the finished output moved in."""
    where = next(p for p in [out.absolute(), *out.absolute().parents] if p.exists())  # the root always exists
    if where != out.absolute() and not where.is_dir():
        raise InvalidParameterError(f"output {out} is under {where}, which is a file; pass a folder in a directory")
    if not os.access(where if where.is_dir() else where.parent, os.W_OK):
        raise InvalidParameterError(f"output {out} cannot be written ({where} is read-only); pass a writable folder")
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


def is_stream(path: Path) -> bool:
    """A device, pipe or terminal (`-o /dev/stdout`): written into, never renamed over. Renaming a finished
    file over /dev/stdout replaced the link in /dev with a regular file (and /dev/full, as root, the device)."""
    return path.exists() and not path.is_file() and not path.is_dir()


def final_path(path: Path) -> Path:
    """Where a finished file goes: a symbolic link's target, so the link stays a link."""
    return path.resolve() if path.is_symlink() else path


def write_text(path: Path, text: str) -> None:
    """Write `path` whole or not at all (a temporary file beside it, then a rename); a stream is written into."""
    if is_stream(path):
        with path.open("w", encoding="utf-8") as f:
            f.write(text)
        return
    path = final_path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
