"""kiln eval --api against fake servers (httpx.MockTransport): scores read from echoed prompt logprobs, prompts
batched, a server without prompt logprobs refused by name, 429 / 503 retried after Retry-After, one-line errors."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kiln.errors import EndpointError
from kiln.evaluate import client as client_module
from kiln.evaluate.client import ApiClient, ApiConfig, retry_wait_s
from kiln.evaluate.loglikelihood import ScoreRequest
from kiln.evaluate.runner import EvalOptions, run
from kiln.evaluate.served import ApiScorer, ServedModel, served_name
from kiln.model.load import LoadedModel

Handler = Callable[[httpx.Request], httpx.Response]
URL = "http://fake:8000"


def token_logprob(token: int) -> float:
    """The fake server's log-probability of a token: known here, so the scores can be checked."""
    return -0.01 - 0.1 * (token % 7)


def echo(prompt: list[int]) -> dict[str, Any]:
    """A choice as a server with prompt logprobs answers it: the prompt's tokens, then one generated token."""
    values = [None] + [token_logprob(t) for t in prompt[1:]] + [-0.5]
    # tokens as vLLM names them with return_tokens_as_token_ids: the same vocabulary as -m's
    tops = [None] + [{f"token_id:{t}": token_logprob(t)} for t in prompt[1:]] + [{"x": -0.5}]
    return {"text": "", "logprobs": {"tokens": [f"token_id:{t}" for t in prompt] + ["x"], "token_logprobs": values,
                                     "top_logprobs": tops}}


def fake_server(choice: Callable[[list[int]], dict[str, Any]] = echo, seen: list[dict[str, Any]] | None = None,
                before: Callable[[], httpx.Response | None] = lambda: None) -> Handler:
    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "default"}]})
        early = before()
        if early is not None:
            return early
        body = json.loads(request.content)
        if seen is not None:
            seen.append(body)
        prompts = body["prompt"]
        return httpx.Response(200, json={"choices": [{"index": i, **choice(p)} for i, p in enumerate(prompts)]})

    return handle


@pytest.fixture
def served(default_model: LoadedModel) -> Iterator[Callable[..., ServedModel]]:
    made: list[ServedModel] = []

    def make(handler: Handler, **config: Any) -> ServedModel:
        client = ApiClient(ApiConfig(URL, **config), transport=httpx.MockTransport(handler))
        made.append(ServedModel(default_model.spec, default_model.tokenizer, default_model.source, client,
                                served_name(client)))
        return made[-1]

    yield make
    for s in made:
        s.close()


@pytest.fixture
def items_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KILN_HOME", str(tmp_path / "home"))
    path = tmp_path / "items.jsonl"
    path.write_text('{"context": "The capital of France is", "choices": [" Paris", " Rome"], "gold": 0}\n'
                    '{"context": "Two plus two is", "choices": [" four", " nine", " ten"], "gold": 0}\n')
    return path


def test_scores_are_the_echoed_logprobs_of_the_continuation(served: Callable[..., ServedModel]) -> None:
    seen: list[dict[str, Any]] = []
    server = served(fake_server(seen=seen), concurrency=2, prompts_per_request=3)
    requests = [ScoreRequest([1, 2, 3], [[4], [5, 6]]), ScoreRequest([7, 8], [[9, 10, 11]]),
                ScoreRequest([1], [[2], [3], [4]])]
    scores = ApiScorer(server).loglikelihoods(requests)
    for req, got in zip(requests, scores, strict=True):
        for cont, s in zip(req.continuations, got, strict=True):
            assert s.logprob == pytest.approx(sum(map(token_logprob, cont))) and s.num_tokens == len(cont)
            assert s.is_greedy  # each token is the only one in its top_logprobs
    # six prompts, three a request; every request as lm-eval's local-completions makes it
    assert [len(b["prompt"]) for b in seen] == [3, 3]
    assert all(b["echo"] is True and b["logprobs"] == 1 and b["max_tokens"] == 1 and b["temperature"] == 0
               and b["model"] == "default" for b in seen)
    assert [p for b in seen for p in b["prompt"]] == [[1, 2, 3, 4], [1, 2, 3, 5, 6], [7, 8, 9, 10, 11], [1, 2],
                                                      [1, 3], [1, 4]]


def no_logprobs(prompt: list[int]) -> dict[str, Any]:
    return {"text": "x", "logprobs": None}


def nulls_in_the_prompt(prompt: list[int]) -> dict[str, Any]:
    return {"text": "x", "logprobs": {"tokens": [str(t) for t in prompt], "token_logprobs": [None] * len(prompt)}}


def only_the_generated_token(prompt: list[int]) -> dict[str, Any]:  # echo ignored: lm-eval's silent trap
    return {"text": "x", "logprobs": {"tokens": ["x"], "token_logprobs": [-0.5], "top_logprobs": [{"x": -0.5}]}}


@pytest.mark.parametrize("choice", [no_logprobs, nulls_in_the_prompt, only_the_generated_token])
def test_a_server_without_prompt_logprobs_is_refused(choice: Callable[[list[int]], dict[str, Any]],
                                                      served: Callable[..., ServedModel], items_file: Path) -> None:
    with pytest.raises(EndpointError) as refused:
        run(served(fake_server(choice)), EvalOptions(task=f"mc:{items_file}"), progress=False)
    message = str(refused.value)
    assert message.startswith(f"{URL} does not return prompt log-probabilities") and "\n" not in message
    assert "cannot score loglikelihood tasks" in message


@pytest.mark.parametrize("status", [429, 503])
def test_busy_answers_are_retried_after_retry_after(status: int, served: Callable[..., ServedModel],
                                                    items_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    monkeypatch.setattr(client_module.asyncio, "sleep", sleep)
    busy = [httpx.Response(status, headers={"Retry-After": "2"}, json={"error": {"message": "queue full"}}),
            httpx.Response(status, json={"error": {"message": "queue full"}})]  # no Retry-After: the backoff
    server = served(fake_server(before=lambda: busy.pop(0) if busy else None), backoff_s=0.25)
    outcome = run(server, EvalOptions(task=f"mc:{items_file}"), progress=False)
    assert waits == [2.0, 0.5]  # the server's wait, then backoff_s doubled for the second retry
    clean = run(served(fake_server()), EvalOptions(task=f"mc:{items_file}"), progress=False)
    assert [r["loglikelihoods"] for r in outcome.records] == [r["loglikelihoods"] for r in clean.records]
    assert outcome.settings["api"] == URL and outcome.settings["api_model"] == "default"


def test_retry_after_as_a_date_and_its_cap() -> None:
    in_an_hour = httpx.Response(429, headers={"Retry-After": "Wed, 21 Oct 2099 07:28:00 GMT"})
    assert retry_wait_s(in_an_hour, 0, 0.5) == client_module.MAX_WAIT_S
    assert retry_wait_s(httpx.Response(503, headers={"Retry-After": "3"}), 5, 0.5) == 3.0
    assert retry_wait_s(httpx.Response(503), 3, 0.5) == 4.0


@pytest.mark.parametrize("status,headers,fix", [
    (401, {}, "pass the server's key with --api-key KEY or KILN_API_KEY"),
    (404, {}, "check that --api is the server's base URL"),
    (400, {}, "check that -m names the model it serves"),
    (500, {}, "the server failed; see its log"),
    (429, {"x-should-retry": "false"}, "overloaded or not ready (asked 1 times)"),  # kiln serve: no wait helps
    (503, {"Retry-After": "0"}, "overloaded or not ready (asked 3 times)"),
])
def test_refusals_are_one_line_naming_url_status_and_fix(status: int, headers: dict[str, str], fix: str,
                                                         served: Callable[..., ServedModel]) -> None:
    answer = httpx.Response(status, headers=headers, json={"error": {"message": "nope,\n twice"}})
    server = served(fake_server(before=lambda: answer), max_retries=2)
    with pytest.raises(EndpointError) as refused:
        ApiScorer(server).loglikelihoods([ScoreRequest([1, 2], [[3]])])
    message = str(refused.value)
    assert message == f"{URL}/v1/completions answered HTTP {status} (nope, twice); {message.split('; ', 1)[1]}"
    assert fix in message and "\n" not in message


def test_the_served_model_is_found_or_named(default_model: LoadedModel) -> None:
    def models(*ids: str) -> httpx.MockTransport:
        return httpx.MockTransport(lambda r: httpx.Response(200, json={"data": [{"id": i} for i in ids]}))

    with ApiClient(ApiConfig(URL), transport=models("a", "b")) as client, pytest.raises(
            EndpointError, match="serves several models \\(a, b\\); pass the one that -m names with --api-model"):
        served_name(client)
    with ApiClient(ApiConfig(URL, model="c"), transport=models("a", "b")) as client, pytest.raises(
            EndpointError, match="does not serve 'c'; it serves a, b"):
        served_name(client)
    with ApiClient(ApiConfig(URL + "/v1/", model="b"), transport=models("a", "b")) as client:
        assert served_name(client) == "b" and client.config.base_url == URL
    missing = httpx.MockTransport(lambda r: httpx.Response(404, json={}))  # a server without /v1/models
    with ApiClient(ApiConfig(URL), transport=missing) as client:
        assert served_name(client) is None


def test_an_unreachable_server_is_one_line(tmp_path: Path, items_file: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    from kiln import cli

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert cli.main(["eval", "--api", f"http://127.0.0.1:{port}", "--task", f"mc:{items_file}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"kiln: error: cannot reach http://127.0.0.1:{port}/v1/models")
    assert cli.main(["eval", "--api", "localhost:8000", "--task", f"mc:{items_file}"]) == 2
    assert "--api 'localhost:8000' is not an http(s) URL" in capsys.readouterr().err
    assert cli.main(["eval", "--api", "http://x", "--task", "wikitext2", "--baseline", "default"]) == 2
    assert "--baseline compares full next-token distributions" in capsys.readouterr().err


def test_a_stalled_server_fails_after_api_timeout_naming_it(items_file: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    from kiln import cli

    with socket.socket() as sock:  # takes connections (the kernel's backlog) and never answers
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        assert cli.main(["eval", "--api", url, "--api-timeout", "0.5", "--task", f"mc:{items_file}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"kiln: error: {url}/v1/models did not answer within 0.5 s") and err.count("\n") == 1
    assert "raise --api-timeout" in err
    assert cli.main(["eval", "--api", url, "--api-timeout", "0", "--task", f"mc:{items_file}"]) == 2
    assert "--api-timeout 0 must be more than 0" in capsys.readouterr().err


def test_api_flags_without_api_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    # --api-key, --api-model and --api-timeout were ignored without a word when --api was missing
    from kiln import cli

    assert cli.main(["eval", "--task", "wikitext2", "--api-timeout", "30", "--api-model", "x"]) == 2
    assert "--api-model, --api-timeout only applies with --api URL" in capsys.readouterr().err


def another_vocabulary(prompt: list[int]) -> dict[str, Any]:
    """A server whose tokenizer is not -m's: the same ids read back as other text."""
    choice = echo(prompt)
    choice["logprobs"]["tokens"] = [f"w{t}" for t in prompt] + ["x"]
    return choice


def test_a_server_with_another_tokenizer_is_refused(served: Callable[..., ServedModel], items_file: Path) -> None:
    with pytest.raises(EndpointError) as refused:
        run(served(fake_server(another_vocabulary)), EvalOptions(task=f"mc:{items_file}"), progress=False)
    message = str(refused.value)
    assert message.startswith(f"{URL} does not tokenize as -m ") and "\n" not in message
    assert "pass -m the model that the server serves" in message


def test_echoed_token_texts_of_the_same_tokenizer_pass(served: Callable[..., ServedModel],
                                                       default_model: LoadedModel) -> None:
    """As kiln serve and vLLM name echoed tokens: each token's decoded text."""
    tok = default_model.tokenizer

    def texts(prompt: list[int]) -> dict[str, Any]:
        choice = echo(prompt)
        choice["logprobs"]["tokens"] = [tok.decode([t], skip_special_tokens=False) for t in prompt] + ["x"]
        return choice

    ids = tok.encode("The capital of France is Paris, and the capital of Italy is Rome.")
    scores = ApiScorer(served(fake_server(texts))).loglikelihoods([ScoreRequest(ids[:5], [ids[5:]])])
    assert scores[0][0].logprob == pytest.approx(sum(map(token_logprob, ids[5:])))


def test_the_vocabulary_is_checked_on_the_first_echo_with_whole_tokens(served: Callable[..., ServedModel],
                                                                        default_model: LoadedModel) -> None:
    """A first prompt whose tokens are all parts of characters cannot be compared: the next one is."""
    tok = default_model.tokenizer
    partial = [t for t in tok.encode("😀日本") if "\ufffd" in tok.decode([t], skip_special_tokens=False)]
    assert len(partial) >= 2
    scorer = ApiScorer(served(fake_server(another_vocabulary), prompts_per_request=1, concurrency=1))
    scorer.loglikelihoods([ScoreRequest(partial[:1], [partial[1:2]])])  # nothing to compare: not refused yet
    with pytest.raises(EndpointError, match="does not tokenize as -m"):
        scorer.loglikelihoods([ScoreRequest([1, 2, 3], [[4]])])


def generating_server(choice: Callable[[list[int]], dict[str, Any]], seen: list[dict[str, Any]]) -> Handler:
    """A server that answers generation (a text per prompt) and, asked to echo, echoes as `choice` does."""
    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "default"}]})
        body = json.loads(request.content)
        seen.append(body)
        prompts = body["prompt"] if isinstance(body["prompt"][0], list) else [body["prompt"]]
        made = [choice(p) if body.get("echo") else {"text": " an answer"} for p in prompts]
        return httpx.Response(200, json={"choices": [{"index": i, **c} for i, c in enumerate(made)]})

    return handle


@pytest.mark.parametrize("vocabulary", ["another", "the same"])
def test_generation_sent_as_token_ids_checks_the_servers_vocabulary(
        served: Callable[..., ServedModel], monkeypatch: pytest.MonkeyPatch, vocabulary: str) -> None:
    """A model without a chat template gets its prompts as -m's token ids: a server with another vocabulary
    would answer other text than the one asked, as the loglikelihood path's check says."""
    from kiln.engine.sampler import SamplingParams
    from kiln.evaluate.served import ApiGenerator
    from kiln.evaluate.tasks.generation import GenItem
    from kiln.model.tokenizer import Tokenizer

    monkeypatch.setattr(Tokenizer, "has_chat_template", property(lambda _: False))
    seen: list[dict[str, Any]] = []
    model = served(generating_server(another_vocabulary if vocabulary == "another" else echo, seen))
    items = [GenItem(i, [{"role": "user", "content": f"Question {i}: what is the capital of France?"}], ["Paris"])
             for i in range(3)]
    generator = ApiGenerator(model)
    params = SamplingParams(temperature=0.0, max_tokens=4)
    if vocabulary == "another":
        with pytest.raises(EndpointError, match=f"^{URL} does not tokenize as -m "):
            generator.answers(items, params)
        return
    assert generator.answers(items, params) == [" an answer"] * 3
    assert generator.answers(items, params) == [" an answer"] * 3
    assert sum(1 for body in seen if body.get("echo")) == 1  # checked once, not per batch


def test_lambada_is_scored_through_a_server_as_in_process(served: Callable[..., ServedModel], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import math

    from kiln.evaluate.multiple_choice import encode_choice
    from kiln.evaluate.tasks.completion import LAMBADA_FILE

    monkeypatch.setenv("KILN_HOME", str(tmp_path / "home"))
    path = tmp_path / "data" / LAMBADA_FILE
    path.parent.mkdir(parents=True)
    pairs = [("The capital of France is", "Paris"), ("Monday, Tuesday, Wednesday,", "Thursday")]
    path.write_text("".join(json.dumps({"context": c, "continuation": w}) + "\n" for c, w in pairs))
    server = served(fake_server())
    outcome = run(server, EvalOptions("lambada_openai", data_dir=tmp_path / "data"), progress=False)
    tok = server.tokenizer
    lls = [sum(map(token_logprob, encode_choice(tok, c, " " + w)[1])) for c, w in pairs]
    assert [r["loglikelihood"] for r in outcome.records] == pytest.approx(lls)
    assert outcome.metrics["ppl"] == pytest.approx(math.exp(-sum(lls) / 2))
    assert outcome.metrics["acc"] == 1.0  # each echoed token is the only one in its top_logprobs
