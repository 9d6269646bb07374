"""Greedy generation on a task's prompts, scored with exact match / F1 (SQuAD) and BLEU / ROUGE-L."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from kiln.engine.generate import Generator
from kiln.engine.sampler import SamplingParams
from kiln.evaluate import metrics as text_metrics
from kiln.evaluate.tasks.generation import GenItem
from kiln.model.tokenizer import Tokenizer


def prompt_ids(tokenizer: Tokenizer, item: GenItem) -> list[int]:
    if tokenizer.has_chat_template:
        return tokenizer.encode_chat(item.messages)
    return tokenizer.encode("\n\n".join(m["content"] for m in item.messages))


class TextGenerator(Protocol):
    def answers(self, items: Sequence[GenItem], params: SamplingParams) -> list[str]:
        """The model's output text for each item's messages, generated with `params`, in item order."""
        ...


@dataclass(frozen=True)
class EngineGenerator:
    """The TextGenerator in this process: the chat template applied here, kiln's engine generating."""

    generator: Generator

    def answers(self, items: Sequence[GenItem], params: SamplingParams) -> list[str]:
        prompts = [prompt_ids(self.generator.tokenizer, it) for it in items]
        return [out.text for out in self.generator.generate(prompts, params)]


def evaluate_items(
    generator: TextGenerator,
    items: Sequence[GenItem],
    max_new_tokens: int,
    batch_size: int,
    stop: tuple[str, ...] = (),
    on_done: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """One record per item: the model's output and its exact match / F1 against the references."""
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop=stop)
    records: list[dict[str, Any]] = []
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        for item, text in zip(batch, generator.answers(batch, params), strict=True):
            answer = text.strip()
            f1 = text_metrics.f1(answer, item.references)
            records.append({
                "index": item.index,
                "input": item.messages[-1]["content"],
                "target": item.references[0],
                "references": item.references,
                "output": answer,
                "exact_match": text_metrics.exact_match(answer, item.references),
                "f1": f1,
                "correct": f1 == 1.0,
                "score": f1,
            })
        if on_done is not None:
            on_done(len(batch))
    return records


def metrics(records: Sequence[dict[str, Any]], with_overlap: bool) -> dict[str, float | None]:
    """exact_match and f1 in percent (as the SQuAD script reports them); BLEU and ROUGE-L when asked."""
    n = len(records)
    out: dict[str, float | None] = {
        "exact_match": 100 * sum(r["exact_match"] for r in records) / n,
        "f1": 100 * sum(r["f1"] for r in records) / n,
    }
    if with_overlap:
        predictions = [r["output"] for r in records]
        references = [r["references"] for r in records]
        out["bleu"] = text_metrics.corpus_bleu(predictions, references)
        out["rouge_l"] = text_metrics.rouge_l(predictions, references)
    return out
