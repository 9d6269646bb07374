"""The OpenAI-compatible endpoints: /v1/completions, /v1/chat/completions, /v1/models[/{id}], /v1/feedback, and
vLLM's /tokenize and /detokenize.

Order of work for a generation request, cheapest refusal first: admission to the bounded queue, the
per-key request rate, model lookup, guardrails on the input, tokenization, the context limit, the
per-key token rate; then the engine. Every way out of the engine (done, failed, client gone, deadline) frees
the request's slot and cache and gives the key back the reserved tokens it did not use.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.convertors import PathConvertor, register_url_convertor
from starlette.types import Receive, Scope, Send

from kiln.engine.engine import StepOutput
from kiln.engine.request import Request as EngineRequest
from kiln.engine.request import TokenLogprob
from kiln.engine.sampler import SamplingParams
from kiln.errors import KilnError
from kiln.serve.deploy import Deployment, Route
from kiln.serve.guardrails import StreamFilter, check
from kiln.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    FeedbackRequest,
    ResponseFormat,
    TokenizeRequest,
    error_body,
    error_code,
)
from kiln.serve.state import ServerState
from kiln.serve.tools import ParsedCall, ToolCallParser, split_tool_calls
from kiln.serve.worker import EngineStopped

router = APIRouter()
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions


class ApiError(Exception):
    """Raised inside a handler to answer with OpenAI's error envelope (mapped in app.py)."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), self.status, self.headers)


def timeout_error() -> ApiError:
    """A request that ran past its deadline; a stream's error chunk says the same."""
    return ApiError(504, "the request did not finish before its deadline; it was cancelled", "timeout_error",
                    code="timeout")


def engine_stopped_error(error: EngineStopped) -> ApiError:
    """The engine is gone: ours to fix (restart the server), not the client's; a stream's error chunk says the same."""
    return ApiError(503, f"{error}; the server must be restarted", "server_error", code="engine_stopped")


@dataclass
class Job:
    """One generation as the handler sees it."""

    state: ServerState
    deployment: Deployment
    key: str
    prompts: list[list[int]]  # one per choice (a prompt repeats for n > 1)
    params: list[SamplingParams]
    deadline: float | None
    request_id: str
    created: int = field(default_factory=lambda: int(time.time()))
    reserved_tokens: int = 0  # prompt + max_tokens of every choice
    is_reserved: bool = False  # reserved_tokens are taken and the unused part is not yet refunded
    # no max_tokens given (chat): each choice's budget, and so its reserve, is the rest of the model's context
    is_default_budget: bool = False
    started: dict[int, EngineRequest] = field(default_factory=dict)  # choice index -> its request, once it ran
    tool_names: tuple[str, ...] | None = None  # a chat with tools in effect: calls to these are read out of the text
    is_tool_forced: bool = False  # a forcing tool_choice held the output to calls
    max_tool_calls: int | None = None  # 1 with parallel_tool_calls false: later calls are dropped; None: no limit
    echo: bool = False  # a streamed completion whose choices each send their prompt first (echo)
    # the request as sent, for the request log (--log-requests), streamed or not
    body: CompletionRequest | ChatCompletionRequest | None = None
    n: int = 1  # choices per prompt: prompts[i * n : (i + 1) * n] are one prompt's

    @property
    def num_prompt_tokens(self) -> int:
        """Each prompt once however many choices (n) it has, as OpenAI counts it, and every prompt of a list, one
        sent twice included (as vLLM counts them): by position in the job, not by content."""
        return sum(len(p) for p in self.prompts[::self.n])


# --- admission -------------------------------------------------------------------------------------------


def _key(request: Request) -> str:
    key = request.scope.get("state", {}).get("key_id")
    return str(key) if key else (request.client.host if request.client else "anonymous")


def _admit(state: ServerState, request: Request) -> str:
    if not state.ready and not state.draining:
        raise ApiError(503, "the server is still loading its models; retry shortly", "unavailable_error",
                       code="loading", headers={"Retry-After": "2"})
    if state.draining:
        raise ApiError(503, "the server is shutting down; retry on another instance", "unavailable_error",
                       code="draining", headers={"Retry-After": "1"})
    if not state.admission.try_enter():
        state.metrics.rejections.labels("queue_full").inc()
        raise ApiError(429, f"the server is at its limit of {state.admission.limit} queued requests; retry later",
                       "overloaded_error", code="queue_full", headers={"Retry-After": "1"})
    key = _key(request)
    wait = state.limiter.take(key, requests=1)
    if wait is not None:
        state.admission.leave()
        state.metrics.rejections.labels("rate_limit_requests").inc()
        raise ApiError(429, f"request rate limit reached for this key; retry in {wait:.1f} s", "rate_limit_error",
                       code="rate_limit_requests", headers={"Retry-After": str(max(1, round(wait + 0.5)))})
    return key


def _deployment(state: ServerState, model: str | None) -> Deployment:
    deployment = state.router.acquire(model)
    if deployment is None:
        known = ", ".join(state.router.routes) or "none"
        raise ApiError(404, f"model {model!r} is not served here; models: {known}", param="model",
                       code="model_not_found")
    return deployment


def _guard(state: ServerState, deployment: Deployment, texts: Sequence[str],
           direction: Literal["input", "output"]) -> None:
    """Refuse with 400 (and count it) when a text breaks the model's input or output guardrail."""
    rules = state.guardrails_for(deployment.name)
    if rules is None:
        return
    what = "request" if direction == "input" else "response"
    for text in texts:
        violation = check(getattr(rules, direction), text)
        if violation is not None:
            state.metrics.guardrail_blocks.labels(deployment.name, direction, violation.kind).inc()
            # a blocked answer was still made by a version: the header names it, as on every answer
            version = {"X-Kiln-Model-Version": deployment.version} if direction == "output" else None
            raise ApiError(400, f"the {what} was blocked by the {direction} guardrail ({violation.kind}: "
                           f"{violation.detail})", "guardrail_error", code=f"{direction}_blocked", headers=version)


def _max_tokens(state: ServerState, deployment: Deployment, prompt: list[int], asked: int | None,
                default: int | None, prompt_param: str, asked_param: str = "max_tokens") -> int:
    """The request's token budget; a prompt that leaves no room in the context or the KV cache is a 400 naming
    `prompt_param` (OpenAI's code and param for the context), whether or not max_tokens was given. A max_tokens
    (`asked`, sent as `asked_param`) the prompt leaves no room for is a 400 naming it (the engine would end the
    answer early, "length", without a word); without one, the endpoint's `default` (None: the whole context) is
    cut at the end of the context, as the client asked for no number that could be refused."""
    context = deployment.loaded.spec.max_position
    if len(prompt) >= context:  # at least one token must be generated
        raise ApiError(400, f"the prompt has {len(prompt)} tokens, which leaves no room in the model's context of "
                       f"{context} tokens; shorten the prompt", param=prompt_param, code="context_length_exceeded")
    _check_kv_budget(deployment, prompt, prompt_param)
    room = context - len(prompt)
    if asked is None:
        return room if default is None else min(default, room)
    if asked > room:
        raise ApiError(400, f"the prompt has {len(prompt)} tokens and {asked_param} is {asked}, "
                       f"{len(prompt) + asked} in all, more than the model's context of {context} tokens; shorten "
                       f"the prompt or lower {asked_param} to {room} or less", param=asked_param,
                       code="context_length_exceeded")
    return asked


def _check_kv_budget(deployment: Deployment, prompt: list[int], prompt_param: str) -> None:
    """Refuse, as the engine would, a prompt that the whole KV cache cannot hold with one generated token: here,
    before a token is reserved or a stream has begun (a stream's 200 would already be sent when the engine says no)."""
    capacity = deployment.worker.kv_capacity_tokens
    if len(prompt) + 1 > capacity:
        raise ApiError(400, f"the prompt has {len(prompt)} tokens, which with one generated token do not fit the KV "
                       f"cache budget of {capacity} tokens; shorten the prompt or raise --kv-budget-mb",
                       param=prompt_param, code="kv_budget_exceeded")


def _check_token_ids(dep: Deployment, ids: Iterable[int], param: str) -> None:
    """Token ids a request names (logit_bias's keys, stop_token_ids, /detokenize's tokens) must be the model's:
    a 400 naming `param` and the first id outside the vocabulary (OpenAI's logit_bias check)."""
    vocab = dep.loaded.spec.vocab_size
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise ApiError(400, f"{param} names token {bad}, outside the model's vocabulary [0, {vocab}); use ids "
                       "from its tokenizer (/tokenize)", param=param, code="invalid_token")


def _check_sampling(dep: Deployment, body: CompletionRequest | ChatCompletionRequest, budgets: Sequence[int]) -> None:
    """What the schema cannot check without the model and the prompt: token ids inside the vocabulary, and a
    min_tokens that every choice's budget (max_tokens, or its default) leaves room for."""
    _check_token_ids(dep, body.token_biases(), "logit_bias")
    _check_token_ids(dep, body.stop_token_ids or (), "stop_token_ids")
    budget = min(budgets)
    asked, asked_param = body.token_limit()
    if body.min_tokens > budget:
        limit = (f"{asked_param} ({asked})" if asked is not None else
                 f"the {budget} tokens this request may generate without max_tokens")
        raise ApiError(400, f"min_tokens is {body.min_tokens}, more than {limit}; lower min_tokens or raise "
                       f"{asked_param}", param="min_tokens", code="invalid_value")  # the schema's code for its range


def _grammar(response_format: ResponseFormat | None) -> str | None:
    """The grammar that holds every choice to response_format's JSON (None for plain text); a schema that
    cannot be compiled is a 400 naming response_format, before anything is reserved."""
    schema = response_format.schema_or_none() if response_format else None
    if schema is None:
        return None
    from kiln.engine.grammar import GrammarError, json_grammar

    try:
        return json_grammar(schema)
    except GrammarError as exc:
        raise ApiError(400, str(exc), param="response_format", code="invalid_schema") from None


def _chat_grammar(body: ChatCompletionRequest) -> str | None:
    """The grammar that holds every choice to tool calls (a forcing tool_choice), else response_format's; a tool
    whose parameters schema cannot be compiled is a 400 naming it, whatever the tool_choice (but none)."""
    if body.tool_mode() == "none":
        return _grammar(body.response_format)
    from kiln.engine.grammar import GrammarError, json_grammar, tool_call_grammar

    for i, tool in enumerate(body.tools or ()):
        try:
            json_grammar(tool.function.parameters or {"type": "object"})
        except GrammarError as exc:
            raise ApiError(400, f"tool {tool.function.name!r}: {exc}", param=f"tools.{i}.function.parameters",
                           code="invalid_schema") from None
    forced = body.forced_tools()
    if not forced:
        return _grammar(body.response_format)
    try:
        return tool_call_grammar([(t.function.name, t.function.parameters) for t in forced],
                                 body.allows_several_calls())
    except GrammarError as exc:
        raise ApiError(400, str(exc), param="tools", code="invalid_schema") from None


def _reserve_tokens(job: Job) -> None:
    state = job.state
    if state.limiter.never_fits(job.reserved_tokens):
        # 429, as OpenAI answers a request over its tokens-per-minute limit ("Request too large ... on tokens per
        # min"): the limit refused it. But no wait helps, so no Retry-After, and x-should-retry: false keeps the
        # openai client from sending it again; a code of its own tells it from rate_limit_tokens, which a wait ends
        state.metrics.rejections.labels("tokens_over_limit").inc()
        choices = len(job.params)
        budget = "the rest of the context, as no max_tokens was given" if job.is_default_budget else "max_tokens"
        raise ApiError(429, f"the request needs {job.reserved_tokens} tokens (prompt and {budget}"
                       f"{f' of each of its {choices} choices' if choices > 1 else ''}) but this key's limit is "
                       f"{state.limiter.tpm:.0f} tokens per minute; {_over_limit_fix(job)}", "rate_limit_error",
                       code="tokens_over_limit", headers={"x-should-retry": "false"})
    wait = state.limiter.take(job.key, tokens=job.reserved_tokens)
    if wait is not None:
        state.metrics.rejections.labels("rate_limit_tokens").inc()
        raise ApiError(429, f"token rate limit reached for this key; retry in {wait:.1f} s", "rate_limit_error",
                       code="rate_limit_tokens", headers={"Retry-After": str(max(1, round(wait + 0.5)))})
    job.is_reserved = True


def _over_limit_fix(job: Job) -> str:
    """What makes a request over the key's whole token limit fit. Without max_tokens, a chat choice reserves the
    rest of the context, so the fix is to pass one: "lower max_tokens" named a field the client never sent."""
    if not job.is_default_budget:
        return "lower max_tokens or n"
    assert job.state.limiter.tpm is not None  # only a limit makes a request too large
    fits = int(job.state.limiter.tpm) // len(job.params) - max(len(p) for p in job.prompts)
    if fits < 1:
        return "shorten the prompt or lower n"
    return f"pass max_tokens (or max_completion_tokens) of at most {fits}, or lower n"


def _refund(job: Job | None) -> None:
    """Give the key back the part of its token reserve that was not used: the reserve less the prompt and generated
    tokens of each choice that ran (none, if none ran). Called on every way out, so a request that fails, times out
    or is cancelled does not keep its whole reserve; refunds once however often it is called. A choice left running
    (a client gone, a deadline) may still get a token before its abort reaches the engine: its count is read on the
    engine thread once it is aborted, so the tokens generated are charged, no more and no fewer."""
    if job is None or not job.is_reserved:
        return
    job.is_reserved = False
    started = list(job.started.values())

    def give_back() -> None:
        used = sum(len(r.prompt) + len(r.output) for r in started)
        job.state.limiter.refund(job.key, job.reserved_tokens - used)

    running = [r.request_id for r in started if not r.status.finished]
    if running:
        job.deployment.worker.after_end(running, give_back)
    else:
        give_back()


# --- running -------------------------------------------------------------------------------------------


async def _run_one(job: Job, index: int) -> AsyncIterator[StepOutput]:
    dep = job.deployment
    async for out in dep.worker.stream(job.prompts[index], job.params[index], f"{job.request_id}-{index}",
                                       job.deadline):
        job.started[index] = out.request  # what ran counts against the token reserve (see _refund)
        yield out


def _record(job: Job, outs: Sequence[StepOutput]) -> None:
    metrics, dep = job.state.metrics, job.deployment
    labels = (dep.name, dep.version)
    for out in outs:
        r = out.request
        metrics.generations.labels(*labels, r.finish_reason or "stop").inc()
        metrics.tokens_in.labels(*labels).inc(len(r.prompt))
        metrics.tokens_out.labels(*labels).inc(len(r.output))
        if r.first_token_at is not None:
            metrics.ttft.labels(*labels).observe(r.first_token_at - r.arrival)
            if r.finished_at is not None and len(r.output) > 1:
                metrics.tpot.labels(*labels).observe((r.finished_at - r.first_token_at) / (len(r.output) - 1))
        if r.finished_at is not None:
            metrics.e2e.labels(*labels).observe(r.finished_at - r.arrival)
    _refund(job)


async def _collect(job: Job, request: Request, count: int) -> list[StepOutput]:
    """Run `count` generations to the end; a client that disconnects cancels them all."""

    async def one(i: int) -> StepOutput:
        last = None
        async for out in _run_one(job, i):
            last = out
        assert last is not None
        return last

    tasks = [asyncio.create_task(one(i)) for i in range(count)]
    watcher = asyncio.create_task(_wait_disconnect(request))
    try:
        pending: set[asyncio.Task[Any]] = {*tasks, watcher}
        while not all(t.done() for t in tasks):
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if watcher in done:
                job.state.metrics.disconnects.inc()
                raise asyncio.CancelledError
            for task in done:
                task.result()  # re-raise a failure (a deadline, an engine error) at once
        return [t.result() for t in tasks]
    except TimeoutError:
        job.state.metrics.timeouts.inc()
        raise timeout_error() from None
    finally:
        for t in (*tasks, watcher):
            t.cancel()
        await asyncio.gather(*tasks, watcher, return_exceptions=True)


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


# --- logprobs in OpenAI's layout -----------------------------------------------------------------------


def _piece(tokenizer: Any, token: int) -> str:
    return str(tokenizer.decode([token], skip_special_tokens=False))


class TextOffsets:
    """Where each token's text begins in the text that its tokens decode to after `context`, as that text grows: the
    length of the part of the text that the tokens before it complete. A token that continues a character begun
    before it (byte-level BPE splits multi-byte characters, and each piece alone decodes to U+FFFD) gets that
    character's offset, so every offset indexes the text; a genuine U+FFFD is a whole character. Tokens are decoded
    in windows that start where the text so far is whole, after one token before them (SentencePiece drops a
    leading space otherwise), so the work grows with the number of tokens, not its square.

    A token's offset is settled once the text reaches past the text of the tokens before it (or is final: a stop
    string may cut it short of its tokens, whose offsets then end at its end), and never changes after: a stream,
    whose text comes in pieces and may be held back, gets the offsets of the whole text read at once."""

    def __init__(self, tokenizer: Any, context: Sequence[int], skip_special_tokens: bool) -> None:
        self.tokenizer, self.skip_special_tokens = tokenizer, skip_special_tokens
        self.ids = [*context[-1:]]
        self.first = len(self.ids)  # where the tokens begin in ids
        self.window, self.base = self.first, 0  # the window's first token, and where its text begins in the text
        self.lead = self._lead_of(self.window)
        self.offsets: list[int] = []

    def _decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=self.skip_special_tokens))

    def _lead_of(self, window: int) -> str:
        # the token before the window, alone: what its decode with the window begins with
        return self._decode(self.ids[window - 1:window]) if window else ""

    def add(self, tokens: Sequence[int]) -> None:
        self.ids += tokens

    def settle(self, text: str, final: bool) -> list[int]:
        """The offsets that `text`, the tokens' text so far (all of it when `final`), settles beyond those before."""
        num_settled = len(self.offsets)
        for i in range(self.first + num_settled, len(self.ids)):
            done = self._decode(self.ids[max(self.window - 1, 0):i])[len(self.lead):]  # the text of ids[window:i]
            if not final and self.base + len(done) > len(text):
                break  # the text of the tokens before this one has not all come yet
            matched = len(os.path.commonprefix([done, text[self.base:self.base + len(done)]]))
            self.offsets.append(max(self.base + matched, self.offsets[-1] if self.offsets else 0))
            if matched == len(done) and i > self.window:  # no character is left open: the next window starts here
                self.window, self.base, self.lead = i, self.base + matched, self._lead_of(i)
        return self.offsets[num_settled:]


def completion_logprobs(tokenizer: Any, tokens: Sequence[int], values: Sequence[TokenLogprob | None],
                        text: str | None = None, offset: int = 0, context: Sequence[int] = (),
                        skip_special_tokens: bool = True) -> dict[str, Any]:
    """OpenAI's completions logprobs of `tokens`. Their text offsets index `text` (what they decode to after
    `context`, by default), which begins at `offset` in the returned text."""
    if text is None:
        lead = tokenizer.decode(list(context[-1:]), skip_special_tokens=skip_special_tokens)
        text = str(tokenizer.decode([*context[-1:], *tokens], skip_special_tokens=skip_special_tokens))[len(lead):]
    offsets = TextOffsets(tokenizer, context, skip_special_tokens)
    offsets.add(tokens)
    return _logprob_lists(tokenizer, tokens, values, [offset + o for o in offsets.settle(text, final=True)])


def _logprob_lists(tokenizer: Any, tokens: Sequence[int], values: Sequence[TokenLogprob | None],
                   offsets: Sequence[int]) -> dict[str, Any]:
    """OpenAI's completions logprobs of `tokens`, whose text begins at `offsets` in the returned text."""
    tops: list[dict[str, float] | None] = []
    for v in values:
        if v is None:
            tops.append(None)
            continue
        top: dict[str, float] = {}
        for token, lp in v.top:
            top.setdefault(_piece(tokenizer, token), lp)
        tops.append(top)
    pieces = [_piece(tokenizer, t) for t in tokens]
    return {"tokens": pieces, "token_logprobs": [None if v is None else v.logprob for v in values],
            "top_logprobs": tops, "text_offset": list(offsets)}


def chat_logprobs(tokenizer: Any, values: Sequence[TokenLogprob]) -> dict[str, Any]:
    content = []
    for v in values:
        piece = _piece(tokenizer, v.token)
        content.append({"token": piece, "logprob": v.logprob, "bytes": list(piece.encode()),
                        "top_logprobs": [{"token": _piece(tokenizer, t), "logprob": lp,
                                          "bytes": list(_piece(tokenizer, t).encode())} for t, lp in v.top]})
    return {"content": content}


def _usage(job: Job, outs: Sequence[StepOutput]) -> dict[str, int]:
    prompt = job.num_prompt_tokens
    completion = sum(len(o.request.output) for o in outs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


# --- endpoints ------------------------------------------------------------------------------------------


def _model_card(state: ServerState, name: str, route: Route) -> dict[str, Any]:
    canary = route.canary
    return {"id": name, "object": "model", "created": state.started, "owned_by": "kiln",
            "version": route.live.version, "runtime": route.live.runtime,
            **({"canary": {"version": canary.version, "share": route.share, "runtime": canary.runtime}}
               if canary else {})}


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    state: ServerState = request.app.state.kiln
    return {"object": "list", "data": [_model_card(state, name, route)
                                       for name, route in list(state.router.routes.items())]}


class _ModelIdConvertor(PathConvertor):
    """A model name in a URL: it may hold slashes (org/name, out/int8), as starlette's path, but is never empty,
    so /v1/models/ still redirects to the list."""

    regex = ".+"


register_url_convertor("model_id", _ModelIdConvertor())


@router.get("/v1/models/{model_id:model_id}")
async def retrieve_model(model_id: str, request: Request) -> dict[str, Any]:
    state: ServerState = request.app.state.kiln
    route = state.router.routes.get(model_id)
    if route is None:
        known = ", ".join(state.router.routes) or "none"
        raise ApiError(404, f"model {model_id!r} is not served here; models: {known}", param="model",
                       code="model_not_found")
    return _model_card(state, model_id, route)


def _sse(data: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(data)}\n\n".encode()


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Any:
    state: ServerState = request.app.state.kiln
    key = _admit(state, request)
    dep: Deployment | None = None
    job: Job | None = None
    try:
        dep = _deployment(state, body.model)
        tok = dep.loaded.tokenizer
        raw_prompts = body.prompts()
        _guard(state, dep, [p for p in raw_prompts if isinstance(p, str)], "input")
        prompts = [_prompt_ids(dep, p) for p in raw_prompts]
        budgets = [_max_tokens(state, dep, p, body.max_tokens, DEFAULT_COMPLETION_TOKENS, "prompt") for p in prompts]
        _check_sampling(dep, body, budgets)
        grammar = await asyncio.to_thread(_grammar, body.response_format)  # may take a second: off the loop
        per_choice = [prompts[i // body.n] for i in range(len(prompts) * body.n)]
        params = [body.sampling(budgets[i // body.n], body.logprobs, seed_offset=i, grammar=grammar)
                  for i in range(len(per_choice))]
        if body.echo and body.logprobs is not None:  # the first choice of each prompt scores it as it prefills
            # (streamed, every choice: each sends its echo as it starts)
            params = [replace(p, prompt_logprobs=body.logprobs) if body.stream or i % body.n == 0 else p
                      for i, p in enumerate(params)]
        job = _job(state, dep, key, per_choice, params)
        job.echo, job.n, job.body = body.echo, body.n, body
        _reserve_tokens(job)
        if body.stream:
            return _stream_response(job, request, body.stream_options is not None and
                                    body.stream_options.include_usage, chat=False)
        outs = await _collect(job, request, len(job.params))
        try:
            _guard(state, dep, [o.request.text for o in outs], "output")  # as chat: the generated text, not the echo
            echoes = [_echo(tok, outs[i * body.n].request, body.logprobs) if body.echo else None
                      for i in range(len(prompts))]
        finally:
            _record(job, outs)
        choices = []
        for i, out in enumerate(outs):
            r = out.request
            echo = echoes[i // body.n]
            text = (echo[0] if echo else "") + r.text
            choice: dict[str, Any] = {"index": i, "text": text, "finish_reason": r.finish_reason, "logprobs": None}
            if body.logprobs is not None:
                generated = completion_logprobs(tok, [v.token for v in r.logprobs], r.logprobs, r.text,
                                                offset=len(echo[0]) if echo else 0, context=r.prompt,
                                                skip_special_tokens=body.skip_special_tokens)
                choice["logprobs"] = _join_logprobs(echo[1], generated) if echo else generated
            choices.append(choice)
        state.log_response(job, [c["text"] for c in choices], outs)
        return _with_version(JSONResponse({"id": job.request_id, "object": "text_completion", "created": job.created,
                                           "model": dep.name, "choices": choices, "usage": _usage(job, outs)}), dep)
    except BaseException:
        if body.stream:  # the stream never started: its generator would have released these
            _release(state, dep, job)
        raise
    finally:
        if not body.stream:
            _release(state, dep, job)


def _join_logprobs(echo: dict[str, Any] | None, generated: dict[str, Any]) -> dict[str, Any]:
    if echo is None:
        return generated
    return {k: echo[k] + generated[k] for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}


def _echo(tok: Any, request: EngineRequest, logprobs: int | None) -> tuple[str, dict[str, Any] | None]:
    """The echoed prompt's text, and its tokens' log-probabilities that the engine kept as it prefilled."""
    text = tok.decode(request.prompt, skip_special_tokens=False)
    if logprobs is None:
        return text, None
    # a request that ended before its whole prompt was scored (aborted at the drain deadline, while queued or part-way
    # through its prefill) has fewer values: the rest are null, so that every list still has one entry per token
    values = [*request.prompt_logprobs, *[None] * (len(request.prompt) - len(request.prompt_logprobs))]
    return text, completion_logprobs(tok, request.prompt, values, text, skip_special_tokens=False)


def _prompt_ids(dep: Deployment, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        return dep.loaded.tokenizer.encode(prompt)
    vocab = dep.loaded.spec.vocab_size
    bad = [t for t in prompt if not 0 <= t < vocab]
    if bad:
        raise ApiError(400, f"token id {bad[0]} is outside the vocabulary [0, {vocab})", param="prompt",
                       code="invalid_token")
    return list(prompt)


def _job(state: ServerState, dep: Deployment, key: str, prompts: list[list[int]],
         params: list[SamplingParams]) -> Job:
    deadline = time.monotonic() + state.config.request_timeout_s if state.config.request_timeout_s else None
    reserved = sum(len(prompt) + p.max_tokens for prompt, p in zip(prompts, params, strict=True))
    return Job(state, dep, key, prompts, params, deadline, f"cmpl-{uuid.uuid4().hex[:24]}", reserved_tokens=reserved)


def _with_version(response: Any, dep: Deployment) -> Any:
    response.headers["X-Kiln-Model-Version"] = dep.version
    return response


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    state: ServerState = request.app.state.kiln
    key = _admit(state, request)
    dep: Deployment | None = None
    job: Job | None = None
    try:
        dep = _deployment(state, body.model)
        messages = body.chat_messages()
        tools = [t.model_dump(exclude_none=True) for t in body.tools or ()] if body.tool_mode() != "none" else None
        _guard(state, dep, _message_texts(messages, tools), "input")
        prompt = dep.loaded.tokenizer.encode_chat(
            messages, fix="send a plain-text prompt to /v1/completions instead", tools=tools)
        asked, asked_param = body.token_limit()
        budget = _max_tokens(state, dep, prompt, asked, None, "messages", asked_param)
        _check_sampling(dep, body, [budget])
        top = (body.top_logprobs or 0) if body.logprobs else None
        grammar = await asyncio.to_thread(_chat_grammar, body)  # may take a second: off the loop
        job = _job(state, dep, key, [prompt] * body.n, [body.sampling(budget, top, seed_offset=i, grammar=grammar)
                                                         for i in range(body.n)])
        job.request_id = "chatcmpl-" + job.request_id.split("-", 1)[1]
        job.n, job.body = body.n, body
        job.tool_names = tuple(t["function"]["name"] for t in tools) if tools else None
        job.is_tool_forced = body.tool_mode() == "forced"
        job.max_tool_calls = None if body.parallel_tool_calls else 1
        job.is_default_budget = asked is None
        _reserve_tokens(job)
        if body.stream:
            return _stream_response(job, request, body.stream_options is not None and
                                    body.stream_options.include_usage, chat=True)
        outs = await _collect(job, request, body.n)
        _record(job, outs)
        # with tools in effect, each choice's text read once into its content and calls
        splits = [split_tool_calls(o.request.text, job.tool_names, job.is_tool_forced, job.max_tool_calls)
                  if job.tool_names is not None else None for o in outs]
        _guard(state, dep, [text for o, split in zip(outs, splits, strict=True)
                            for text in _output_texts(o.request.text, split)], "output")
        choices: list[dict[str, Any]] = [{"index": i, **_chat_message(o, split),
                    "logprobs": chat_logprobs(dep.loaded.tokenizer, o.request.logprobs) if body.logprobs else None}
                   for i, (o, split) in enumerate(zip(outs, splits, strict=True))]
        state.log_response(job, [o.request.text for o in outs], outs)
        return _with_version(JSONResponse({"id": job.request_id, "object": "chat.completion", "created": job.created,
                                           "model": dep.name, "choices": choices, "usage": _usage(job, outs)}), dep)
    except BaseException:
        if body.stream:
            _release(state, dep, job)
        raise
    finally:
        if not body.stream:
            _release(state, dep, job)


def _message_texts(messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None) -> list[str]:
    """What the input guardrail reads of a chat: all that goes into the prompt, each message's text, the arguments
    of each call in it and the tools offered (their descriptions and schemas), as JSON without \\u escapes so that a
    blocked word reads as the model reads it."""
    texts = [m["content"] for m in messages if m["content"]]
    for m in messages:
        texts += [json.dumps(c["function"]["arguments"], ensure_ascii=False) for c in m.get("tool_calls", ())]
    return texts + [json.dumps(t, ensure_ascii=False) for t in tools or ()]


ToolSplit = tuple[str | None, list[ParsedCall]]  # a chat choice's content and calls (tools.split_tool_calls)


def _output_texts(text: str, split: ToolSplit | None) -> list[str]:
    """What the output guardrail reads of a chat choice: its text and, with tools, each call's arguments as they are
    returned (decoded: the model may spell a blocked word with JSON escapes)."""
    return [text] if split is None else [text, *(call.arguments for call in split[1])]


def _chat_message(out: StepOutput, split: ToolSplit | None) -> dict[str, Any]:
    """A finished choice's message and finish_reason: with tools in effect (`split`), the calls read out of its
    text (then the text around them, if any, is the content, and a choice that stopped after them finished with
    "tool_calls")."""
    r = out.request
    if split is None:
        return {"message": {"role": "assistant", "content": r.text}, "finish_reason": r.finish_reason}
    content, calls = split
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = [c.to_dict() for c in calls]
    return {"message": message, "finish_reason": _tool_finish(r.finish_reason, len(calls))}


def _tool_finish(finish_reason: str | None, num_calls: int) -> str | None:
    # a choice cut short (length, a guardrail) says so, calls or not
    return "tool_calls" if num_calls and finish_reason == "stop" else finish_reason


def _release(state: ServerState, dep: Deployment | None, job: Job | None) -> None:
    """Free what a request holds: its queue slot, its deployment, and its token reserve's unused part."""
    _refund(job)
    state.admission.leave()
    if dep is not None:
        dep.leave()


def _stream_error(error: BaseException) -> dict[str, Any]:
    """The error chunk of a stream that cannot go on (its 200 is already sent), typed and coded as the error body
    of the same cause without a stream: a deadline, a stopped engine, a refusal of the engine's (a KilnError: its
    one-line message says what to change, the client's to fix); anything else is ours."""
    if isinstance(error, TimeoutError):
        return timeout_error().body()
    if isinstance(error, EngineStopped):
        return engine_stopped_error(error).body()
    if isinstance(error, KilnError):
        return error_body(str(error), "invalid_request_error", code=error_code(error))
    return error_body("generation failed", "server_error")


def _chat_deltas(text: str, calls: Sequence[ParsedCall], num_sent: int) -> list[dict[str, Any]]:
    """A streamed chat choice's deltas for one step: its text, then one per call completed (each whole, indexed
    after the `num_sent` calls the choice sent before); an empty text only when there is nothing else."""
    deltas: list[dict[str, Any]] = [{"content": text}] if text or not calls else []
    return deltas + [{"tool_calls": [call.to_dict(index=num_sent + k)]} for k, call in enumerate(calls)]


def _stream_filters(state: ServerState, dep: Deployment, count: int) -> list[StreamFilter | None]:
    """One output filter per streamed choice ([] when the model has no output rules): the whole-response check
    of the non-streamed path, applied as the text grows (guardrails.StreamFilter)."""
    rules = state.guardrails_for(dep.name)
    if rules is None or not rules.output.is_active:
        return []
    return [StreamFilter(rules.output) for _ in range(count)]


def _step_logprobs(out: StepOutput, num_read: int) -> list[TokenLogprob]:
    """The logprobs of the tokens of one step's output, `num_read` of its request's logprobs having been read before.
    The request itself may have grown since (the engine thread runs ahead of the handler), so its newest logprobs
    are not this step's: a step's are the next len(out.tokens) after those read, and a finished request's are all
    it has left (it grows no more, and the end-of-sequence token that ends it has a logprob but no output token)."""
    logprobs = out.request.logprobs
    return logprobs[num_read:] if out.finished else logprobs[num_read:num_read + len(out.tokens)]


class _StreamedLogprobs:
    """A streamed completion choice's logprobs. Each token's goes out with the chunk whose text its text begins in
    (all that are left, with the last chunk), with the offset it has in the whole text, as without a stream: read
    from all the text the engine released, which may run ahead of the text sent (a guardrail holds some back) and
    may end short of its tokens (a stop string cuts it)."""

    def __init__(self, tokenizer: Any, prompt: Sequence[int], skip_special_tokens: bool) -> None:
        self.tokenizer = tokenizer
        self.offsets = TextOffsets(tokenizer, prompt, skip_special_tokens)
        self.text = ""  # the text the engine released so far
        self.unsent: list[TokenLogprob] = []
        self.num_sent = 0

    def add(self, values: Sequence[TokenLogprob], text: str, finished: bool) -> None:
        """One step's logprobs and released text (the last, when `finished`)."""
        self.unsent += values
        self.offsets.add([v.token for v in values])
        self.text += text
        self.offsets.settle(self.text, finished)

    def take(self, num_chars: int, finished: bool) -> dict[str, Any]:
        """The lists of the tokens whose text begins in the first `num_chars` characters sent (every one left, when
        the choice is `finished`)."""
        settled = self.offsets.offsets[self.num_sent:]
        count = len(settled) if finished else sum(1 for offset in settled if offset < num_chars)
        values, self.unsent = self.unsent[:count], self.unsent[count:]
        self.num_sent += count
        return _logprob_lists(self.tokenizer, [v.token for v in values], values, settled[:count])

    def drop(self) -> None:
        """The choice was stopped (a guardrail): what is left is never sent."""
        self.unsent = []


class _EventStream(StreamingResponse):
    """A stream of SSE events that closes its generator however the response ends. Starlette leaves the generator
    suspended at its yield when the client leaves during a send; its cleanup (abort the generations, free the slot,
    refund the reserve) would then wait for the garbage collector."""

    def __init__(self, events: AsyncGenerator[bytes, None]) -> None:
        super().__init__(events, media_type="text/event-stream")
        self.events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.events.aclose()  # a no-op when the stream ran to its end


def _stream_response(job: Job, request: Request, include_usage: bool, chat: bool) -> StreamingResponse:
    return _with_version(_EventStream(_sse_events(job, request, include_usage, chat)), job.deployment)


async def _sse_events(job: Job, request: Request, include_usage: bool, chat: bool) -> AsyncGenerator[bytes, None]:
    """SSE chunks of every choice as they come; always ends with `data: [DONE]` (an error chunk first if failed)."""
    state, dep = job.state, job.deployment
    tok = dep.loaded.tokenizer
    kind = "chat.completion.chunk" if chat else "text_completion"
    base = {"id": job.request_id, "object": kind, "created": job.created, "model": dep.name}
    queue: asyncio.Queue[tuple[int, StepOutput] | tuple[int, BaseException] | None] = asyncio.Queue()
    finished: list[StepOutput] = []

    async def pump(i: int) -> None:
        try:
            async for out in _run_one(job, i):
                await queue.put((i, out))
        except BaseException as exc:  # noqa: BLE001 - reported to the client as an error chunk
            await queue.put((i, exc))
            if isinstance(exc, asyncio.CancelledError):
                raise

    tasks = [asyncio.create_task(pump(i)) for i in range(len(job.params))]
    filters = _stream_filters(state, dep, len(tasks))
    held: list[list[TokenLogprob]] = [[] for _ in tasks]  # a chat's logprobs of tokens whose text is not sent yet
    num_read = [0 for _ in tasks]  # logprobs of each choice's request read so far
    # a completion's logprobs, sent with the text they belong to, with offsets into its whole text
    scored = [_StreamedLogprobs(tok, job.prompts[i], job.params[i].skip_special_tokens) for i in range(len(tasks))]
    sent: list[str] = ["" for _ in tasks]
    texts: list[str] = []  # per finished choice, in finishing order
    # with tools in effect, each choice's calls are read out of its text as it grows (content held back meanwhile)
    parsers = ([ToolCallParser(job.tool_names, job.is_tool_forced, job.max_tool_calls) for _ in tasks]
               if job.tool_names is not None else [])
    num_calls = [0 for _ in tasks]
    echoed_choices: set[int] = set()
    echoed_chars = [0 for _ in tasks]  # the length of each choice's echoed prompt, which its offsets count from
    try:
        if chat:
            for i in range(len(job.params)):
                yield _sse({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                 "finish_reason": None}]})
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()  # type: ignore[misc]
            if filters and filters[i] is None:
                continue  # a choice the guardrail stopped: what its cancelled task still reports is dropped
            if isinstance(item, BaseException):
                if isinstance(item, TimeoutError):
                    state.metrics.timeouts.inc()
                yield _sse(_stream_error(item))
                break
            out = item
            if job.echo and i not in echoed_choices:  # its first output: the prompt goes first, as without a stream
                echoed_choices.add(i)
                sent[i], echoed = _echo(tok, out.request, job.params[i].logprobs)
                echoed_chars[i] = len(sent[i])
                yield _sse({**base, "choices": [{"index": i, "text": sent[i], "finish_reason": None,
                                                 **({"logprobs": echoed} if echoed else {})}]})
            text, finish = out.text, out.request.finish_reason if out.finished else None
            if job.params[i].logprobs is not None:
                step_logprobs = _step_logprobs(out, num_read[i])
                num_read[i] += len(step_logprobs)
                if chat:
                    held[i] += step_logprobs
                else:
                    scored[i].add(step_logprobs, out.text, out.finished)
            if filters:
                text, violation = filters[i].feed(out.text, out.finished)  # type: ignore[union-attr]
                if violation is not None:  # this choice ends here; the others go on
                    state.metrics.guardrail_blocks.labels(dep.name, "output", violation.kind).inc()
                    filters[i], finish, text, held[i] = None, "content_filter", "", []
                    scored[i].drop()
                    tasks[i].cancel()
            calls: list[ParsedCall] = []
            if parsers and finish != "content_filter":  # what a parser holds back when a guardrail stops is not sent
                text, calls = parsers[i].feed(text)
                if finish:
                    text += parsers[i].finish()[0]
                    finish = _tool_finish(finish, num_calls[i] + len(calls))
                # each call's arguments as they go out, decoded, as without a stream
                stream_filter = filters[i] if filters else None
                rules = stream_filter.rules if stream_filter is not None else None
                violation = next((v for c in calls if rules and (v := check(rules, c.arguments))), None)
                if violation is not None:
                    state.metrics.guardrail_blocks.labels(dep.name, "output", violation.kind).inc()
                    filters[i], finish, text, calls, held[i] = None, "content_filter", "", [], []
                    scored[i].drop()
                    tasks[i].cancel()
            if text or finish or calls:
                deltas = _chat_deltas(text, calls, num_calls[i]) if chat else [{}]
                num_calls[i] += len(calls)
                for j, delta in enumerate(deltas):  # the last carries the finish_reason
                    choice: dict[str, Any] = ({"index": i, "delta": delta} if chat else {"index": i, "text": text})
                    choice["finish_reason"] = finish if j == len(deltas) - 1 else None
                    if chat and held[i]:
                        choice["logprobs"], held[i] = chat_logprobs(tok, held[i]), []
                    elif not chat and job.params[i].logprobs is not None:
                        lists = scored[i].take(len(sent[i]) + len(text) - echoed_chars[i], finish is not None)
                        if lists["tokens"]:
                            # offsets index the choice's whole text, as without a stream: its echo comes first
                            choice["logprobs"] = {**lists, "text_offset": [echoed_chars[i] + o
                                                                           for o in lists["text_offset"]]}
                    yield _sse({**base, "choices": [choice]})
                sent[i] += text
            if finish:
                finished.append(out)
                texts.append(sent[i])  # what the client got: short of the text a guardrail stopped
                remaining -= 1
        if include_usage and finished:
            yield _sse({**base, "choices": [], "usage": _usage(job, finished)})
        yield b"data: [DONE]\n\n"
        _record(job, finished)
        state.log_response(job, texts, finished)
    except asyncio.CancelledError:
        state.metrics.disconnects.inc()
        raise
    finally:
        for t in tasks:
            t.cancel()
        try:
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:  # a client gone mid-stream cancels this task again at each await (anyio's cancel scope)
            _release(state, dep, job)


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> Any:
    """vLLM's /tokenize: the prompt's token ids as a completion or chat completion of the same input would feed
    the model, so a client can count and budget before it asks."""
    state: ServerState = request.app.state.kiln
    _admit(state, request)  # as any request: the server is ready, and the key within its request rate
    dep: Deployment | None = None
    try:
        dep = _deployment(state, body.model)
        tok = dep.loaded.tokenizer
        if body.prompt is not None:
            tokens = tok.encode(body.prompt)
        else:
            tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
            tokens = tok.encode_chat(body.chat_messages(), fix="send a prompt instead of messages", tools=tools,
                                     add_generation_prompt=body.add_generation_prompt is not False)
        return _with_version(JSONResponse({"tokens": tokens, "count": len(tokens),
                                           "max_model_len": dep.loaded.spec.max_position}), dep)
    finally:
        _release(state, dep, None)


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> Any:
    """vLLM's /detokenize: the text of token ids, special tokens included, so that it tokenizes back to them."""
    state: ServerState = request.app.state.kiln
    _admit(state, request)
    dep: Deployment | None = None
    try:
        dep = _deployment(state, body.model)
        _check_token_ids(dep, body.tokens, "tokens")
        text = dep.loaded.tokenizer.decode(body.tokens, skip_special_tokens=False)
        return _with_version(JSONResponse({"prompt": text}), dep)
    finally:
        _release(state, dep, None)


@router.post("/v1/feedback")
async def feedback(body: FeedbackRequest, request: Request) -> dict[str, Any]:
    state: ServerState = request.app.state.kiln
    if state.feedback is None:
        raise ApiError(404, "feedback is not collected here; start the server with --log-requests",
                       code="feedback_disabled")
    if not state.feedback.add_feedback(body.id, body.rating, body.comment):
        raise ApiError(404, f"no logged response has id {body.id!r}", param="id", code="unknown_id")
    return {"id": body.id, "status": "recorded"}
