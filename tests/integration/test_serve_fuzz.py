"""Fuzzing the running server from its own OpenAPI schema: no input, however malformed, gets a 5xx.

For every POST route the schema lists, hypothesis starts from a valid body and overwrites any subset of the
schema's fields (also nested message fields) with arbitrary JSON, or replaces the whole body with arbitrary
JSON or bytes. Every answer must be below 500, and every 4xx must carry OpenAI's error envelope. Fields that
only make a valid request slower (max_tokens, n, min_tokens) draw small or absurd values, a generation body left
without any token limit gets max_tokens 2, so the run stays short, and fields whose valid values arbitrary JSON
would seldom hit (logit_bias, token ids, top_k, ...) are drawn near their shape as well.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import Server, kiln_server

JSON_SCALARS = (st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.floats(allow_nan=True)
                | st.text(max_size=40))
JSON = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=12)
COSTLY = {"max_tokens", "max_completion_tokens", "n", "top_logprobs", "logprobs", "best_of", "min_tokens"}
COST = st.integers(-3, 4) | st.integers(10**6, 10**18) | st.floats(0, 5) | JSON_SCALARS
# token ids around the default model's vocabulary (49152), inside and out, and the odd value of the wrong kind
TOKEN_ID = st.integers(-3, 50_000) | st.integers(2**62, 2**64) | JSON_SCALARS
# fields whose valid values arbitrary JSON would seldom hit: drawn near their shape as well as anywhere
SHAPED = {
    "logit_bias": st.dictionaries(TOKEN_ID.map(str) | st.text(max_size=6), st.floats(-150, 150) | JSON_SCALARS,
                                  max_size=4),
    "stop_token_ids": st.lists(TOKEN_ID, max_size=4),
    "tokens": st.lists(TOKEN_ID, max_size=6),
    "top_k": st.integers(-3, 60_000), "min_p": st.floats(-0.5, 1.5), "repetition_penalty": st.floats(-1, 12),
}
VALID = {
    "/v1/completions": {"prompt": "The sea is", "max_tokens": 2},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    "/v1/feedback": {"id": "cmpl-unknown", "rating": 1},
    "/tokenize": {"prompt": "The sea is"},
    "/detokenize": {"tokens": [504, 3575]},
}

GENERATION = {"/v1/completions", "/v1/chat/completions"}


@pytest.fixture(scope="module")
def server(module_tmp: Path) -> Iterator[Server]:
    with kiln_server("--log-requests", tmp=module_tmp, env={"KILN_HOME": str(module_tmp / "home")}) as s:
        yield s


def post_routes(schema: dict[str, Any]) -> dict[str, set[str]]:
    """POST paths with a JSON body -> the names of the body's top-level properties."""
    found = {}
    for path, ops in schema["paths"].items():
        body = ops.get("post", {}).get("requestBody", {}).get("content", {}).get("application/json")
        if body is None:
            continue
        ref = body["schema"].get("$ref", "")
        props = schema["components"]["schemas"][ref.rsplit("/", 1)[-1]].get("properties", {}) if ref else {}
        found[path] = set(props)
    return found


def mutated(valid: dict[str, Any], fields: set[str]) -> st.SearchStrategy[Any]:
    def value(name: str) -> st.SearchStrategy[Any]:
        return COST if name in COSTLY else SHAPED[name] | JSON if name in SHAPED else JSON

    names = sorted(fields | set(valid))
    overrides = st.lists(st.sampled_from(names), max_size=4, unique=True).flatmap(
        lambda keys: st.fixed_dictionaries({k: value(k) for k in keys}))
    edited = overrides.map(lambda o: {**valid, **o})
    dropped = st.sampled_from(sorted(valid)).map(lambda k: {x: v for x, v in valid.items() if x != k})
    messages = st.fixed_dictionaries({"role": JSON | st.sampled_from(["user", "system", "assistant", "tool"]),
                                      "content": JSON}).map(lambda m: {**valid, "messages": [m]})
    return st.one_of(edited, edited, edited, dropped, messages, JSON)


def check(response: httpx.Response, sent: object) -> None:
    assert response.status_code < 500, f"{response.status_code} for {sent!r}: {response.text[:300]}"
    if response.status_code >= 400:
        error = response.json()["error"]
        assert error["message"] and error["type"], response.text


def test_schema_lists_the_api(server: Server) -> None:
    routes = post_routes(server.get("/openapi.json").json())
    assert set(VALID) <= set(routes)
    assert {"prompt", "max_tokens", "logprobs", "echo"} <= routes["/v1/completions"]
    extensions = {"logit_bias", "top_k", "min_p", "repetition_penalty", "min_tokens", "stop_token_ids",
                  "skip_special_tokens"}
    assert extensions <= routes["/v1/completions"] and extensions <= routes["/v1/chat/completions"]
    assert {"prompt", "messages", "add_generation_prompt"} <= routes["/tokenize"]


@pytest.mark.parametrize("path", sorted(VALID))
def test_fuzzed_bodies_get_no_5xx(server: Server, path: str) -> None:
    fields = post_routes(server.get("/openapi.json").json())[path]
    client = httpx.Client(base_url=server.url, timeout=120)

    @settings(max_examples=120, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(body=mutated(VALID[path], fields))
    def run(body: Any) -> None:
        if path in GENERATION and isinstance(body, dict) and body.get("max_tokens") is None \
                and body.get("max_completion_tokens") is None:
            body = {**body, "max_tokens": 2}  # a valid body without a limit would generate up to the context
        try:
            data = json.dumps(body).encode()  # NaN and Infinity go out as the invalid JSON they are
        except (ValueError, OverflowError):
            data = repr(body).encode()
        check(client.post(path, content=data, headers={"Content-Type": "application/json"}), body)

    run()
    assert client.get("/health").status_code == 200


@given(raw=st.binary(max_size=200))
@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_arbitrary_bytes_get_a_4xx(server: Server, raw: bytes) -> None:
    response = httpx.post(server.url + "/v1/chat/completions", content=raw,
                          headers={"Content-Type": "application/json"}, timeout=60)
    check(response, raw)
    assert response.status_code >= 400  # no byte string of this length is a valid chat request
