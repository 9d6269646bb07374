"""vLLM's and llama-server's extensions at the HTTP edge, in process: logit_bias, top_k, min_p,
repetition_penalty, min_tokens, stop_token_ids and skip_special_tokens on both generation endpoints, and
/tokenize and /detokenize. Refusals that need no model run on an app with none loaded; the rest on the tiny
random model (tests/conftest.py), whose greedy choices logit_bias makes predictable."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from kiln.serve.app import create_app
from kiln.serve.protocol import MAX_LOGIT_BIAS_ENTRIES
from kiln.serve.state import ServeConfig

ReadyClient = Callable[[Any], AbstractContextManager[Any]]  # tests/conftest.py's ready_client
COMPLETION, CHAT = {"prompt": "hi"}, {"messages": [{"role": "user", "content": "hi"}]}
EOS = 2  # the tiny model's (tests/conftest.py tiny_folder)
GREEDY = {"temperature": 0, "max_tokens": 3, "ignore_eos": True}


@pytest.fixture(scope="module")
def bare() -> TestClient:
    """An app with no model loaded: the schema's refusals come before any model is needed."""
    return TestClient(create_app(ServeConfig()))


@pytest.fixture(scope="module")
def client(tiny_folder: Path, tmp_path_factory: pytest.TempPathFactory,
           ready_client: ReadyClient) -> Iterator[TestClient]:
    """The tiny model (64-token context), shared by this module's tests: none of them changes the server."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KILN_HOME", str(tmp_path_factory.mktemp("home")))
        app = create_app(ServeConfig(models=(str(tiny_folder),), kv_budget_bytes=4 << 20))
        with ready_client(app) as test_client:
            yield test_client


def refused(response: object, param: str | None, words: str, code: str = "invalid_value") -> None:
    assert response.status_code == 400, response.text  # type: ignore[attr-defined]
    error = response.json()["error"]  # type: ignore[attr-defined]
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error"), error
    assert words in error["message"], error


# --- the schema ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path,body", [("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)])
@pytest.mark.parametrize("field,value,param,words", [
    ("logit_bias", [[5, 1]], "logit_bias", "must be an object of token ids and biases"),
    ("logit_bias", {"abc": 1}, "logit_bias", "key 'abc' is not a token id"),
    ("logit_bias", {"05": 1}, "logit_bias", "key '05' is not a token id"),
    ("logit_bias", {"-1": 1}, "logit_bias", "key '-1' is not a token id"),
    ("logit_bias", {"5": 100.5}, "logit_bias", "logit_bias['5'] is 100.5; a bias must be a number in [-100, 100]"),
    ("logit_bias", {"5": "1"}, "logit_bias", "logit_bias['5'] is '1'"),
    ("logit_bias", {"5": True}, "logit_bias", "logit_bias['5'] is True"),
    ("logit_bias", {str(i): 1 for i in range(MAX_LOGIT_BIAS_ENTRIES + 1)}, "logit_bias", "at most 300"),
    ("top_k", -2, "top_k", "greater than or equal to -1"),
    ("top_k", 2.0, "top_k", "valid integer"),
    ("min_p", 1.5, "min_p", "less than or equal to 1"),
    ("min_p", "0.1", "min_p", "valid number"),
    ("repetition_penalty", 0, "repetition_penalty", "greater than 0"),
    ("repetition_penalty", 10.5, "repetition_penalty", "less than or equal to 10"),
    ("min_tokens", -1, "min_tokens", "greater than or equal to 0"),
    ("min_tokens", True, "min_tokens", "valid integer"),
    ("stop_token_ids", [-1], "stop_token_ids.0", "greater than or equal to 0"),
    ("stop_token_ids", [1.0], "stop_token_ids.0", "valid integer"),
    ("stop_token_ids", 5, "stop_token_ids", "valid list"),
    ("skip_special_tokens", "false", "skip_special_tokens", "valid boolean"),
])
def test_bad_values_are_400_naming_the_field(bare: TestClient, path: str, body: dict, field: str, value: object,
                                             param: str, words: str) -> None:
    refused(bare.post(path, json={**body, field: value}), param, words)


def test_min_tokens_cannot_hold_back_the_end_of_a_grammar(bare: TestClient) -> None:
    refused(bare.post("/v1/chat/completions", json={**CHAT, "min_tokens": 1, "response_format": {
        "type": "json_object"}}), None, "min_tokens cannot be used with a JSON response_format")
    tool = {"type": "function", "function": {"name": "f"}}
    refused(bare.post("/v1/chat/completions", json={**CHAT, "min_tokens": 1, "tools": [tool],
                                                    "tool_choice": "required"}),
            "tool_choice", "min_tokens cannot be used with tool_choice 'required'")


@pytest.mark.parametrize("body,param,words", [
    ({}, "messages", "send a prompt (text) or messages (a chat) to tokenize"),
    ({**COMPLETION, **CHAT}, "messages", "not both"),
    ({**COMPLETION, "add_generation_prompt": False}, "add_generation_prompt", "goes with messages"),
    ({**CHAT, "add_generation_prompt": 1}, "add_generation_prompt", "valid boolean"),
    ({**CHAT, "tokens": [1]}, "tokens", "Extra inputs are not permitted"),
])
def test_a_bad_tokenize_body_is_400(bare: TestClient, body: dict, param: str, words: str) -> None:
    refused(bare.post("/tokenize", json=body), param, words)


def test_bad_detokenize_tokens_are_400(bare: TestClient) -> None:
    refused(bare.post("/detokenize", json={"tokens": [1, "2"]}), "tokens.1", "valid integer")
    refused(bare.post("/detokenize", json={}), "tokens", "Field required")


def test_tokenize_needs_the_api_key(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(hashlib.sha256(b"secret").hexdigest() + "\n")
    app = TestClient(create_app(ServeConfig(api_key_file=keys)))
    for path, body in (("/tokenize", COMPLETION), ("/detokenize", {"tokens": [1]})):
        r = app.post(path, json=body)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text
        # with the key it gets past auth: to the 503 of a server with nothing loaded
        assert app.post(path, json=body, headers={"Authorization": "Bearer secret"}).status_code == 503


# --- against the model ----------------------------------------------------------------------------------------


def completion(client: TestClient, **body: object) -> dict:
    r = client.post("/v1/completions", json={"prompt": "The sea is", **GREEDY, **body})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("path,body", [("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)])
@pytest.mark.parametrize("field,value", [("logit_bias", {"49152": 1}), ("stop_token_ids", [7, 49152])])
def test_token_ids_outside_the_vocabulary_are_400(client: TestClient, path: str, body: dict, field: str,
                                                   value: object) -> None:
    refused(client.post(path, json={**body, field: value, "max_tokens": 2}), field,
            f"{field} names token 49152, outside the model's vocabulary [0, 49152)", code="invalid_token")


@pytest.mark.parametrize("path,body,words", [
    ("/v1/completions", {**COMPLETION, "max_tokens": 3, "min_tokens": 4}, "min_tokens is 4, more than max_tokens (3)"),
    ("/v1/completions", {**COMPLETION, "min_tokens": 17}, "more than the 16 tokens this request may generate"),
    # the field sent is named: this said "max_tokens (2)" and told the client to raise a field it never sent
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 2, "min_tokens": 3},
     "more than max_completion_tokens (2); lower min_tokens or raise max_completion_tokens"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 2, "min_tokens": 3},
     "more than max_tokens (2); lower min_tokens or raise max_tokens"),
    ("/v1/chat/completions", {**CHAT, "min_tokens": 64}, "tokens this request may generate without max_tokens"),
])
def test_min_tokens_over_the_budget_is_400(client: TestClient, path: str, body: dict, words: str) -> None:
    refused(client.post(path, json=body), "min_tokens", words)


def test_logit_bias_bans_and_forces_tokens(client: TestClient) -> None:
    plain = completion(client, logprobs=0)["choices"][0]
    tokens = plain["logprobs"]["tokens"]
    first = client.post("/tokenize", json={"prompt": tokens[0]}).json()["tokens"]
    assert len(first) == 1, first  # the piece is one token again
    banned = completion(client, logit_bias={str(first[0]): -100}, logprobs=0)["choices"][0]
    assert tokens[0] not in banned["logprobs"]["tokens"]
    forced = completion(client, logit_bias={"42": 100}, logprobs=0)["choices"][0]
    piece = client.post("/detokenize", json={"tokens": [42]}).json()["prompt"]
    assert forced["logprobs"]["tokens"] == [piece] * 3
    # logprobs stay the model's own: a forced token is as unlikely as it was
    assert all(lp < -1 for lp in forced["logprobs"]["token_logprobs"])


def test_top_k_1_is_greedy(client: TestClient) -> None:
    greedy = completion(client)["choices"][0]["text"]
    assert completion(client, temperature=1.5, top_k=1, seed=3)["choices"][0]["text"] == greedy
    assert completion(client, temperature=1.0, top_k=-1, min_p=0.0, repetition_penalty=1.0, seed=3)  # all off


def test_min_tokens_and_stop_token_ids_through_the_api(client: TestClient) -> None:
    ends = {"logit_bias": {str(EOS): 100}, "ignore_eos": False}  # EOS first, whatever the model says
    assert completion(client, **ends)["usage"]["completion_tokens"] == 0
    held = completion(client, **ends, min_tokens=2)
    assert held["usage"]["completion_tokens"] == 2 and held["choices"][0]["finish_reason"] == "stop"
    stop = completion(client, logit_bias={"42": 100}, stop_token_ids=[42])
    assert stop["choices"][0]["finish_reason"] == "stop" and stop["usage"]["completion_tokens"] == 0
    chat = client.post("/v1/chat/completions", json={**CHAT, **GREEDY, "logit_bias": {"42": 100},
                                                     "stop_token_ids": [42], "min_tokens": 1})
    assert chat.status_code == 200, chat.text
    choice = chat.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and chat.json()["usage"]["completion_tokens"] == 1


def test_skip_special_tokens_false_keeps_them_in_the_text(client: TestClient) -> None:
    forced = {"logit_bias": {str(EOS): 100}, "max_tokens": 2}
    eos = client.post("/detokenize", json={"tokens": [EOS]}).json()["prompt"]
    assert completion(client, **forced, skip_special_tokens=False)["choices"][0]["text"] == eos * 2
    assert completion(client, **forced)["choices"][0]["text"] == ""


def test_tokenize_and_detokenize_round_trip(client: TestClient) -> None:
    text = "The sea is calm tonight."
    r = client.post("/tokenize", json={"prompt": text})
    assert r.status_code == 200 and r.headers["X-Kiln-Model-Version"], r.text
    body = r.json()
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == 64
    assert client.post("/detokenize", json={"tokens": body["tokens"]}).json() == {"prompt": text}
    # the prompt a completion of the same text feeds the model
    assert completion(client, prompt=text)["usage"]["prompt_tokens"] == body["count"]


def test_tokenize_messages_counts_the_chat_prompt(client: TestClient) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    chat = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1})
    counted = client.post("/tokenize", json={"messages": messages}).json()
    assert chat.json()["usage"]["prompt_tokens"] == counted["count"]
    bare_turns = client.post("/tokenize", json={"messages": messages, "add_generation_prompt": False}).json()
    assert counted["tokens"][:bare_turns["count"]] == bare_turns["tokens"] and bare_turns["count"] < counted["count"]
    text = client.post("/detokenize", json={"tokens": counted["tokens"]}).json()["prompt"]
    assert text.endswith("assistant\n") and "<|im_start|>" in text  # special tokens are kept


def test_tokenize_and_detokenize_refusals(client: TestClient) -> None:
    refused(client.post("/detokenize", json={"tokens": [1, 49152]}), "tokens",
            "tokens names token 49152, outside the model's vocabulary", code="invalid_token")
    missing = client.post("/tokenize", json={"model": "nope", "prompt": "x"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    assert client.post("/detokenize", json={"tokens": []}).json() == {"prompt": ""}
