"""Where the evaluators' log-probabilities come from: kiln's graph in this process, or a server (served.py).

Multiple choice and perplexity ask a Scorer, so `kiln eval --api` runs the same items, tokenization and
metrics as an in-process run and only the numbers' source differs: that is what makes the two comparable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from kiln.evaluate import loglikelihood, perplexity
from kiln.evaluate.loglikelihood import ContinuationScore, ScoreRequest
from kiln.model.llama import LlamaModel


class Scorer(Protocol):
    def loglikelihoods(self, requests: Sequence[ScoreRequest],
                       on_done: Callable[[int], None] | None = None) -> list[list[ContinuationScore]]:
        """Every continuation of every request scored given its context; on_done(n) reports requests finished,
        in request order."""
        ...

    def chunks(self, chunks: list[list[int]]) -> list[perplexity.Sums]:
        """llama.cpp's perplexity sums of each ctx-token chunk (one Sums per chunk): the tokens of its second
        half, each given every token before it."""
        ...


@dataclass(frozen=True)
class ModelScorer:
    """The Scorer on kiln's torch graph, the reference the harness comparisons rest on."""

    model: LlamaModel
    max_rows: int = loglikelihood.MAX_ROWS  # continuations scored together (kiln eval --batch-size)
    baseline: LlamaModel | None = None  # perplexity: KL divergence against this model's distributions

    def loglikelihoods(self, requests: Sequence[ScoreRequest],
                       on_done: Callable[[int], None] | None = None) -> list[list[ContinuationScore]]:
        return loglikelihood.score(self.model, requests, max_rows=self.max_rows, on_done=on_done)

    def chunks(self, chunks: list[list[int]]) -> list[perplexity.Sums]:
        return perplexity.score_chunks(self.model, chunks, self.baseline)
