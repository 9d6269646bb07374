"""The served API through the official openai client: chat, streaming, completions, logprobs, validation,
stream integrity, feedback, guardrails, tool calls, and lm-evaluation-harness's local-completions against it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from kiln import settings

from .conftest import KILN, Server, kiln_server

GUARDRAILS = """
[input]
blocklist = ["forbidden topic"]
[output]
blocklist = ["zzzqqq"]
pii = true
"""


@pytest.fixture(scope="module")
def server(module_tmp: Path) -> Iterator[Server]:
    rails = module_tmp / "guardrails.toml"
    rails.write_text(GUARDRAILS)
    env = {"KILN_HOME": str(module_tmp / "home")}
    with kiln_server("--log-requests", "--guardrails", str(rails), env=env, tmp=module_tmp) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def ask(client: openai.OpenAI, text: str, **kw: object) -> object:
    return client.chat.completions.create(model="default", messages=[{"role": "user", "content": text}],
                                          **kw)  # type: ignore[call-overload]


def test_models_and_probes(server: Server, client: openai.OpenAI) -> None:
    assert server.get("/health").json() == {"status": "ok"}
    assert server.get("/ready").status_code == 200
    assert [m.id for m in client.models.list().data] == ["default"]
    assert client.models.retrieve("default") == client.models.list().data[0]
    with pytest.raises(openai.NotFoundError) as refused:
        client.models.retrieve("nope")
    assert refused.value.code == "model_not_found" and refused.value.body["param"] == "model"  # type: ignore[index]


def test_chat(client: openai.OpenAI) -> None:
    reply = ask(client, "What is the capital of France?", temperature=0, max_tokens=20)
    assert "Paris" in reply.choices[0].message.content and reply.choices[0].finish_reason == "stop"
    assert reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens > 0


def test_chat_content_parts_are_the_joined_text(client: openai.OpenAI) -> None:
    parts = [{"type": "text", "text": "What is the capital"}, {"type": "text", "text": "of France?"}]
    reply = client.chat.completions.create(model="default", messages=[{"role": "user", "content": parts}],
                                           temperature=0, max_tokens=8)
    plain = ask(client, "What is the capital\nof France?", temperature=0, max_tokens=8)
    assert reply.choices[0].message.content == plain.choices[0].message.content
    assert reply.usage.prompt_tokens == plain.usage.prompt_tokens


def test_streaming_matches_the_non_streamed_text(client: openai.OpenAI) -> None:
    kw = dict(temperature=0, max_tokens=40)
    full = ask(client, "Write two sentences about the sea.", **kw).choices[0].message.content
    chunks = list(ask(client, "Write two sentences about the sea.", stream=True,
                      stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")


def test_stream_ends_with_done(server: Server) -> None:
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                      json={"prompt": "Once upon a time", "max_tokens": 12, "stream": True}) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and all(json.loads(line[6:]) for line in lines[:-1])


def test_completions_n_stop_seed(client: openai.OpenAI) -> None:
    out = client.completions.create(model="default", prompt="List: one, two,", max_tokens=12, temperature=0.9,
                                    n=2, seed=7, stop=[","])
    again = client.completions.create(model="default", prompt="List: one, two,", max_tokens=12, temperature=0.9,
                                      n=2, seed=7, stop=[","])
    assert [c.text for c in out.choices] == [c.text for c in again.choices]
    assert all("," not in c.text for c in out.choices) and len(out.choices) == 2


def test_chat_logprobs(client: openai.OpenAI) -> None:
    reply = ask(client, "Say yes.", temperature=0, max_tokens=3, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    first = content[0]
    assert len(first.top_logprobs) == 3 and first.logprob == pytest.approx(max(t.logprob for t in first.top_logprobs))


def test_echo_prompt_logprobs(client: openai.OpenAI, server: Server) -> None:
    out = client.completions.create(model="default", prompt="The capital of France is Paris", max_tokens=1,
                                    temperature=0, echo=True, logprobs=1)
    lp = out.choices[0].logprobs
    assert lp.token_logprobs[0] is None and len(lp.tokens) == out.usage.prompt_tokens + 1
    assert out.choices[0].text.startswith("The capital of France is Paris")
    assert all(v is not None and v <= 0 for v in lp.token_logprobs[1:])
    assert lp.token_logprobs[-2] == pytest.approx(max(lp.top_logprobs[-2].values()))  # " Paris" is the top choice
    ids = httpx.post(server.url + "/v1/completions", json={"prompt": [504, 3575], "max_tokens": 1}).json()
    assert ids["usage"]["prompt_tokens"] == 2


def test_tokenize_counts_the_chat_prompt_and_detokenize_inverts_it(server: Server, client: openai.OpenAI) -> None:
    question = "What is the capital of France?"
    reply = ask(client, question, temperature=0, max_tokens=1)
    counted = server.post("/tokenize", {"model": "default", "messages": [{"role": "user", "content": question}]})
    assert counted.status_code == 200, counted.text
    assert counted.json()["count"] == reply.usage.prompt_tokens and counted.json()["max_model_len"] == 8192
    text = "The capital of France is Paris."
    tokens = server.post("/tokenize", {"prompt": text}).json()["tokens"]
    assert server.post("/detokenize", {"model": "default", "tokens": tokens}).json() == {"prompt": text}


def test_logit_bias_and_stop_token_ids_through_the_openai_client(server: Server, client: openai.OpenAI) -> None:
    question = "What is the capital of France?"
    plain = ask(client, question, temperature=0, max_tokens=3, logprobs=True).choices[0].logprobs.content
    ids = [server.post("/tokenize", {"prompt": t.token}).json()["tokens"] for t in plain]
    assert all(len(i) == 1 for i in ids), ids  # each greedy piece is one token again
    banned = ask(client, question, temperature=0, max_tokens=3, logprobs=True, logit_bias={str(ids[0][0]): -100})
    assert banned.choices[0].logprobs.content[0].token != plain[0].token
    stopped = ask(client, question, temperature=0, max_tokens=3, extra_body={"stop_token_ids": [ids[1][0]]})
    assert stopped.choices[0].message.content == plain[0].token and stopped.choices[0].finish_reason == "stop"
    r = server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": question}], "top_k": 0.5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_k"


@pytest.mark.parametrize("body,param", [
    ({"messages": [{"role": "user", "content": "x"}], "temperature": -1}, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "top_p": 0}, "top_p"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 0}, "n"),
    ({"messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ({"messages": "hello"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "frobnicate": 1}, "frobnicate"),
    ({"messages": [{"role": "user", "content": "x"}], "seed": 2**64}, "seed"),  # over 64 bits stopped the engine
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]},
     "messages.0.content"),  # text only
])
def test_bad_fields_are_400_with_param(server: Server, body: dict, param: str) -> None:
    r = server.post("/v1/chat/completions", body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert "/" not in error["message"] and "Traceback" not in r.text


def test_non_object_body_and_unknown_model(server: Server) -> None:
    r = httpx.post(server.url + "/v1/completions", content=b"[1, 2]", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    r = httpx.post(server.url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400
    r = server.post("/v1/completions", {"model": "nope", "prompt": "hi"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = server.post("/v1/completions", {"prompt": [999999999]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_token"


def test_context_limit_names_the_numbers(server: Server) -> None:
    r = server.post("/v1/completions", {"prompt": [42] * 100, "max_tokens": 8100})
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    assert "100 tokens" in message and "8100" in message and "8192" in message
    assert r.json()["error"]["param"] == "max_tokens" and r.json()["error"]["code"] == "context_length_exceeded"


@pytest.mark.parametrize("extra", [{}, {"max_tokens": 5}])
def test_a_prompt_over_the_context_is_context_length_exceeded(server: Server, extra: dict) -> None:
    # without max_tokens this was a 400 with neither code nor param (the engine's refusal)
    r = server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 9000}], **extra})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages", error
    assert "8192" in error["message"]
    r = server.post("/v1/completions", {"prompt": [42] * 8192, **extra})  # exactly the context: no room to generate
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert r.json()["error"]["param"] == "prompt"


def test_feedback_is_stored_redacted_and_exported(server: Server, client: openai.OpenAI, module_tmp: Path) -> None:
    reply = ask(client, "My email is ada@example.com, say hi.", temperature=0, max_tokens=8)
    r = server.post("/v1/feedback", {"id": reply.id, "rating": 5, "comment": "call me at 555-123-4567"})
    assert r.status_code == 200
    assert server.post("/v1/feedback", {"id": "nope", "rating": 1}).status_code == 404
    out = module_tmp / "feedback.jsonl"
    env = {**os.environ, "KILN_HOME": str(module_tmp / "home")}
    subprocess.run([KILN, "feedback", "export", "-o", str(out)], check=True, env=env, capture_output=True)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    mine = next(r for r in records if r["id"] == reply.id)
    assert mine["rating"] == 5 and "[PHONE]" in mine["comment"]
    assert "ada@example.com" not in json.dumps(mine) and "[EMAIL]" in json.dumps(mine)


def test_guardrails_block_with_400_and_a_metric(server: Server) -> None:
    before = server.metric("kiln_guardrail_blocks_total")
    r = server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Tell me the forbidden topic"}]})
    assert r.status_code == 400 and r.json()["error"]["type"] == "guardrail_error"
    assert "blocklist" in r.json()["error"]["message"]
    assert server.metric("kiln_guardrail_blocks_total") == before + 1


def test_output_guardrail_covers_completions(server: Server) -> None:
    # the greedy continuation repeats the e-mail address: the output rule (pii) must refuse it on /v1/completions
    # as it does on /v1/chat/completions
    prompt = "Contact: ada@example.com\n" * 3 + "Contact:"
    r = server.post("/v1/completions", {"prompt": prompt, "max_tokens": 8, "temperature": 0})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "output_blocked" and "ada@" not in r.text


def test_output_guardrail_stops_a_stream_before_the_blocked_text(server: Server) -> None:
    # the same continuation streamed: the choice ends with finish_reason "content_filter" and none of the
    # address goes out; the stream itself still ends properly
    before = server.metric("kiln_guardrail_blocks_total")
    prompt = "Contact: ada@example.com\n" * 3 + "Contact:"
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                      json={"prompt": prompt, "max_tokens": 8, "temperature": 0, "stream": True}) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "content_filter"
    assert "ada@" not in "".join(c["choices"][0]["text"] for c in chunks)
    assert server.metric("kiln_guardrail_blocks_total") == before + 1


def test_response_format_holds_the_output_to_a_json_schema(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"enum": ["France", "Spain"]}},
              "required": ["city", "country"], "additionalProperties": False}
    reply = ask(client, "Which is the capital of France? Answer in JSON.", temperature=0, max_tokens=48,
                response_format={"type": "json_schema", "json_schema": {"name": "capital", "schema": schema}})
    answer = json.loads(reply.choices[0].message.content)
    assert set(answer) == {"city", "country"} and answer["country"] in ("France", "Spain")
    assert reply.choices[0].finish_reason == "stop"
    streamed = ask(client, "Which is the capital of France? Answer in JSON.", temperature=0, max_tokens=48,
                   stream=True, response_format={"type": "json_schema",
                                                 "json_schema": {"name": "capital", "schema": schema}})
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == reply.choices[0].message.content
    plain = client.completions.create(model="default", prompt="JSON for the capital of France:\n", max_tokens=32,
                                      temperature=0, extra_body={"response_format": {"type": "json_object"}})
    assert isinstance(json.loads(plain.choices[0].text), dict)


def test_response_format_with_a_bad_schema_is_400(server: Server) -> None:
    r = server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "[a-"}}}})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "response_format" and error["code"] == "invalid_schema" and "unclosed" in error["message"]
    r = server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                             "response_format": {"type": "json_schema"}})
    assert r.status_code == 400 and "needs a json_schema" in r.text


def test_metrics_cover_the_requests(server: Server) -> None:
    text = server.get("/metrics").text
    for name in ("kiln_requests_total", "kiln_time_to_first_token_seconds", "kiln_time_per_output_token_seconds",
                 "kiln_request_duration_seconds", "kiln_queue_depth", "kiln_running_sequences",
                 "kiln_kv_cache_usage_ratio", "kiln_rejections_total", "kiln_client_disconnects_total",
                 "kiln_prompt_tokens_total", "kiln_generation_tokens_total"):
        assert name in text
    assert server.metric("kiln_generation_tokens_total") > 0


def test_request_id_is_echoed(server: Server) -> None:
    r = server.get("/v1/models", headers={"X-Request-Id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    assert "x-kiln-model-version" in server.post("/v1/completions", {"prompt": "hi", "max_tokens": 1}).headers


ARC_TASK = """task: kiln_arc_easy
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices.label.index(answerKey)}}}}"
doc_to_choice: "{{{{choices.text}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def test_lm_eval_through_the_server_matches_in_process_eval(server: Server, module_tmp: Path,
                                                             default_model: object) -> None:
    source = settings.data_dir() / "arc" / "ARC-Easy-Test.jsonl"
    if not source.is_file():
        pytest.skip(f"ARC-Easy not found at {source}; set KILN_DATA_DIR")
    limit = 16  # each item's log-likelihoods are compared below, so a few items check more than a count
    rows = [json.loads(line) for line in source.read_text().splitlines()[:limit]]
    data = module_tmp / "arc_easy.jsonl"
    data.write_text("".join(json.dumps({"question": r["question"]["stem"], "answerKey": r["answerKey"],
                                        "choices": {"text": [c["text"] for c in r["question"]["choices"]],
                                                    "label": [c["label"] for c in r["question"]["choices"]]}}) + "\n"
                            for r in rows))
    tasks = module_tmp / "tasks"
    tasks.mkdir(exist_ok=True)
    (tasks / "kiln_arc_easy.yaml").write_text(ARC_TASK.format(data=data))
    folder = default_model.folder  # type: ignore[attr-defined]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(module_tmp / "hf-datasets")}
    out = module_tmp / "lmeval"
    proc = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args",
         f"base_url={server.url}/v1/completions,model=default,tokenizer={folder},tokenizer_backend=huggingface,"
         "tokenized_requests=True,num_concurrent=1,max_retries=1",
         "--tasks", "kiln_arc_easy", "--include_path", str(tasks), "--limit", str(limit), "--output_path", str(out),
         "--log_samples"],
        capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    served = results["results"]["kiln_arc_easy"]["acc,none"]
    samples = module_tmp / "kiln-samples.jsonl"
    kiln_eval = subprocess.run([KILN, "eval", "--task", "arc_easy", "--limit", str(limit), "--json",
                                "--samples", str(samples)], env={
        **os.environ, "KILN_HOME": str(module_tmp / "home")}, capture_output=True, text=True, check=True)
    in_process = json.loads(kiln_eval.stdout)["acc"]
    assert served == pytest.approx(in_process, abs=1e-9), (served, in_process)
    # item by item: the server's log-likelihood of every choice is the in-process scorer's
    theirs = {}
    for line in next(out.rglob("samples_kiln_arc_easy_*.jsonl")).read_text().splitlines():
        doc = json.loads(line)
        theirs[int(doc["doc_id"])] = [float(resp[0]) for resp in doc["filtered_resps"]]
    ours = {int(r["index"]): r["loglikelihoods"] for r in map(json.loads, samples.read_text().splitlines())}
    assert sorted(theirs) == sorted(ours) == list(range(limit))
    for i in range(limit):
        assert theirs[i] == pytest.approx(ours[i], rel=1e-3, abs=1e-3), (i, theirs[i], ours[i])


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME_TOOL = {"type": "function", "function": {
    "name": "get_time", "description": "Get the local time in a timezone",
    "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}}, "required": ["timezone"]}}}


def check_weather_arguments(arguments: str) -> None:
    """The arguments parse as JSON and match WEATHER_TOOL's schema (jsonschema is not installed: checked by hand)."""
    parsed = json.loads(arguments)
    assert set(parsed) == {"city", "unit"} and isinstance(parsed["city"], str), parsed
    assert parsed["unit"] in ("celsius", "fahrenheit"), parsed


def test_tool_choice_required_gives_a_call_through_the_openai_client(client: openai.OpenAI) -> None:
    kw = dict(tools=[WEATHER_TOOL, TIME_TOOL], tool_choice="required", parallel_tool_calls=False, temperature=0,
              max_tokens=48)
    reply = ask(client, "What is the weather in Paris?", **kw)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name in ("get_weather", "get_time")
    if call.function.name == "get_weather":
        check_weather_arguments(call.function.arguments)
    else:
        assert isinstance(json.loads(call.function.arguments)["timezone"], str)
    assert reply.usage.completion_tokens > 0
    # streamed: the same call, whole in one delta, and the same finish
    chunks = list(ask(client, "What is the weather in Paris?", stream=True, **kw))
    deltas = [c.choices[0] for c in chunks if c.choices]
    calls = [t for d in deltas for t in d.delta.tool_calls or ()]
    assert [(t.index, t.function.name, t.function.arguments) for t in calls] == \
        [(0, call.function.name, call.function.arguments)]
    assert "".join(d.delta.content or "" for d in deltas) == "" and deltas[-1].finish_reason == "tool_calls"


def test_a_named_tool_is_called_with_arguments_that_match_its_schema(server: Server) -> None:
    r = server.post("/v1/chat/completions", {
        "messages": [{"role": "user", "content": "Is it raining in Rome?"}], "tools": [TIME_TOOL, WEATHER_TOOL],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "temperature": 0, "max_tokens": 96})  # parallel_tool_calls left true: a named tool is still called once
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    [call] = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    check_weather_arguments(call["function"]["arguments"])


def test_auto_tools_with_a_text_answer_give_content(client: openai.OpenAI) -> None:
    # the small model answers in words: that is the content, with no calls
    reply = ask(client, "Say hello.", tools=[WEATHER_TOOL], temperature=0, max_tokens=8)
    message = reply.choices[0].message
    assert message.content and not message.tool_calls and reply.choices[0].finish_reason in ("stop", "length")


def test_a_tool_call_in_the_history_is_taken(client: openai.OpenAI) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                             "arguments": '{"city": "Paris", "unit": "celsius"}'}}
    reply = client.chat.completions.create(model="default", tools=[WEATHER_TOOL], temperature=0, max_tokens=4,
                                           tool_choice="none", messages=[
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"celsius": 21, "sky": "clear"}'}])
    assert reply.choices[0].message.content is not None and reply.usage.prompt_tokens > 40
