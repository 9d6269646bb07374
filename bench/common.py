"""What every benchmark script shares: writing its table into its own section of BENCHMARKS.md."""

from __future__ import annotations

from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


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
