"""The evaluation tasks kiln knows, by name, and how to resolve a --task value."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from kiln.errors import InvalidParameterError

TaskKind = Literal["perplexity", "multiple_choice", "completion", "generation"]


@dataclass(frozen=True)
class TaskRef:
    """A resolved --task value: its canonical name, kind, and the user's file for mc:/gen: tasks."""

    name: str
    kind: TaskKind
    path: Path | None = None


BUILTIN: dict[str, TaskKind] = {
    "wikitext2": "perplexity",
    "hellaswag": "multiple_choice",
    "arc_easy": "multiple_choice",
    "arc_challenge": "multiple_choice",
    "piqa": "multiple_choice",
    "lambada_openai": "completion",
    "squad": "generation",
}
PREFIXES: dict[str, TaskKind] = {"mc": "multiple_choice", "gen": "generation"}


def resolve(value: str) -> TaskRef:
    """'hellaswag' -> a built-in task; 'mc:FILE.jsonl' / 'gen:FILE.jsonl' -> the user's own data."""
    if value in BUILTIN:
        return TaskRef(value, BUILTIN[value])
    prefix, sep, rest = value.partition(":")
    if sep and prefix in PREFIXES and rest:
        return TaskRef(value, PREFIXES[prefix], Path(rest).expanduser())
    known = ", ".join([*BUILTIN, "mc:FILE.jsonl", "gen:FILE.jsonl"])
    raise InvalidParameterError(f"unknown task {value!r}; known tasks: {known}")
