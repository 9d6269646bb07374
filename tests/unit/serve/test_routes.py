"""The generation endpoints in process (a TestClient, no subprocess): how they refuse requests, and the
per-key token reserve that every way out of a generation refunds down to what was used."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from kiln.engine.request import Request
from kiln.errors import ContextLengthError, InvalidParameterError, KilnError
from kiln.serve.app import create_app
from kiln.serve.state import ServeConfig
from kiln.serve.worker import EngineWorker

TOKENS_PER_MIN = 60  # the bucket holds 60 tokens and refills one a second
PROMPT = [42] * 4
MAX_TOKENS = 50  # so a request reserves 54 of the 60: a second one fits only if the first gave back its unused part
ReadyClient = Callable[[Any], AbstractContextManager[Any]]  # tests/conftest.py's ready_client
# a stream of MAX_TOKENS that a test's client leaves part-way
LONG_STREAM = {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, "stream": True}


def read_first_chunk(response: Any) -> Iterator[str]:
    """Read the stream's first chunk; the caller keeps the returned lines while it stays (once they are collected,
    the client has left)."""
    lines = (line for line in response.iter_lines() if line.startswith("data: {"))
    assert json.loads(next(lines).removeprefix("data: "))["choices"]
    return lines


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": "hi"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
])
@pytest.mark.parametrize("stream", [{}, {"stream": False}])
def test_stream_options_without_a_stream_are_400(path: str, body: dict, stream: dict) -> None:
    # refused at the schema, before any model is needed: no lifespan, so nothing is loaded
    client = TestClient(create_app(ServeConfig()))
    r = client.post(path, json={**body, **stream, "stream_options": {"include_usage": True}})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == "stream_options", error
    assert "only allowed when stream is true; drop stream_options or set stream" in error["message"]


@pytest.mark.parametrize("path,body,param,sentence", [
    ("/v1/completions", {"prompt": ""}, "prompt", "the prompt is empty"),
    ("/v1/completions", {"prompt": "hi", "stop": [""]}, "stop", "stop sequences must not be empty"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": []}]}, "messages.0.content",
     "the list of content parts is empty; send a string or at least one text part"),
    ("/v1/completions", {"prompt": "hi", "suffix": "x"}, "suffix",
     "suffix (text after the completion, for fill-in-the-middle) is not supported; drop it"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs",
     "top_logprobs applies with logprobs: true; set logprobs or drop top_logprobs"),
])
def test_a_validator_refusal_is_its_own_sentence(path: str, body: dict, param: str, sentence: str) -> None:
    # a ValueError raised in a validator reaches the client as its message alone, not pydantic's "Value error, ..."
    r = TestClient(create_app(ServeConfig())).post(path, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["message"], error["param"], error["code"]) == (f"{param}: {sentence}", param, "invalid_value")


def test_a_body_that_is_not_json_is_400_saying_so() -> None:
    # its error's location was the character where the JSON broke, shown as if it were a field: "10: JSON decode error"
    r = TestClient(create_app(ServeConfig())).post("/v1/completions", content=b'{"prompt":',
                                                   headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] is None and error["code"] == "invalid_json"
    assert error["message"] == "the body is not valid JSON (it breaks at character 10); send one JSON object"



@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/tokenize", "/v1/feedback"])
@pytest.mark.parametrize("body,message", [
    (b'{"prompt": "caf\xe9"}', "the body is not valid UTF-8 (byte 15 is 0xe9); send JSON encoded as UTF-8"),
    (b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
     "the body's JSON nests arrays or objects too deeply to be read; send a flatter JSON object"),
])
def test_a_body_that_cannot_be_read_is_400_saying_why(path: str, body: bytes, message: str) -> None:
    # both were FastAPI's "There was an error parsing the body", without a code
    r = TestClient(create_app(ServeConfig())).post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"] == {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": "invalid_json"}



@pytest.mark.parametrize("headers,sent", [
    ({}, "it has no Content-Type"),
    ({"content-type": "application/x-www-form-urlencoded"}, "its Content-Type is 'application/x-www-form-urlencoded'"),
    ({"content-type": "text/plain"}, "its Content-Type is 'text/plain'"),
])
def test_a_body_not_sent_as_json_is_415_naming_its_content_type(headers: dict, sent: str) -> None:
    # curl -d sends a form's Content-Type: the JSON object was refused as "body: Input should be a valid dictionary"
    r = TestClient(create_app(ServeConfig())).post("/v1/completions", content=b'{"prompt": "hi"}', headers=headers)
    assert r.status_code == 415, r.text
    assert r.json()["error"] == {"message": f"the body was not read as JSON, as {sent}; send it with Content-Type: "
                                            "application/json", "type": "invalid_request_error", "param": None,
                                 "code": "unsupported_media_type"}


@pytest.mark.parametrize("body,message", [
    (b"", "the body is empty; send one JSON object"),  # was "body: Field required"
    (b"[1]", "the body is a JSON array, not an object; send one JSON object"),
    (b"null", "the body is JSON null, not an object; send one JSON object"),
    (b'"hi"', "the body is a JSON string, not an object; send one JSON object"),
    (b"2", "the body is a JSON number, not an object; send one JSON object"),
])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/tokenize"])
def test_a_body_that_is_not_a_json_object_is_400_saying_what_it_is(path: str, body: bytes, message: str) -> None:
    r = TestClient(create_app(ServeConfig())).post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"] == {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": "invalid_json"}


@pytest.mark.parametrize("path,body,param,what", [
    ("/v1/completions", '{"prompt": "hi", "user": "a\\ud800"}', "user", "the text"),
    ("/v1/completions", '{"prompt": "hi", "stop": ["x", "\\udc00"]}', "stop.1", "the text"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}',
     "messages.0.content.0.text", "the text"),
    ("/v1/completions", '{"prompt": "hi", "logit_bias": {"\\ud800": 1}}', "logit_bias", "a key"),
    ("/v1/feedback", '{"id": "x", "rating": 1, "comment": "\\ud800"}', "comment", "the text"),
    ("/tokenize", '{"prompt": "\\ud800"}', "prompt", "the text"),
])
def test_a_lone_surrogate_anywhere_in_the_body_is_400_naming_its_place(path: str, body: str, param: str,
                                                                        what: str) -> None:
    # JSON may escape one, but UTF-8 cannot encode it: with --log-requests, a user or stop holding one was a 500
    # once the answer was made (the request log could not write it), and a prompt's was refused without a param
    r = TestClient(create_app(ServeConfig())).post(path, content=body.encode(),
                                                   headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    surrogate = "\\udc00" if "udc00" in body else "\\ud800"
    assert (error["param"], error["code"]) == (param, "invalid_value")
    assert error["message"] == (f"{param}: {what} holds a lone surrogate ({surrogate}), which is not a character; "
                                "send valid Unicode text (a character beyond U+FFFF escaped as a surrogate pair)")


def test_a_surrogate_pair_is_one_character(served: tuple[FastAPI, TestClient]) -> None:
    _, client = served
    r = client.post("/tokenize", content=b'{"prompt": "\\ud83d\\ude00"}', headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    assert r.json()["tokens"] == client.post("/tokenize", json={"prompt": "😀"}).json()["tokens"]


def test_requests_are_counted_by_the_route_that_answered() -> None:
    # GET /v1/models/{model_id} was counted as "other", with 404 scans of unknown paths
    client = TestClient(create_app(ServeConfig()))
    for path in ("/v1/models/org/name", "/v1/models/x", "/v1/models", "/admin"):
        client.get(path)
    counts = {line.split(" ")[0]: float(line.split(" ")[1]) for line in client.get("/metrics").text.splitlines()
              if line.startswith("kiln_requests_total{")}
    assert counts == {'kiln_requests_total{route="/v1/models/{model_id}",status="404"}': 2.0,
                      'kiln_requests_total{route="/v1/models",status="200"}': 1.0,
                      'kiln_requests_total{route="other",status="404"}': 1.0}


@pytest.mark.parametrize("method,path,allowed", [("GET", "/v1/completions", "POST"), ("POST", "/health", "GET"),
                                                 ("DELETE", "/v1/models", "GET")])
def test_a_wrong_method_is_405_naming_the_one_to_use(method: str, path: str, allowed: str) -> None:
    # it was "Method Not Allowed" without a code
    r = TestClient(create_app(ServeConfig())).request(method, path)
    assert r.status_code == 405 and r.headers["allow"] == allowed
    assert r.json()["error"] == {"message": f"{method} is not allowed on {path}; use {allowed}",
                                 "type": "invalid_request_error", "param": None, "code": "method_not_allowed"}


def test_an_unknown_path_is_404_listing_the_routes() -> None:
    # it was "Not Found" without a code
    r = TestClient(create_app(ServeConfig())).get("/v1/complete")
    assert r.status_code == 404
    error = r.json()["error"]
    assert (error["type"], error["code"]) == ("not_found_error", "unknown_route")
    assert error["message"].startswith("there is no /v1/complete here; the API's routes are POST /v1/completions, ")


@pytest.mark.parametrize("path", ["/health", "/ready", "/v1/models"])
def test_head_answers_as_get_without_a_body(path: str) -> None:
    # load balancers probe with HEAD, which was a 405 (FastAPI's routes answer only the methods they name)
    client = TestClient(create_app(ServeConfig()))
    got, head = client.get(path), client.head(path)
    assert head.status_code == got.status_code and head.content == b""
    for name in ("content-type", "content-length", "retry-after"):
        assert head.headers.get(name) == got.headers.get(name), name


def test_head_on_a_post_route_is_405_allowing_post() -> None:
    client = TestClient(create_app(ServeConfig()))
    r = client.head("/v1/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST" and r.content == b""
    # the body a GET would have (HEAD drops it) names the method sent, not the GET it was answered as
    assert int(r.headers["content-length"]) == len(json.dumps(
        {"error": {"message": "HEAD is not allowed on /v1/completions; use POST", "type": "invalid_request_error",
                   "param": None, "code": "method_not_allowed"}}, separators=(",", ":")))


COMPLETION, CHAT = {"prompt": "hi"}, {"messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("path,body,field", [
    *[("/v1/completions", COMPLETION, f) for f in ("max_tokens", "n", "seed", "logprobs")],
    *[("/v1/chat/completions", CHAT, f) for f in ("max_tokens", "max_completion_tokens", "n", "seed",
                                                  "top_logprobs")],
])
@pytest.mark.parametrize("value", ["2", 2.5, 2.0, True])
def test_an_integer_field_takes_only_an_integer(path: str, body: dict, field: str, value: object) -> None:
    # as OpenAI: a string, a fraction, an integral float or a boolean is a 400 naming the field, not coerced
    r = TestClient(create_app(ServeConfig())).post(path, json={**body, field: value})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == field and error["message"] == f"{field}: Input should be a valid integer", error



FLOAT_FIELDS = ("temperature", "top_p", "presence_penalty", "frequency_penalty", "min_p", "repetition_penalty")


@pytest.mark.parametrize("path,body,field", [
    *[("/v1/completions", COMPLETION, f) for f in FLOAT_FIELDS],
    *[("/v1/chat/completions", CHAT, f) for f in FLOAT_FIELDS],
    ("/v1/feedback", {"id": "x"}, "rating"),
])
@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_a_float_field_takes_only_a_finite_number(path: str, body: dict, field: str, value: str) -> None:
    # NaN fails every range check, so it was refused as "less than or equal to 2", a range it does not break
    content = json.dumps(body)[:-1] + f', "{field}": {value}}}'
    r = TestClient(create_app(ServeConfig())).post(path, content=content, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["param"], error["message"]) == (field, f"{field}: Input should be a finite number"), error


JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}
STREAM = {**COMPLETION, "stream": True}
NOT_A = {"boolean": ["true", "yes", 1, 0], "number": ["0.5", True]}  # what lax mode coerced
LAX_FIELDS = [
    *[("/v1/completions", STREAM if f == "stream_options" else COMPLETION, f, kind)
      for f, kind in (("stream", "boolean"), ("echo", "boolean"), ("ignore_eos", "boolean"), ("temperature", "number"),
                      ("top_p", "number"), ("presence_penalty", "number"), ("frequency_penalty", "number"))],
    *[("/v1/chat/completions", CHAT, f, kind) for f, kind in (("logprobs", "boolean"), ("stream", "boolean"),
                                                              ("temperature", "number"))],
    ("/v1/completions", STREAM, "stream_options.include_usage", "boolean"),
    ("/v1/completions", {**COMPLETION, "response_format": JSON_SCHEMA}, "response_format.json_schema.strict",
     "boolean"),
    ("/v1/feedback", {"id": "x"}, "rating", "number"),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]},
     "parallel_tool_calls", "boolean"),
]


@pytest.mark.parametrize("path,body,param,kind,value", [
    (*case, value) for case in LAX_FIELDS for value in NOT_A[case[3]]])
def test_a_boolean_or_float_field_is_not_coerced(path: str, body: dict, param: str, kind: str, value: object) -> None:
    # pydantic's lax mode turned "stream": "true" into a stream, "echo": 1 into an echo and "temperature": "0.5"
    # into a temperature; as OpenAI, the wrong type is a 400 naming the field
    payload = json.loads(json.dumps(body))
    *outer, last = param.split(".")
    place = payload
    for key in outer:
        place = place.setdefault(key, {})
    place[last] = value
    r = TestClient(create_app(ServeConfig())).post(path, json=payload)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"] == f"{param}: Input should be a valid {kind}", error


def test_a_float_field_takes_an_integer() -> None:
    from kiln.serve.protocol import ChatCompletionRequest, CompletionRequest, FeedbackRequest

    request = CompletionRequest.model_validate_json('{"prompt": "hi", "temperature": 1, "top_p": 1, '
                                                    '"presence_penalty": -2, "frequency_penalty": 2}')
    assert (request.temperature, request.top_p, request.presence_penalty, request.frequency_penalty) == (1, 1, -2, 2)
    chat = ChatCompletionRequest.model_validate({**CHAT, "temperature": 0, "logprobs": True, "stream": False})
    assert chat.temperature == 0.0 and chat.logprobs is True
    assert FeedbackRequest.model_validate({"id": "x", "rating": 4}).rating == 4


@pytest.mark.parametrize("prompt", [[1.0, 2.0], [True], [[1, 2.0]], ["1", 2], 5])
def test_prompt_token_ids_are_integers(prompt: object) -> None:
    r = TestClient(create_app(ServeConfig())).post("/v1/completions", json={"prompt": prompt})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "prompt" and error["message"] == "prompt: the prompt must be a string, a list of " \
        "strings, a list of token ids (integers) or a list of such lists", error


# --- the token reserve --------------------------------------------------------------------------------


@pytest.fixture
def limited(tiny_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
            ready_client: ReadyClient) -> Iterator[tuple[FastAPI, TestClient]]:
    """The tiny model behind a token rate limit and a 1-second request timeout."""
    monkeypatch.setenv("KILN_HOME", str(tmp_path))
    app = create_app(ServeConfig(models=(str(tiny_folder),), kv_budget_bytes=4 << 20, request_timeout_s=1.0,
                                 tokens_per_min=TOKENS_PER_MIN))
    with ready_client(app) as client:
        yield app, client


def worker_of(app: FastAPI) -> EngineWorker:
    worker: EngineWorker = app.state.kiln.router.deployments()[0].worker
    return worker


def tokens_left(app: FastAPI) -> float:
    """The key's token bucket as the last take or refund left it, rounded to 0.01 (only take() refills, and the
    one take here, the reservation, was a moment after the bucket was made)."""
    return round(float(app.state.kiln.limiter.buckets[("testclient", "tokens")].level), 2)


def added_requests(worker: EngineWorker, monkeypatch: pytest.MonkeyPatch) -> list[Request]:
    """The engine's requests, collected as they are added, to count what each used."""
    added: list[Request] = []
    real_add = worker.engine.add_request

    def add(*args: Any, **kw: Any) -> Request:
        added.append(real_add(*args, **kw))
        return added[-1]

    monkeypatch.setattr(worker.engine, "add_request", add)
    return added


def generate(client: TestClient, stream: bool) -> tuple[int, str]:
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0,
                                             "ignore_eos": True, "stream": stream})
    return r.status_code, r.text


@pytest.mark.parametrize("stream", [False, True])
def test_a_failed_generation_refunds_what_it_did_not_use(limited: tuple[FastAPI, TestClient], stream: bool,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    app, client = limited
    worker = worker_of(app)
    added, real_step, steps = added_requests(worker, monkeypatch), worker.engine.step, []

    def fails_on_the_fourth() -> list:
        steps.append(1)
        if len(steps) == 4:
            raise RuntimeError("boom")
        return real_step()

    monkeypatch.setattr(worker.engine, "step", fails_on_the_fourth)
    status, text = generate(client, stream)
    assert (status, "generation failed" in text) == ((200, True) if stream else (500, False)), text
    [request] = added
    assert 0 < len(request.output) < MAX_TOKENS
    assert tokens_left(app) == TOKENS_PER_MIN - len(PROMPT) - len(request.output)


@pytest.mark.parametrize("stream", [False, True])
def test_a_timed_out_request_that_never_ran_refunds_its_whole_reserve(limited: tuple[FastAPI, TestClient],
                                                                     stream: bool,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    app, client = limited
    worker = worker_of(app)
    real_step = worker.engine.step

    def stalls() -> list:
        time.sleep(0.05)
        return []

    monkeypatch.setattr(worker.engine, "step", stalls)
    status, text = generate(client, stream)
    assert (status, "deadline" in text) == ((200, True) if stream else (504, True)), text
    assert tokens_left(app) == TOKENS_PER_MIN
    monkeypatch.setattr(worker.engine, "step", real_step)
    assert generate(client, False)[0] == 200  # the next request's reserve fits


def test_a_cancelled_stream_refunds_exactly_what_it_did_not_use(limited: tuple[FastAPI, TestClient],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # the engine is held in a step while the client leaves and the handler lets go of the request; it appends one
    # more token after that, before the abort reaches it: that token was generated, so it is not given back
    app, client = limited
    worker = worker_of(app)
    added, real_step = added_requests(worker, monkeypatch), worker.engine.step
    leaving, at_gate, gate = threading.Event(), threading.Event(), threading.Event()

    def held() -> list:
        if leaving.is_set():
            at_gate.set()
            assert gate.wait(timeout=10)
        time.sleep(0.02)  # 50 tokens take a second: the client leaves long before the end
        return real_step()

    monkeypatch.setattr(worker.engine, "step", held)
    with client.stream("POST", "/v1/completions", json=LONG_STREAM) as r:
        rest = read_first_chunk(r)
        leaving.set()
        assert at_gate.wait(timeout=10)
        rest.close()  # the client leaves
    # closing the stream ends the handler, which frees the queue slot while the engine still holds the request
    assert app.state.kiln.admission.current == 0
    [request] = added
    generated_when_left = len(request.output)
    gate.set()
    asyncio.run(worker.call(lambda engine: None))  # the engine has handled everything sent before this
    assert request.status.finished and len(request.output) == generated_when_left + 1 < MAX_TOKENS
    assert tokens_left(app) == TOKENS_PER_MIN - len(PROMPT) - len(request.output)


def test_a_client_gone_while_a_chunk_is_sent_frees_its_request_at_once(limited: tuple[FastAPI, TestClient],
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # the client reads one chunk, then nothing: the server is held sending the next when it leaves, and must
    # still end the request then (slot, reserve, engine work), not when the collector finds the stream's generator
    app, client = limited
    worker = worker_of(app)
    added, real_step = added_requests(worker, monkeypatch), worker.engine.step

    def slow() -> list:
        time.sleep(0.02)  # 50 tokens take a second: the client leaves long before the end
        return real_step()

    monkeypatch.setattr(worker.engine, "step", slow)
    with client.stream("POST", "/v1/completions", json=LONG_STREAM) as r:
        rest = read_first_chunk(r)
        time.sleep(0.2)  # more tokens are made meanwhile: the server waits to send one
        rest.close()  # the client leaves
    assert app.state.kiln.admission.current == 0
    [request] = added
    deadline = time.monotonic() + 10
    while not request.status.finished:
        assert time.monotonic() < deadline, "the engine still runs the request of a client that left"
        time.sleep(0.05)
    assert len(request.output) < MAX_TOKENS


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_over_the_whole_token_limit_is_refused_for_good(limited: tuple[FastAPI, TestClient],
                                                                  stream: bool) -> None:
    # two choices of 4 + 50 tokens need 108 of a 60-token minute: no wait makes them fit, so the answer says what
    # to lower instead of "retry in 0.0 s", and asks the client not to retry
    app, client = limited
    body = {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "n": 2, "stream": stream}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 429 and "retry-after" not in r.headers and r.headers["x-should-retry"] == "false", r.text
    assert r.json()["error"] == {
        "message": f"the request needs {2 * (len(PROMPT) + MAX_TOKENS)} tokens (prompt and max_tokens of each of its "
                   f"2 choices) but this key's limit is {TOKENS_PER_MIN} tokens per minute; lower max_tokens or n",
        "type": "rate_limit_error", "param": None, "code": "tokens_over_limit"}
    assert client.post("/v1/completions", json={**body, "n": 1}).status_code == 200  # it took nothing


def test_a_chat_without_max_tokens_over_the_token_limit_says_to_pass_max_tokens(
        limited: tuple[FastAPI, TestClient]) -> None:
    # without max_tokens a chat choice reserves the rest of the 64-token context, more than the 60-token minute:
    # the refusal said "lower max_tokens or n", naming a field the client never sent
    app, client = limited
    body = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 429, r.text
    context = worker_of(app).engine.context
    message = r.json()["error"]["message"]
    assert message.startswith(f"the request needs {context} tokens (prompt and the rest of the context, as no "
                              "max_tokens was given) but this key's limit is 60 tokens per minute; pass max_tokens")
    fits = int(message.rsplit("of at most ", 1)[1].split(",")[0])
    r = client.post("/v1/chat/completions", json={**body, "max_tokens": fits})
    assert r.status_code == 200, r.text
    r = client.post("/v1/chat/completions", json={**body, "max_tokens": fits, "n": 2})
    assert r.json()["error"]["message"].endswith("; lower max_tokens or n")  # a max_tokens that was sent


def test_echo_logprobs_are_scored_in_the_prefill_and_charged_once(limited: tuple[FastAPI, TestClient],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # the prompt's log-probabilities come from the generation's own prefill (no second pass over the prompt), so
    # its tokens are charged once; with n = 2 only the first choice scores it
    app, client = limited
    added = added_requests(worker_of(app), monkeypatch)
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "temperature": 0, "ignore_eos": True,
                                             "echo": True, "logprobs": 1, "n": 2})
    assert r.status_code == 200, r.text
    first, second = added
    assert first.params.prompt_logprobs == 1 and second.params.prompt_logprobs is None
    for choice, request in zip(r.json()["choices"], added, strict=True):
        logprobs = choice["logprobs"]
        assert len(logprobs["tokens"]) == len(PROMPT) + len(request.output)
        assert logprobs["token_logprobs"][0] is None
        assert logprobs["token_logprobs"][1:len(PROMPT)] == [v.logprob for v in first.prompt_logprobs[1:]]
    assert tokens_left(app) == TOKENS_PER_MIN - 2 * len(PROMPT) - len(first.output) - len(second.output)


@pytest.mark.parametrize("prompt", ["I like 😀 and 日本語 text", "😀😀", "中文测试 ok", "a\ufffd😀\ufffdb"])
def test_echo_offsets_index_the_returned_text(limited: tuple[FastAPI, TestClient], prompt: str) -> None:
    # byte-level BPE splits a multi-byte character over tokens that each decode to U+FFFD: such a token's offset
    # is that of the character it is part of, and every token after it starts where its text is in the text
    _, client = limited
    r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 4, "temperature": 0, "ignore_eos": True,
                                             "echo": True, "logprobs": 0})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    text, tokens, offsets = choice["text"], choice["logprobs"]["tokens"], choice["logprobs"]["text_offset"]
    assert text.startswith(prompt) and len(tokens) == len(offsets)
    assert offsets[0] == 0 and offsets == sorted(offsets) and offsets[-1] < len(text), offsets
    for token, offset in zip(tokens, offsets, strict=True):
        if "\ufffd" not in token:  # a whole token: its text is where its offset says
            assert text[offset:offset + len(token)] == token, (token, offset, text)


# --- streamed logprobs ------------------------------------------------------------------------------------


@pytest.fixture
def served(tiny_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
           ready_client: ReadyClient) -> Iterator[tuple[FastAPI, TestClient]]:
    """The tiny model, with no limits."""
    monkeypatch.setenv("KILN_HOME", str(tmp_path))
    app = create_app(ServeConfig(models=(str(tiny_folder),), kv_budget_bytes=4 << 20))
    with ready_client(app) as client:
        yield app, client


def runs_ahead(worker: EngineWorker, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each engine step runs the engine until its work is done and hands over the outputs of all those steps at
    once: the handler reads every output after its request has grown past it."""
    real_step = worker.engine.step

    def ahead() -> list:
        outputs = []
        while worker.engine.has_work:
            outputs += real_step()
        return outputs

    monkeypatch.setattr(worker.engine, "step", ahead)


def streamed(client: TestClient, path: str, body: dict) -> list[dict]:
    r = client.post(path, json={**body, "stream": True})
    assert r.status_code == 200, r.text
    return [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("ends_at_eos", [False, True])
def test_each_streamed_chunk_carries_the_logprobs_of_its_own_tokens(served: tuple[FastAPI, TestClient], chat: bool,
                                                                    ends_at_eos: bool,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # the engine is ahead of the handler: a chunk must still carry its own tokens' logprobs, not the newest ones;
    # across the stream they are those of the answer without a stream, the end-of-sequence token's included
    app, client = served
    worker = worker_of(app)
    path = "/v1/chat/completions" if chat else "/v1/completions"
    ask = {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 2} if chat else \
        {"prompt": "Once upon a time", "logprobs": 2}
    body = {**ask, "max_tokens": 8, "temperature": 1.0, "seed": 3, "ignore_eos": True}
    if ends_at_eos:  # the fourth token of this answer ends the next ones
        added = added_requests(worker, monkeypatch)
        assert client.post(path, json=body).status_code == 200
        monkeypatch.setattr(worker.engine.tokenizer, "eos_token_ids", frozenset({added[0].output[3]}))
        body["ignore_eos"] = False
    whole = client.post(path, json=body).json()["choices"][0]
    assert whole["finish_reason"] == ("stop" if ends_at_eos else "length")
    runs_ahead(worker, monkeypatch)
    chunks = [c for chunk in streamed(client, path, body) for c in chunk["choices"]]
    if chat:
        expected = [(v["token"], v["logprob"]) for v in whole["logprobs"]["content"]]
        got = [(v["token"], v["logprob"]) for c in chunks if c.get("logprobs") for v in c["logprobs"]["content"]]
    else:
        expected = list(zip(whole["logprobs"]["tokens"], whole["logprobs"]["token_logprobs"], strict=True))
        got = [pair for c in chunks if c.get("logprobs")
               for pair in zip(c["logprobs"]["tokens"], c["logprobs"]["token_logprobs"], strict=True)]
    assert len(set(expected)) > 1  # distinct tokens: the newest token's logprob would not pass for each
    assert got == expected


def scripted(app: FastAPI, text: str, monkeypatch: pytest.MonkeyPatch, ends: bool = False) -> int:
    """Every choice generates the tokens of `text`, in order (then the end-of-sequence token, if it `ends`);
    returns how many there are."""
    import kiln.engine.engine

    tok = app.state.kiln.router.deployments()[0].loaded.tokenizer
    script = tok.encode(text) + ([min(tok.eos_token_ids)] if ends else [])
    sampled: dict[int, int] = {}  # sampler id -> tokens it gave

    def sample(logits: Any, states: Any) -> list[int]:
        tokens = []
        for state in states:
            done = sampled[id(state)] = sampled.get(id(state), -1) + 1
            tokens.append(script[done % len(script)])
        return tokens

    monkeypatch.setattr(kiln.engine.engine, "sample", sample)
    return len(script)


@pytest.mark.parametrize("text", [None, "日本語 😀, ok 🇯🇵 ü!"])  # None: what the model samples
def test_streamed_text_offsets_count_from_the_start_of_the_text(served: tuple[FastAPI, TestClient], text: str | None,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # as the answer without a stream's: each offset indexes the whole text of its choice, not its chunk's text,
    # and a token that ends a character another began has that character's offset
    app, client = served
    num_tokens = 12 if text is None else scripted(app, text, monkeypatch)
    body = {"prompt": "Once upon a time", "max_tokens": num_tokens, "temperature": 1.0, "seed": 5, "n": 2,
            "ignore_eos": True, "logprobs": 1}
    whole = client.post("/v1/completions", json=body).json()["choices"]
    assert text is None or whole[0]["text"] == text
    chunks = [c for chunk in streamed(client, "/v1/completions", body) for c in chunk["choices"]]
    for i, choice in enumerate(whole):
        assert len(choice["logprobs"]["text_offset"]) == num_tokens
        mine = [c for c in chunks if c["index"] == i]
        assert "".join(c["text"] for c in mine) == choice["text"]
        offsets = [o for c in mine if c.get("logprobs") for o in c["logprobs"]["text_offset"]]
        assert offsets == choice["logprobs"]["text_offset"]


@pytest.mark.parametrize("stop,rails", [
    (["ab"], None),  # " a" is held as the start of "ab", then released with " world"
    (["q!"], None),  # " q" is held, then dropped with the stop string: the text ends short of its tokens
    (None, '[output]\nblocklist = ["zebra crossing"]\n'),  # " zebra" is held until the next word is not "crossing"
])
def test_streamed_text_offsets_hold_when_text_is_held_back(tiny_folder: Path, tmp_path: Path, stop: list | None,
                                                           rails: str | None, monkeypatch: pytest.MonkeyPatch,
                                                           ready_client: ReadyClient) -> None:
    # text that a stop string or the output guardrail holds back goes out later (or never): the offsets are still
    # those of the answer without a stream, and each token goes out with the chunk its text begins in
    monkeypatch.setenv("KILN_HOME", str(tmp_path))
    guardrails = ()
    if rails is not None:
        (tmp_path / "guardrails.toml").write_text(rails, encoding="utf-8")
        guardrails = (str(tmp_path / "guardrails.toml"),)
    app = create_app(ServeConfig(models=(str(tiny_folder),), kv_budget_bytes=4 << 20, guardrails=guardrails))
    with ready_client(app) as client:
        scripted(app, "Hello a world, and a zebra and more words q! there", monkeypatch)
        body = {"prompt": "x", "max_tokens": 14, "temperature": 0, "ignore_eos": True, "logprobs": 0, "stop": stop}
        whole = client.post("/v1/completions", json=body).json()["choices"][0]
        chunks = [c for chunk in streamed(client, "/v1/completions", body) for c in chunk["choices"]]
    assert "".join(c["text"] for c in chunks) == whole["text"]
    got = {k: [v for c in chunks if c.get("logprobs") for v in c["logprobs"][k]] for k in ("tokens", "text_offset")}
    assert got == {k: whole["logprobs"][k] for k in ("tokens", "text_offset")}
    num_sent = 0
    for c in chunks[:-1]:
        num_sent += len(c["text"])
        assert all(o < num_sent for o in (c.get("logprobs") or {}).get("text_offset", [])), (c, num_sent)



@pytest.mark.parametrize("path,body,field", [
    ("/v1/completions", {"prompt": [42] * 50}, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi " * 20}]}, "max_tokens"),  # 51 tokens
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi " * 20}]}, "max_completion_tokens"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_a_max_tokens_past_the_context_is_400_naming_the_numbers(served: tuple[FastAPI, TestClient], path: str,
                                                                 body: dict, field: str, stream: bool) -> None:
    _, client = served
    r = client.post(path, json={**body, field: 20, "stream": stream})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["param"], error["code"]) == (field, "context_length_exceeded")
    prompt = 50 if "prompt" in body else 51
    assert error["message"] == (f"the prompt has {prompt} tokens and {field} is 20, {prompt + 20} in all, more than "
                                f"the model's context of 64 tokens; shorten the prompt or lower {field} to "
                                f"{64 - prompt} or less")


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": [42] * 60}),  # the default 16 tokens were refused as "max_tokens is 16"
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi " * 20}]}),
])
def test_without_max_tokens_the_answer_runs_to_the_end_of_the_context(served: tuple[FastAPI, TestClient], path: str,
                                                                      body: dict) -> None:
    _, client = served
    r = client.post(path, json={**body, "ignore_eos": True})
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["choices"][0]["finish_reason"] == "length" and answer["usage"]["total_tokens"] == 64



@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 3, "stop": ["zz"]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "seed": 5}),
])
def test_a_streamed_request_is_logged_whole(tiny_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            ready_client: ReadyClient, path: str, body: dict) -> None:
    # with --log-requests a streamed request was kept as {"stream": true}: its prompt and parameters were lost
    import sqlite3

    monkeypatch.setenv("KILN_HOME", str(tmp_path))
    app = create_app(ServeConfig(models=(str(tiny_folder),), kv_budget_bytes=4 << 20, log_requests=True))
    with ready_client(app) as client:
        plain = client.post(path, json=body).json()["id"]
        chunks = streamed(client, path, body)
    with sqlite3.connect(tmp_path / "requests.sqlite") as db:
        logged = {i: json.loads(r) for i, r in db.execute("SELECT id, request FROM requests")}
    assert logged[chunks[0]["id"]] == {**logged[plain], "stream": True}
    assert logged[plain]["max_tokens"] == 3 and (logged[plain].get("prompt") or logged[plain]["messages"])



@pytest.mark.parametrize("stream", [False, True])
def test_a_request_log_that_cannot_be_written_does_not_fail_the_answer(
        tiny_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ready_client: ReadyClient,
        caplog: pytest.LogCaptureFixture, stream: bool) -> None:
    # the answer was made, then lost to a 500 (or a stream's ASGI error after [DONE]) because the log write failed
    import sqlite3

    from kiln.serve.feedback import FeedbackStore

    def broken(*args: object, **kwargs: object) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setenv("KILN_HOME", str(tmp_path))
    monkeypatch.setattr(FeedbackStore, "log_request", broken)
    app = create_app(ServeConfig(models=(str(tiny_folder),), kv_budget_bytes=4 << 20, log_requests=True))
    body = {"prompt": "hi", "max_tokens": 2}
    with ready_client(app) as client, caplog.at_level("ERROR", logger="kiln.serve"):
        if stream:
            assert streamed(client, "/v1/completions", body)[-1]["choices"][0]["finish_reason"] == "length"
        else:
            r = client.post("/v1/completions", json=body)
            assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length", r.text
    assert any("request log" in record.getMessage() and "disk I/O error" in record.getMessage()
               for record in caplog.records), caplog.text


# --- the KV cache budget --------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_a_prompt_over_the_kv_budget_is_400_kv_budget_exceeded(tiny_folder: Path, tmp_path: Path, stream: bool,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               ready_client: ReadyClient) -> None:
    monkeypatch.setenv("KILN_HOME", str(tmp_path))
    app = create_app(ServeConfig(models=(str(tiny_folder),), kv_budget_bytes=12 << 10))  # 3 blocks: 32 tokens
    with ready_client(app) as client:
        capacity = worker_of(app).engine.cache.capacity_tokens
        assert capacity < 40  # under the 64-token context: the KV cache, not the context, refuses below
        asks = {"prompt": {"prompt": [42] * capacity}, "messages": {"messages": [{"role": "user",
                                                                                   "content": "hello " * 30}]}}
        for param, body in asks.items():
            path = "/v1/completions" if param == "prompt" else "/v1/chat/completions"
            r = client.post(path, json={**body, "max_tokens": 2, "stream": stream})
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert (error["code"], error["param"], error["type"]) == ("kv_budget_exceeded", param,
                                                                      "invalid_request_error"), error
            assert f"budget of {capacity} tokens" in error["message"] and "--kv-budget-mb" in error["message"]
        fits = client.post("/v1/completions", json={"prompt": [42] * (capacity - 1), "max_tokens": 1})
        assert fits.status_code == 200, fits.text  # the edge: prompt + the one generated token fill the cache


@pytest.mark.parametrize("stream", [False, True])
def test_a_generation_that_outgrows_the_kv_cache_ends_with_length(tiny_folder: Path, tmp_path: Path, stream: bool,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  ready_client: ReadyClient) -> None:
    # max_tokens fits the 64-token context but not the 32-token cache: the answer ends there with "length". The
    # engine ended it without a last output and the client waited forever (here: until the 30 s deadline, a 504)
    monkeypatch.setenv("KILN_HOME", str(tmp_path))
    app = create_app(ServeConfig(models=(str(tiny_folder),), kv_budget_bytes=12 << 10, request_timeout_s=30))
    with ready_client(app) as client:
        capacity = worker_of(app).engine.cache.capacity_tokens
        body = {"prompt": PROMPT, "max_tokens": 50, "temperature": 0, "ignore_eos": True, "stream": stream}
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        if stream:
            chunks = [json.loads(line.removeprefix("data: ")) for line in r.text.splitlines()
                      if line.startswith("data: {")]
            assert r.text.rstrip().endswith("data: [DONE]")
            assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
        else:
            assert r.json()["choices"][0]["finish_reason"] == "length"
            assert r.json()["usage"]["completion_tokens"] == capacity - len(PROMPT)
        assert worker_of(app).engine.cache.used_blocks == 0


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("error,code", [(InvalidParameterError, "invalid_parameter_error"),
                                        (ContextLengthError, "context_length_error"), (KilnError, "kiln_error")])
def test_an_engine_refusal_says_why_streamed_or_not(limited: tuple[FastAPI, TestClient], stream: bool,
                                                    error: type[KilnError], code: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    app, client = limited

    def refuses(*args: Any, **kw: Any) -> Request:
        raise error("the prompt cannot run here; shorten it")

    monkeypatch.setattr(worker_of(app).engine, "add_request", refuses)
    status, text = generate(client, stream)
    assert status == (200 if stream else 400), text
    body = json.loads(text) if not stream else next(json.loads(line[6:]) for line in text.splitlines()
                                                    if line.startswith("data: {"))
    # a refusal with no code of its own is coded by its error class, the same streamed or not
    assert body["error"] == {"message": "the prompt cannot run here; shorten it", "type": "invalid_request_error",
                             "param": None, "code": code}


@pytest.mark.parametrize("cause", ["timeout", "engine_stopped", "failed_step"])
def test_a_stream_error_is_coded_as_the_answer_without_a_stream(tiny_folder: Path, tmp_path: Path, cause: str,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                ready_client: ReadyClient) -> None:
    # the stream's 200 is sent before the cause is known, but its error chunk has the type and code (and, where
    # the cause has its own words, the message) of the error body the same cause gives without a stream
    monkeypatch.setenv("KILN_HOME", str(tmp_path))
    app = create_app(ServeConfig(models=(str(tiny_folder),), kv_budget_bytes=4 << 20, request_timeout_s=1.0))
    with ready_client(app) as client:
        worker = worker_of(app)

        def broken() -> list:
            if cause == "timeout":
                time.sleep(0.05)
                return []
            raise RuntimeError("boom")

        if cause == "engine_stopped":
            worker.stop()
        else:
            monkeypatch.setattr(worker.engine, "step", broken)
        answers = {}
        for stream in (False, True):
            status, text = generate(client, stream)
            answers[stream] = (status, json.loads(text) if not stream else next(
                json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")))
    (status, whole), (stream_status, chunk) = answers[False], answers[True]
    assert (status, stream_status) == ({"timeout": 504, "engine_stopped": 503, "failed_step": 500}[cause], 200)
    assert {k: chunk["error"][k] for k in ("type", "code", "param")} == \
        {k: whole["error"][k] for k in ("type", "code", "param")}, (chunk, whole)
    if cause != "failed_step":  # a failure of ours is worded apart ("generation failed" in a stream), coded alike
        assert chunk["error"]["message"] == whole["error"]["message"]


# --- response_format -----------------------------------------------------------------------------------

# 600 optional properties: compiles, but once a property name begins llguidance's Earley row outgrows its limit
TOO_WIDE = {"type": "object", "properties": {f"f{i}": {"type": "string"} for i in range(600)}}


def test_a_schema_the_grammar_cannot_follow_is_400_and_the_engine_goes_on(limited: tuple[FastAPI, TestClient]) -> None:
    app, client = limited
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 2.0, "seed": 0,
            "response_format": {"type": "json_schema", "json_schema": {"name": "wide", "schema": TOO_WIDE}}}
    for _ in range(4):  # more than the worker's limit of failed steps in a row, were each a failed step
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and "simplify the schema" in error["message"], error
    r = client.post("/v1/chat/completions", json={**body, "stream": True})
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert "simplify the schema" in chunks[-1]["error"]["message"] and r.text.endswith("data: [DONE]\n\n")
    assert worker_of(app).stats.errors == 0
    time.sleep(1.0)  # the token bucket refills
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
    assert r.status_code == 200, r.text


# --- structured output -----------------------------------------------------------------------------------


def test_a_schema_compiles_off_the_event_loop(limited: tuple[FastAPI, TestClient],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # a large schema takes about a second to compile: other requests must be answered meanwhile. The compile
    # below waits for /health to answer; on the event loop, /health could not answer until it gave up waiting
    import threading

    from kiln.engine import grammar

    app, client = limited
    compiling, health_answered, gave_up = threading.Event(), threading.Event(), []
    real = grammar.json_grammar

    def slow(schema: Any) -> str:
        compiling.set()
        gave_up.append(not health_answered.wait(timeout=10))
        return real(schema)

    monkeypatch.setattr(grammar, "json_grammar", slow)
    body = {"prompt": "hi", "max_tokens": 2, "response_format": {"type": "json_object"}}
    asking = threading.Thread(target=lambda: client.post("/v1/completions", json=body))
    asking.start()
    assert compiling.wait(timeout=30)
    assert client.get("/health").status_code == 200
    health_answered.set()
    asking.join()
    assert gave_up == [False]


# --- tools ------------------------------------------------------------------------------------------------

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
PARIS_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
MALFORMED_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {city: Paris}}\n</tool_call>'


@pytest.fixture(scope="module")
def roomy_folder(tiny_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a context of 1024 tokens: room for the tools in the system message."""
    import shutil

    folder = tmp_path_factory.mktemp("tiny-roomy")
    for f in tiny_folder.iterdir():
        shutil.copy(f, folder / f.name)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 1024}))
    return folder


@pytest.fixture
def with_tools(roomy_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
               ready_client: ReadyClient) -> Iterator[tuple[FastAPI, TestClient]]:
    monkeypatch.setenv("KILN_HOME", str(tmp_path))
    app = create_app(ServeConfig(models=(str(roomy_folder),), kv_budget_bytes=4 << 20))
    with ready_client(app) as client:
        yield app, client


@pytest.mark.parametrize("extra,param,words", [
    ({"tools": [{"type": "function", "function": {"name": "get weather"}}]}, "tools.0.function.name",
     "must be 1 to 64 letters"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "not among the tools"),
])
def test_bad_tools_are_400_naming_the_field(extra: dict, param: str, words: str) -> None:
    r = TestClient(create_app(ServeConfig())).post("/v1/chat/completions", json={**CHAT, **extra})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["param"], error["code"], error["type"]) == (param, "invalid_value", "invalid_request_error")
    assert words in error["message"], error


@pytest.mark.parametrize("tool_choice", ["auto", "required"])
def test_a_tool_schema_the_grammar_cannot_compile_is_400_naming_the_tool(with_tools: tuple[FastAPI, TestClient],
                                                                         tool_choice: str) -> None:
    _, client = with_tools
    bad = {"type": "function", "function": {"name": "lookup", "parameters": {
        "type": "object", "properties": {"q": {"type": "string", "pattern": "[a-"}}}}}
    r = client.post("/v1/chat/completions", json={**CHAT, "tools": [WEATHER, bad], "tool_choice": tool_choice})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["param"], error["code"]) == ("tools.1.function.parameters", "invalid_schema"), error
    assert error["message"].startswith("tool 'lookup': the JSON schema cannot be used (") and "fix the schema" in \
        error["message"]


def chat_answer(client: TestClient, body: dict) -> tuple[dict, dict]:
    """The first choice without a stream, and with one: its message (deltas joined, calls by index) and finish."""
    whole = client.post("/v1/chat/completions", json=body)
    assert whole.status_code == 200, whole.text
    content, calls, finish = "", {}, None
    for chunk in streamed(client, "/v1/chat/completions", body):
        for choice in chunk["choices"]:
            content += choice["delta"].get("content") or ""
            for call in choice["delta"].get("tool_calls", ()):
                assert call["index"] not in calls  # each call whole, in one delta
                calls[call["index"]] = {k: call[k] for k in ("id", "type", "function")}
            finish = choice["finish_reason"] or finish
    stream = {"message": {"role": "assistant", "content": content or (None if calls else ""),
                          **({"tool_calls": [calls[i] for i in sorted(calls)]} if calls else {})},
              "finish_reason": finish}
    return whole.json()["choices"][0], stream


def without_ids(choice: dict) -> dict:
    calls = [{**c, "id": "call_"} for c in choice["message"].get("tool_calls", ())]
    return {**choice, "message": {**choice["message"], **({"tool_calls": calls} if calls else {})}}


def test_a_call_in_auto_mode_is_read_out_of_the_text(with_tools: tuple[FastAPI, TestClient],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    app, client = with_tools
    size = scripted(app, "Let me check.\n" + PARIS_CALL, monkeypatch, ends=True)
    whole, stream = chat_answer(client, {**CHAT, "tools": [WEATHER], "max_tokens": size + 4})
    assert whole["finish_reason"] == "tool_calls" and whole["message"]["content"] == "Let me check."
    [call] = whole["message"]["tool_calls"]
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert without_ids(stream) == without_ids({k: whole[k] for k in ("message", "finish_reason")})


@pytest.mark.parametrize("text", [MALFORMED_CALL, PARIS_CALL.replace("get_weather", "rm"), "It is sunny in Paris."])
def test_text_that_is_no_call_is_content_not_an_error(with_tools: tuple[FastAPI, TestClient], text: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    app, client = with_tools
    size = scripted(app, text, monkeypatch, ends=True)
    whole, stream = chat_answer(client, {**CHAT, "tools": [WEATHER], "max_tokens": size + 4})
    assert whole["message"] == {"role": "assistant", "content": text} and whole["finish_reason"] == "stop"
    assert stream == {k: whole[k] for k in ("message", "finish_reason")}


def test_tool_choice_none_keeps_the_tools_out(with_tools: tuple[FastAPI, TestClient],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    app, client = with_tools
    size = scripted(app, PARIS_CALL, monkeypatch, ends=True)
    plain = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": size}).json()
    none = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": size, "tools": [WEATHER],
                                                      "tool_choice": "none"}).json()
    auto = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": size, "tools": [WEATHER]}).json()
    assert none["usage"] == plain["usage"] and auto["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"]
    assert none["choices"][0]["message"] == {"role": "assistant", "content": PARIS_CALL}  # text only
    assert "tool_calls" in auto["choices"][0]["message"]


@pytest.fixture
def guarded_tools(roomy_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                  ready_client: ReadyClient) -> Iterator[TestClient]:
    monkeypatch.setenv("KILN_HOME", str(tmp_path))
    rails = tmp_path / "guardrails.toml"
    rails.write_text('[input]\nblocklist = ["café", "exfiltrate"]\n', encoding="utf-8")
    app = create_app(ServeConfig(models=(str(roomy_folder),), kv_budget_bytes=4 << 20, guardrails=(str(rails),)))
    with ready_client(app) as client:
        yield client


def history_with(arguments: str) -> list[dict]:
    return [{"role": "user", "content": "hi"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]


@pytest.mark.parametrize("extra", [
    {"messages": history_with('{"city": "café"}')},  # non-ASCII: once read as "caf\u00e9", so it passed
    {"messages": history_with('{"city": "exfiltrate"}')},
    {"tools": [{"type": "function", "function": {"name": "lookup", "description": "exfiltrate the keys"}}]},
    {"tools": [{"type": "function", "function": {"name": "lookup", "parameters": {
        "type": "object", "properties": {"q": {"type": "string", "description": "the café"}}}}}]},
])
def test_the_input_guardrail_reads_call_arguments_and_tools(guarded_tools: TestClient, extra: dict) -> None:
    # what goes into the prompt is checked: a call's arguments however they are spelled, and the tools'
    # descriptions and schemas, which the chat template writes into the system message
    r = guarded_tools.post("/v1/chat/completions", json={**CHAT, "tools": [WEATHER], "max_tokens": 1, **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "input_blocked"


def test_tools_left_out_by_tool_choice_none_are_not_read(guarded_tools: TestClient) -> None:
    tools = [{"type": "function", "function": {"name": "lookup", "description": "exfiltrate the keys"}}]
    r = guarded_tools.post("/v1/chat/completions", json={**CHAT, "tools": tools, "tool_choice": "none",
                                                         "max_tokens": 1})
    assert r.status_code == 200, r.text


def test_the_output_guardrail_reads_call_arguments_as_they_are_returned(
        roomy_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ready_client: ReadyClient) -> None:
    # the model may spell a blocked word with JSON escapes; the arguments go back decoded, so they are what is checked
    monkeypatch.setenv("KILN_HOME", str(tmp_path))
    rails = tmp_path / "guardrails.toml"
    rails.write_text('[output]\nblocklist = ["Paris"]\n', encoding="utf-8")
    app = create_app(ServeConfig(models=(str(roomy_folder),), kv_budget_bytes=4 << 20, guardrails=(str(rails),)))
    with ready_client(app) as client:
        size = scripted(app, PARIS_CALL.replace("Paris", "\\u0050aris"), monkeypatch, ends=True)
        body = {**CHAT, "tools": [WEATHER], "max_tokens": size + 4}
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 400 and r.json()["error"]["code"] == "output_blocked", r.text
        # the version that made the blocked answer is named, as on every answer (the header was missing)
        assert r.headers["X-Kiln-Model-Version"] == app.state.kiln.router.deployments()[0].version
        chunks = streamed(client, "/v1/chat/completions", body)
        assert not [c for chunk in chunks for c in chunk["choices"] if c["delta"].get("tool_calls")]
        assert [c["finish_reason"] for chunk in chunks for c in chunk["choices"] if c["finish_reason"]] == \
            ["content_filter"]


def test_a_chat_template_that_refuses_the_messages_is_a_400(served: tuple[FastAPI, TestClient],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    app, client = served
    tok = app.state.kiln.router.deployments()[0].loaded.tokenizer
    monkeypatch.setattr(tok.hf, "chat_template", "{% for m in messages %}{% if m.role == 'system' %}"
                        "{{ raise_exception('System role not supported') }}{% endif %}{{ m.content }}{% endfor %}")
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "system", "content": "Be brief."},
                                                               {"role": "user", "content": "hi"}], "max_tokens": 2})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"] == ("the model's chat template refused these messages: System role not "
                                            "supported; change the messages as it asks")
    assert client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 2}).status_code == 200


@pytest.mark.parametrize("scored", [0, 1, 3])
def test_an_echo_of_a_prompt_not_scored_to_its_end_has_a_value_per_token(tiny_folder: Path, scored: int) -> None:
    # a request aborted at the drain deadline while queued, or part-way through its prompt, answers with what it
    # has: its echo still has one log-probability (null where none was computed) per prompt token
    from types import SimpleNamespace

    from kiln.engine.request import TokenLogprob
    from kiln.model.load import load_tokenizer
    from kiln.serve.routes import _echo

    _, tok, _ = load_tokenizer(str(tiny_folder))
    prompt = [*PROMPT, 43, 44]
    values = [None, *[TokenLogprob(t, -1.0, ((t, -1.0),)) for t in prompt[1:]]][:scored]
    _, logprobs = _echo(tok, SimpleNamespace(prompt=prompt, prompt_logprobs=values), 1)  # type: ignore[arg-type]
    assert logprobs is not None
    assert {k: len(v) for k, v in logprobs.items()} == dict.fromkeys(logprobs, len(prompt))
    known = max(scored, 1)  # the first token has none either way
    assert logprobs["token_logprobs"] == [None, *[-1.0] * (known - 1), *[None] * (len(prompt) - known)]


@pytest.mark.parametrize("logprobs", [None, 0, 2])
def test_a_streamed_echo_sends_each_choices_prompt_first(served: tuple[FastAPI, TestClient],
                                                         logprobs: int | None) -> None:
    # as without a stream: the text is the prompt and then the answer, and the log-probabilities and text offsets of
    # the prompt's tokens and the answer's follow one another across the chunks
    _, client = served
    body = {"prompt": ["Once upon a time", "The end"], "max_tokens": 5, "temperature": 0, "ignore_eos": True,
            "echo": True, "n": 2, **({"logprobs": logprobs} if logprobs is not None else {})}
    whole = client.post("/v1/completions", json=body).json()["choices"]
    chunks = [c for chunk in streamed(client, "/v1/completions", body) for c in chunk["choices"]]
    for choice in whole:
        mine = [c for c in chunks if c["index"] == choice["index"]]
        assert mine[0]["text"] == ("Once upon a time" if choice["index"] < 2 else "The end")
        assert "".join(c["text"] for c in mine) == choice["text"]
        if logprobs is None:
            assert all(c.get("logprobs") is None for c in mine)
            continue
        got = {k: [v for c in mine if c.get("logprobs") for v in c["logprobs"][k]] for k in choice["logprobs"]}
        assert got["tokens"] == choice["logprobs"]["tokens"] and got["text_offset"] == choice["logprobs"]["text_offset"]
        assert got["token_logprobs"][0] is None
        assert got["token_logprobs"][1:] == pytest.approx(choice["logprobs"]["token_logprobs"][1:], abs=1e-5)




@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("prompt,n", [(["The end", "The end"], 1), (["The end", "The end", "Once upon a time"], 2),
                                      ([[5, 6, 7], [5, 6, 7]], 1)])
def test_usage_counts_every_prompt_once_and_not_per_choice(served: tuple[FastAPI, TestClient], prompt: list,
                                                           n: int, stream: bool) -> None:
    # a prompt sent twice in a list is two prompts (they were counted once, by content); n choices share theirs
    _, client = served
    body = {"prompt": prompt, "n": n, "max_tokens": 2, "temperature": 0, "ignore_eos": True}
    counts = [len(p) if isinstance(p, list) else client.post("/tokenize", json={"prompt": p}).json()["count"]
              for p in prompt]
    if stream:
        chunks = streamed(client, "/v1/completions", {**body, "stream_options": {"include_usage": True}})
        usage = chunks[-1]["usage"]
    else:
        usage = client.post("/v1/completions", json=body).json()["usage"]
    assert usage == {"prompt_tokens": sum(counts), "completion_tokens": 2 * n * len(prompt),
                     "total_tokens": sum(counts) + 2 * n * len(prompt)}
def test_a_server_with_a_draft_answers_as_without_it_and_counts_the_drafts(
        tiny_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ready_client: ReadyClient) -> None:
    # --draft: a greedy request decoding alone is drafted (here by the model itself: every proposal kept), a
    # sampled one is not; the answers are those of the server without a draft
    monkeypatch.setenv("KILN_HOME", str(tmp_path))
    greedy = {"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0, "ignore_eos": True, "logprobs": 1}
    sampled = {**greedy, "temperature": 1.0, "seed": 5}
    answers = []
    for draft in (None, str(tiny_folder)):
        app = create_app(ServeConfig(models=(str(tiny_folder),), kv_budget_bytes=4 << 20, draft=draft, speculate=3))
        with ready_client(app) as client:
            answers.append([client.post("/v1/completions", json=body).json()["choices"][0] for body in (greedy,
                                                                                                      sampled)])
            metrics = client.get("/metrics").text
        counted = [line for line in metrics.splitlines() if line.startswith("kiln_spec_decode_")]
        if draft is None:
            assert not counted
        else:
            drafted = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in counted}
            # after the first of 12 tokens: 3 proposed and kept, with the next one 5 tokens; 3 more (9); then 2
            assert drafted["kiln_spec_decode_draft_tokens_total"] == 8
            assert drafted["kiln_spec_decode_accepted_tokens_total"] == drafted["kiln_spec_decode_draft_tokens_total"]
    plain, drafted_answers = answers
    for without, with_draft in zip(plain, drafted_answers, strict=True):
        assert with_draft["text"] == without["text"]
        assert with_draft["logprobs"]["token_logprobs"] == pytest.approx(without["logprobs"]["token_logprobs"],
                                                                          abs=1e-4)
