"""Zero-shot multiple choice by log-likelihood ranking, with lm-evaluation-harness's definitions.

Tokenization follows the harness's `_encode_pair` (trailing context spaces move to the continuation;
the continuation is the tail of encode(context + continuation)); acc ranks summed log-probabilities,
acc_norm divides them by each choice's length in characters; standard errors are sample std / sqrt(n).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

from kiln.errors import DataFormatError
from kiln.evaluate.loglikelihood import ScoreRequest
from kiln.evaluate.scorer import Scorer
from kiln.evaluate.tasks.multiple_choice import MCItem
from kiln.model.tokenizer import Tokenizer


def encode_choice(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) exactly as the harness's HF backend makes them."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation = context[-spaces:] + continuation
        context = context[:-spaces]
    if context == "":
        # also a context of whitespace alone, once its spaces moved: it has no token of its own to predict
        # the first continuation token from (the scorer read that prediction from an unwritten row)
        cont = tokenizer.encode(continuation, add_special_tokens=False)
        prefix = tokenizer.prefix_token_id
        return ([prefix], cont) if cont[0] != prefix else (cont[:1], cont[1:])
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return context_ids, whole[len(context_ids) :]


def requests_for(tokenizer: Tokenizer, item: MCItem,
                 max_tokens: int | None = None) -> list[tuple[ScoreRequest, list[int]]]:
    """Score requests for one item, choices sharing a context grouped; with the choice index of each.

    max_tokens: the model's context; a choice is read after its context with its last token only predicted,
    so the two may take one token more."""
    groups: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
    for c, choice in enumerate(item.choices):
        ctx, cont = encode_choice(tokenizer, item.context, item.delimiter + choice)
        if not cont:  # e.g. "x" + "a" encoded as the one token "xa": no token of the choice's own to score
            raise DataFormatError(
                f"{item.where or f'item {item.index}'}: choice {choice!r} merges into the context's last token, "
                "leaving it no token of its own to score; start each choice with a space (or end the context "
                "with one)")
        if max_tokens is not None and len(ctx) + len(cont) - 1 > max_tokens:  # the rotary table ends there
            raise DataFormatError(
                f"{item.where or f'item {item.index}'}: the context and choice {choice[:40]!r} are "
                f"{len(ctx) + len(cont)} tokens, more than the model's context of {max_tokens}; shorten the context")
        groups.setdefault(tuple(ctx), []).append((c, cont))
    return [
        (ScoreRequest(list(ctx), [cont for _, cont in members]), [c for c, _ in members])
        for ctx, members in groups.items()
    ]


def evaluate_items(
    scorer: Scorer,
    tokenizer: Tokenizer,
    items: Sequence[MCItem],
    on_done: Callable[[int], None] | None = None,
    max_tokens: int | None = None,
) -> list[dict[str, Any]]:
    """One record per item: the choices' log-likelihoods (from `scorer`), predictions and correctness.

    max_tokens: the model's context, which an item's context and choice must fit."""
    requests: list[ScoreRequest] = []
    owners: list[tuple[int, list[int]]] = []  # (item position, choice indices) of each request
    for pos, item in enumerate(items):
        for req, choice_ids in requests_for(tokenizer, item, max_tokens):
            requests.append(req)
            owners.append((pos, choice_ids))
    remaining = [0] * len(items)  # requests still to score, per item
    for pos, _ in owners:
        remaining[pos] += 1
    finished_requests = iter(owners)

    def done(n_requests: int) -> None:  # requests finish in order: translate them into finished items
        finished = 0
        for pos, _ in itertools.islice(finished_requests, n_requests):
            remaining[pos] -= 1
            finished += remaining[pos] == 0
        if on_done is not None and finished:
            on_done(finished)

    scores = scorer.loglikelihoods(requests, on_done=done)
    lls: list[list[float]] = [[0.0] * len(item.choices) for item in items]
    for (pos, choice_ids), result in zip(owners, scores, strict=True):
        for c, s in zip(choice_ids, result, strict=True):
            lls[pos][c] = s.logprob
    return [record(item, ll) for item, ll in zip(items, lls, strict=True)]


def record(item: MCItem, lls: list[float]) -> dict[str, Any]:
    normed = [ll / len(choice) for ll, choice in zip(lls, item.choices, strict=True)]
    pred = max(range(len(lls)), key=lambda i: (lls[i], -i))  # first index wins ties, like numpy.argmax
    pred_norm = max(range(len(normed)), key=lambda i: (normed[i], -i))
    best_other = max((ll for i, ll in enumerate(lls) if i != item.gold), default=-math.inf)
    return {
        "index": item.index,
        "input": item.context,
        "target": item.choices[item.gold],
        "choices": item.choices,
        "gold": item.gold,
        "loglikelihoods": lls,
        "prediction": pred,
        "prediction_norm": pred_norm,
        "correct": pred == item.gold,
        "correct_norm": pred_norm == item.gold,
        "score": lls[item.gold] - best_other,  # margin of the right answer; the worst items are the lowest
    }


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and its standard error (sample std / sqrt(n)), as lm-evaluation-harness reports them.

    The error of fewer than two values is undefined: None (JSON null, "n/a" in text), not NaN, which is
    not valid JSON."""
    n = len(values)
    if n == 0:
        return math.nan, None
    mean = sum(values) / n
    if n < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def metrics(records: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    acc, acc_se = mean_and_stderr([float(r["correct"]) for r in records])
    norm, norm_se = mean_and_stderr([float(r["correct_norm"]) for r in records])
    return {"acc": acc, "acc_stderr": acc_se, "acc_norm": norm, "acc_norm_stderr": norm_se}
