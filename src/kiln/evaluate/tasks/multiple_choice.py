"""Multiple-choice items in lm-evaluation-harness's prompt formats (0.4.x task YAMLs), from local files.

Built-in tasks score " " + choice after the context (the harness's target delimiter); a user's
mc:FILE.jsonl scores each choice exactly as written. Scoring is left to kiln.evaluate.multiple_choice.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from kiln.errors import DataFormatError
from kiln.evaluate.data import data_file, read_jsonl, read_text, require, user_file


@dataclass(frozen=True)
class MCItem:
    index: int
    context: str
    choices: list[str]  # choice texts; acc_norm divides by their length in characters
    gold: int
    delimiter: str = " "  # put between context and each choice when scoring
    where: str = ""  # "FILE:LINE" of a user's item, for errors about it


def hellaswag_preprocess(text: str) -> str:
    """lm-evaluation-harness's HellaSwag clean-up of WikiHow markup."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag(data_dir: Path | None = None) -> Iterator[MCItem]:
    """The llama.cpp-format validation file: 6 lines per item (context, gold, 4 endings)."""
    path = data_file("hellaswag/hellaswag_val_full.txt", data_dir)
    lines = read_text(path).split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise DataFormatError(f"{path}: {len(lines)} lines is not a multiple of 6 (context, gold, 4 endings)")
    for i in range(len(lines) // 6):
        block = lines[6 * i : 6 * i + 6]
        if not block[1].strip().isdigit() or not 0 <= int(block[1]) < 4:
            raise DataFormatError(f"{path}:{6 * i + 2}: gold label {block[1]!r} is not 0-3")
        yield MCItem(i, hellaswag_preprocess(block[0]), [hellaswag_preprocess(e) for e in block[2:]], int(block[1]))


def arc(subset: str, data_dir: Path | None = None) -> Iterator[MCItem]:
    """ARC test set in its original layout; labels are read from the file (A-E or 1-4)."""
    path = data_file(f"arc/ARC-{subset}-Test.jsonl", data_dir)
    for index, (number, record) in enumerate(read_jsonl(path)):
        question = require(path, number, record, "question", dict)
        stem = require(path, number, question, "stem", str)
        choices = require(path, number, question, "choices", list)
        labels = [c.get("label") for c in choices]
        answer = require(path, number, record, "answerKey", str)
        if answer not in labels:
            raise DataFormatError(f"{path}:{number}: answerKey {answer!r} is not one of the labels {labels}")
        yield MCItem(index, f"Question: {stem}\nAnswer:", [str(c.get("text", "")) for c in choices],
                     labels.index(answer))


def piqa(data_dir: Path | None = None) -> Iterator[MCItem]:
    """PIQA validation: goals and two solutions, labels from the separate .lst file."""
    path = data_file("piqa/valid.jsonl", data_dir)
    labels_path = data_file("piqa/valid-labels.lst", data_dir)
    labels = read_text(labels_path).split()
    for index, (number, record) in enumerate(read_jsonl(path)):
        if index >= len(labels) or labels[index] not in ("0", "1"):
            raise DataFormatError(f"{labels_path}:{index + 1}: missing or bad label for {path}:{number}")
        goal = require(path, number, record, "goal", str)
        sols = [require(path, number, record, k, str) for k in ("sol1", "sol2")]
        yield MCItem(index, f"Question: {goal}\nAnswer:", sols, int(labels[index]))


def custom(path: Path) -> Iterator[MCItem]:
    """A user's file: one {"context", "choices", "gold"} per line, choices scored exactly as written."""
    path = user_file(path)
    for index, (number, record) in enumerate(read_jsonl(path)):
        context = require(path, number, record, "context", str)
        choices = require(path, number, record, "choices", list)
        if len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise DataFormatError(f"{path}:{number}: 'choices' must be a list of at least two non-empty strings")
        twice = sorted({c for c in choices if choices.count(c) > 1})
        if twice:  # tied scores go to the first copy, so a gold that is the later copy was never right
            raise DataFormatError(f"{path}:{number}: 'choices' holds {twice[0]!r} more than once; keep one copy")
        gold = require(path, number, record, "gold", int)
        if not 0 <= gold < len(choices):
            raise DataFormatError(f"{path}:{number}: gold {gold} is not an index into its {len(choices)} choices")
        yield MCItem(index, context, choices, gold, delimiter="", where=f"{path}:{number}")


def load(name: str, data_dir: Path | None = None, path: Path | None = None) -> Iterator[MCItem]:
    if name == "hellaswag":
        return hellaswag(data_dir)
    if name in ("arc_easy", "arc_challenge"):
        return arc("Easy" if name == "arc_easy" else "Challenge", data_dir)
    if name == "piqa":
        return piqa(data_dir)
    assert path is not None, "mc: tasks carry their file"
    return custom(path)
