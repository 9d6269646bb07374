"""Generation items: SQuAD v1.1 dev questions, or a user's {"prompt", "reference"} jsonl."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from kiln.errors import DataFormatError
from kiln.evaluate.data import data_file, read_jsonl, read_text, require, user_file

SQUAD_INSTRUCTION = (
    "Answer the question with a short phrase copied from the passage. Reply with the answer only."
)


@dataclass(frozen=True)
class GenItem:
    index: int
    messages: list[dict[str, str]]  # chat messages (the chat template is applied when the model has one)
    references: list[str]  # one or more acceptable answers
    where: str = ""  # "FILE:LINE" of a user's item, for errors about it


def squad(data_dir: Path | None = None) -> Iterator[GenItem]:
    """SQuAD v1.1 dev in file order: passage and question in one user message, all gold answers kept."""
    path = data_file("squad/dev-v1.1.json", data_dir)
    try:
        articles = json.loads(read_text(path))["data"]
    except (ValueError, KeyError) as exc:
        raise DataFormatError(f"{path}: not a SQuAD v1.1 file ({exc}); expected {{'data': [...]}}") from exc
    index = 0
    for article in articles:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                content = f"{paragraph['context']}\n\nQuestion: {qa['question']}"
                yield GenItem(
                    index,
                    [{"role": "system", "content": SQUAD_INSTRUCTION}, {"role": "user", "content": content}],
                    [a["text"] for a in qa["answers"]],
                )
                index += 1


def custom(path: Path) -> Iterator[GenItem]:
    """A user's file: one {"prompt", "reference"} per line (reference a string or a list of strings)."""
    path = user_file(path)
    for index, (number, record) in enumerate(read_jsonl(path)):
        prompt = require(path, number, record, "prompt", str)
        reference = require(path, number, record, "reference", (str, list))
        references = [reference] if isinstance(reference, str) else reference
        if not references or not all(isinstance(r, str) for r in references):
            raise DataFormatError(f"{path}:{number}: 'reference' must be a string or a list of strings")
        yield GenItem(index, [{"role": "user", "content": prompt}], references, where=f"{path}:{number}")
