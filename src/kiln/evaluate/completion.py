"""Completion tasks (LAMBADA) by log-likelihood, with lm-evaluation-harness's definitions.

acc is the share of items whose continuation is the model's greedy choice at every one of its tokens
(the harness's is_greedy); ppl is exp of the mean negative log-likelihood of the continuations, one
value per item (the harness's `perplexity` aggregation, not a per-token one). Tokenization is the
multiple-choice one (multiple_choice.encode_choice, the harness's HF backend), and the context is
computed once per item by the same scorer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from kiln.errors import ContextLengthError, DataFormatError
from kiln.evaluate.loglikelihood import ScoreRequest
from kiln.evaluate.multiple_choice import encode_choice, mean_and_stderr
from kiln.evaluate.scorer import Scorer
from kiln.evaluate.tasks.completion import CompletionItem
from kiln.model.tokenizer import Tokenizer


def request_for(tokenizer: Tokenizer, item: CompletionItem, max_tokens: int | None = None) -> ScoreRequest:
    """The item's score request; max_tokens is the model's context, which context and continuation must fit
    (the continuation's last token is only predicted, so the two may take one token more)."""
    context, continuation = encode_choice(tokenizer, item.context, item.continuation)
    where = item.where or f"item {item.index}"
    if not continuation:
        raise DataFormatError(f"{where}: the continuation {item.continuation!r} merges into the context's last "
                              "token, leaving it no token of its own to score")
    if max_tokens is not None and len(context) + len(continuation) - 1 > max_tokens:
        raise ContextLengthError(f"{where}: the context and continuation are {len(context) + len(continuation)} "
                                 f"tokens, more than the model's context of {max_tokens}; shorten the context")
    return ScoreRequest(context, [continuation])


def evaluate_items(scorer: Scorer, tokenizer: Tokenizer, items: Sequence[CompletionItem],
                   on_done: Callable[[int], None] | None = None, max_tokens: int | None = None
                   ) -> list[dict[str, Any]]:
    """One record per item: the continuation's log-likelihood, its tokens, and whether greedy decoding gives it."""
    requests = [request_for(tokenizer, item, max_tokens) for item in items]
    scores = scorer.loglikelihoods(requests, on_done=on_done)  # one request per item, reported in order
    return [{"index": item.index, "input": item.context, "target": item.continuation,
             "loglikelihood": s.logprob, "tokens": s.num_tokens, "greedy": s.is_greedy, "correct": s.is_greedy,
             "score": s.logprob}  # the worst items are the least likely continuations
            for item, [s] in zip(items, scores, strict=True)]


def metrics(records: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    acc, acc_se = mean_and_stderr([float(r["correct"]) for r in records])
    nll, nll_se = mean_and_stderr([-float(r["loglikelihood"]) for r in records])
    ppl = math.exp(nll) if math.isfinite(nll) else math.nan
    # the delta method: d exp(m) = exp(m) dm (the harness bootstraps this error; the two agree to a few %)
    return {"ppl": ppl, "ppl_stderr": None if nll_se is None else ppl * nll_se, "acc": acc, "acc_stderr": acc_se}
