"""A model behind an OpenAI-compatible server as `kiln eval --api` scores it: a Scorer and a TextGenerator.

Log-likelihoods come as lm-evaluation-harness's local-completions reads them: POST /v1/completions with the
token ids made here by the served model's tokenizer (-m), echo and logprobs, and the prompt's own token
log-probabilities read back. A server that does not return those is refused by name: through such a server
lm-eval's scores silently fall to chance (llama.cpp issue #27174). Generation goes through
/v1/chat/completions, or, for a model without a chat template, as -m's token ids on /v1/completions; every
path that sends token ids first checks that the server's vocabulary is -m's. The HTTP (concurrency, retries,
errors) is client.py's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kiln.engine.sampler import SamplingParams
from kiln.errors import EndpointError
from kiln.evaluate import perplexity
from kiln.evaluate.client import ApiClient, ApiConfig
from kiln.evaluate.generation import prompt_ids
from kiln.evaluate.loglikelihood import ContinuationScore, ScoreRequest
from kiln.evaluate.tasks.generation import GenItem
from kiln.model.source import ModelSource
from kiln.model.spec import ModelSpec
from kiln.model.tokenizer import Tokenizer

NO_PROMPT_LOGPROBS = (
    "{url} does not return prompt log-probabilities (echo with logprobs on /v1/completions), so it cannot score "
    "loglikelihood tasks: their scores would fall to chance; serve the model with kiln serve, or score only "
    "generation tasks (squad, gen:FILE.jsonl) through this server"
)
# a request for a prompt's own tokens back: max_tokens 1 is the API's minimum (the token is ignored), temperature
# 0 keeps it cheap
ECHO = {"echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0}


@dataclass
class ServedModel:
    """A model evaluated through a server: the local tokenizer that makes its token ids, the identity the runs
    database keeps (that of -m, which the server is taken to serve), and the client."""

    spec: ModelSpec
    tokenizer: Tokenizer
    source: ModelSource
    client: ApiClient
    name: str | None  # the `model` of every request; None: the server's default

    @property
    def sha256(self) -> str:
        return self.source.sha256

    def settings(self) -> dict[str, Any]:
        """What marks a run as scored through this server (the runs database, the checkpoint's identity)."""
        return {"api": self.client.config.base_url, "api_model": self.name}

    def close(self) -> None:
        self.client.close()


def connect(model: str, config: ApiConfig) -> ServedModel:
    """The server asked which model it serves (an unreachable one fails here, before any work), then the
    tokenizer of `model` (-m) loaded without its weights."""
    from kiln.model.load import load_tokenizer

    client = ApiClient(config)
    try:
        name = served_name(client)
        spec, tokenizer, source = load_tokenizer(model)
    except BaseException:
        client.close()
        raise
    return ServedModel(spec, tokenizer, source, client, name)


def served_name(client: ApiClient) -> str | None:
    """--api-model if the server lists it, or the only model it lists; None for a server without /v1/models."""
    config = client.config
    listed = client.get("/v1/models", missing_ok=True)
    data = listed.get("data") if isinstance(listed, dict) else None
    if not isinstance(data, list):
        return config.model
    ids = [str(m["id"]) for m in data if isinstance(m, dict) and "id" in m]
    if config.model is not None:
        if ids and config.model not in ids:
            raise EndpointError(f"{config.base_url} does not serve {config.model!r}; it serves {', '.join(ids)}: "
                                "pass one of them with --api-model")
        return config.model
    if len(ids) > 1:
        raise EndpointError(f"{config.base_url} serves several models ({', '.join(ids)}); pass the one that -m "
                            "names with --api-model NAME")
    return ids[0] if ids else None


@dataclass(frozen=True)
class PromptLogprobs:
    """A prompt's own token log-probabilities, as a server echoes them."""

    logprobs: list[float]  # [T]: log p(token t | the tokens before it); 0.0 at t = 0, which nothing predicts
    is_top: list[bool]  # [T]: token t was the most likely next token (False where the server gave no top_logprobs)


class ApiScorer:
    """The Scorer through a server: one echo pass per context + continuation (and per perplexity chunk),
    several prompts per request and a few requests in flight."""

    def __init__(self, served: ServedModel) -> None:
        self.served = served
        self._vocabulary_checked = False

    def loglikelihoods(self, requests: Sequence[ScoreRequest],
                       on_done: Callable[[int], None] | None = None) -> list[list[ContinuationScore]]:
        prompts = [req.context + cont for req in requests for cont in req.continuations]
        answers = iter(self.prompt_logprobs(prompts))
        out = []
        for req in requests:
            start = len(req.context)  # the continuation's first position
            scores = []
            for cont in req.continuations:
                answer = next(answers)
                scores.append(ContinuationScore(sum(answer.logprobs[start:]), all(answer.is_top[start:]), len(cont)))
            out.append(scores)
        if on_done is not None:
            on_done(len(requests))
        return out

    def chunks(self, chunks: list[list[int]]) -> list[perplexity.Sums]:
        sums = []
        for chunk, answer in zip(chunks, self.prompt_logprobs(chunks), strict=True):
            first = len(chunk) // 2  # as perplexity.score_chunks: tokens first+1 .. ctx-1 are scored
            nll = -torch.tensor(answer.logprobs[first + 1 :], dtype=torch.float64)
            sums.append(perplexity.sums_of(nll))
        return sums

    def prompt_logprobs(self, prompts: Sequence[list[int]]) -> list[PromptLogprobs]:
        """Each prompt's token log-probabilities: `prompts_per_request` prompts a request, and at least as many
        requests as may run at once, so that a small batch still spreads over them."""
        config = self.served.client.config
        per_request = max(1, min(config.prompts_per_request, math.ceil(len(prompts) / config.concurrency)))
        groups = [list(prompts[i : i + per_request]) for i in range(0, len(prompts), per_request)]
        model = {"model": self.served.name} if self.served.name is not None else {}
        bodies = [{**model, "prompt": group, **ECHO} for group in groups]
        out: list[PromptLogprobs] = []
        for group, answer in zip(groups, self.served.client.post_many("/v1/completions", bodies), strict=True):
            choices = _choices(answer, len(group), config.base_url)
            out += [read_prompt_logprobs(choice, len(p), config.base_url) for choice, p in zip(choices, group,
                                                                                                strict=True)]
            if not self._vocabulary_checked:  # once the server is known to echo the prompt
                self._vocabulary_checked = check_echoes(self.served, group, choices)
        return out


def check_echoes(served: ServedModel, prompts: Sequence[list[int]], choices: Sequence[dict[str, Any]]) -> bool:
    """check_vocabulary on each prompt's echo in turn, until one had tokens to compare (True) or none had."""
    return any(check_vocabulary(served, prompt, choice) for prompt, choice in zip(prompts, choices, strict=True))


def check_vocabulary(served: ServedModel, prompt: list[int], choice: dict[str, Any]) -> bool:
    """Refuse a server whose tokens are not those of -m's tokenizer, read from its echo of one prompt; False
    when that echo had no token to compare (the next prompt's is read then).

    The token ids kiln sends are made here by -m's tokenizer; a server with another vocabulary would read
    them as other text and score that, and the figures would look fine. Each echoed token is compared as
    text with the local one (its decoded text or its vocabulary entry; vLLM's "token_id:N" form by id).
    Tokens that decode to part of a character are left out, and so is a server that echoes no token texts.
    Weights are not checked: a server that runs another model with the same tokenizer passes."""
    logprobs = choice.get("logprobs")
    pieces = logprobs.get("tokens") if isinstance(logprobs, dict) else None
    if not isinstance(pieces, list):
        return True  # a server that names no tokens: nothing to compare, ever
    tokenizer = served.tokenizer
    compared = [(t, p) for t, p in zip(prompt, pieces, strict=False)
                if isinstance(p, str) and "\ufffd" not in tokenizer.decode([t], skip_special_tokens=False)]
    differ = [(t, p) for t, p in compared if not _same_piece(tokenizer, t, p)]
    if len(differ) * 2 > len(compared) > 0:
        token, piece = differ[0]
        raise EndpointError(
            f"{served.client.config.base_url} does not tokenize as -m {served.source.name} does ({len(differ)} of "
            f"{len(compared)} echoed tokens differ; token id {token} is {piece!r} there and "
            f"{tokenizer.decode([token], skip_special_tokens=False)!r} here): pass -m the model that the server serves")
    return bool(compared)


def _same_piece(tokenizer: Tokenizer, token: int, piece: str) -> bool:
    if piece == f"token_id:{token}":
        return True
    text = tokenizer.decode([token], skip_special_tokens=False)
    entry = tokenizer.hf.convert_ids_to_tokens(token)
    return piece in (text, entry) or piece.strip() == text.strip()


def _choices(answer: Any, num_prompts: int, url: str) -> list[dict[str, Any]]:
    """The answer's choices in prompt order, one per prompt (n = 1)."""
    choices = answer.get("choices") if isinstance(answer, dict) else None
    if not isinstance(choices, list) or len(choices) != num_prompts or not all(isinstance(c, dict) for c in choices):
        got = len(choices) if isinstance(choices, list) else "no"
        raise EndpointError(f"{url} answered {got} choices for {num_prompts} prompts; kiln needs a server that "
                            "takes a list of prompts on /v1/completions, as OpenAI's API does")
    return sorted(choices, key=lambda c: c.get("index", 0)) if all("index" in c for c in choices) else choices


def read_prompt_logprobs(choice: dict[str, Any], num_tokens: int, url: str) -> PromptLogprobs:
    """A choice's echoed log-probabilities of its prompt's `num_tokens` tokens; a server that left them out (no
    token_logprobs, nulls after the first token, fewer values than tokens) is a one-line EndpointError."""
    logprobs = choice.get("logprobs")
    values = logprobs.get("token_logprobs") if isinstance(logprobs, dict) else None
    if not isinstance(values, list) or len(values) < num_tokens or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in values[1:num_tokens]):
        raise EndpointError(NO_PROMPT_LOGPROBS.format(url=url))
    assert isinstance(logprobs, dict)
    tokens, tops = logprobs.get("tokens"), logprobs.get("top_logprobs")
    return PromptLogprobs([0.0] + [float(v) for v in values[1:num_tokens]],
                          [False] + [_is_top(tokens, tops, t) for t in range(1, num_tokens)])


def _is_top(tokens: Any, tops: Any, t: int) -> bool:
    """Whether token t is the best of its top_logprobs, compared as text (lm-evaluation-harness's is_greedy)."""
    top = tops[t] if isinstance(tops, list) and t < len(tops) else None
    if not isinstance(top, dict) or not top or not isinstance(tokens, list) or t >= len(tokens):
        return False
    return bool(max(top, key=lambda piece: top[piece]) == tokens[t])


class ApiGenerator:
    """The TextGenerator through a server: each item's messages to /v1/chat/completions, where the server applies
    the chat template as kiln eval does in-process; a model without one gets the same token ids as in-process on
    /v1/completions."""

    def __init__(self, served: ServedModel) -> None:
        self.served = served
        self._vocabulary_checked = False

    def answers(self, items: Sequence[GenItem], params: SamplingParams) -> list[str]:
        served = self.served
        common: dict[str, Any] = {"max_tokens": params.max_tokens, "temperature": params.temperature}
        if served.name is not None:
            common["model"] = served.name
        if params.stop:
            common["stop"] = list(params.stop)
        chat = served.tokenizer.has_chat_template
        if chat:
            path, bodies = "/v1/chat/completions", [{**common, "messages": it.messages} for it in items]
        else:
            prompts = [prompt_ids(served.tokenizer, it) for it in items]
            self._check_vocabulary(prompts)
            path, bodies = "/v1/completions", [{**common, "prompt": prompt} for prompt in prompts]
        return [_text(answer, chat, served.client.config.base_url)
                for answer in served.client.post_many(path, bodies)]

    def _check_vocabulary(self, prompts: list[list[int]]) -> None:
        """Token ids are -m's: a server with another vocabulary would answer a prompt other than the one asked,
        and the scores would look fine. One echo of a few prompts is read as the loglikelihood path reads its
        own; a server that echoes no token texts passes, as there."""
        if self._vocabulary_checked or not prompts:
            return
        served = self.served
        probe = prompts[: served.client.config.prompts_per_request]
        body = {**({"model": served.name} if served.name is not None else {}), "prompt": probe, **ECHO}
        answer = served.client.post_many("/v1/completions", [body])[0]
        self._vocabulary_checked = check_echoes(served, probe, _choices(answer, len(probe),
                                                                         served.client.config.base_url))


def _text(answer: Any, chat: bool, url: str) -> str:
    choices = answer.get("choices") if isinstance(answer, dict) else None
    first = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    message = first.get("message")
    text = (message.get("content") if isinstance(message, dict) else None) if chat else first.get("text")
    if text is None and chat and isinstance(message, dict):
        text = ""  # OpenAI's content is null for an empty answer
    if not isinstance(text, str):
        raise EndpointError(f"{url} answered without the choice's text; kiln needs an OpenAI-compatible server")
    return text
