"""Putting finished outputs in place so an interruption never leaves a half-written one or loses the last good one."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def replace_folder(new: Path, out: Path) -> None:
    """Move the finished folder `new` to `out`. A previous `out` is renamed aside first and deleted only once
    `new` is in place: deleting it first lost the last good output to a Ctrl-C between the two steps."""
    old = out.with_name(f".{out.name}.{os.getpid()}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(new, out)
    shutil.rmtree(old, ignore_errors=True)


def write_text(path: Path, text: str) -> None:
    """Write `path` whole or not at all (a temporary file beside it, then a rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
