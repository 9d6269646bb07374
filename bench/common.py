"""What benchmark scripts share: writing a table into its own section of BENCHMARKS.md, a table cell of
repeated measurements, and timing in a fresh process of their own."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def cell(values: list[float]) -> str:
    """Repeated measurements as a table cell: median [min-max]."""
    return f"{statistics.median(values):.1f} [{min(values):.1f}-{max(values):.1f}]"


def update_section(script: str, table: str) -> None:
    """Replace the block between `<!-- script:start -->` and `<!-- script:end -->` (append it if absent)."""
    start, end = f"<!-- {script}:start -->", f"<!-- {script}:end -->"
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else ""
    block = f"{start}\n{table}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text += f"\n{block}\n"
    BENCHMARKS.write_text(text)


def run_child(script: str, args: list[str], env: dict[str, str]) -> dict:
    """Run `script --child ARGS` in a fresh interpreter and return the JSON object its last line prints."""
    proc = subprocess.run([sys.executable, script, "--child", *args], env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))
