"""Completion items: one context and the one continuation that should follow it (lm-evaluation-harness's
`output_type: loglikelihood` tasks), from local files. Scoring is left to kiln.evaluate.completion.

LAMBADA (OpenAI's version, the harness's lambada_openai): the last word of a passage, which is hard to
guess from its last sentence alone. The shared data holds it in llm-foundry's {"context", "continuation"}
layout, where the passage is context + " " + continuation; the harness scores " " + last word after the
rest of the passage, which is the same pair.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from kiln.errors import DataFormatError
from kiln.evaluate.data import data_file, read_jsonl, require

LAMBADA_FILE = "extras/lambada_openai_llmfoundry.jsonl"


@dataclass(frozen=True)
class CompletionItem:
    index: int
    context: str
    continuation: str  # scored after the context exactly as written (" word" for LAMBADA)
    where: str = ""  # "FILE:LINE", for errors about the item


def lambada(data_dir: Path | None = None) -> Iterator[CompletionItem]:
    path = data_file(LAMBADA_FILE, data_dir)
    for index, (number, record) in enumerate(read_jsonl(path)):
        context = require(path, number, record, "context", str)
        word = require(path, number, record, "continuation", str)
        if not context.strip() or not word.strip():
            raise DataFormatError(f"{path}:{number}: 'context' and 'continuation' must both hold text")
        yield CompletionItem(index, context, " " + word, f"{path}:{number}")


def load(name: str, data_dir: Path | None = None) -> Iterator[CompletionItem]:
    assert name == "lambada_openai", name
    return lambada(data_dir)
