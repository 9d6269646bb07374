"""The request schemas at the HTTP edge: chat content parts, per-choice seeds, stream_options and response_format."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from kiln.engine.sampler import SamplerState
from kiln.serve.protocol import ChatCompletionRequest, CompletionRequest, TokenizeRequest


def chat(content: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": content}]})


def test_text_parts_are_joined_in_order_with_newlines() -> None:
    parts = [{"type": "text", "text": "hi"}, {"type": "text", "text": " there"}]
    assert chat(parts).chat_messages() == [{"role": "user", "content": "hi\n there"}]
    assert chat("plain").chat_messages() == [{"role": "user", "content": "plain"}]


@pytest.mark.parametrize("parts,words", [
    ([{"type": "text", "text": "x"}, {"type": "image_url", "image_url": {"url": "data:,"}}],
     "part 1 has type 'image_url'"),
    ([{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}], "text only"),
    ([{"type": "text"}], "part 0 must be"),
    ([{"type": "text", "text": "x", "cache_control": {}}], "nothing more"),
    (["x"], "not an object"),
    ([], "empty"),
])
def test_other_parts_are_refused_at_the_content(parts: list[object], words: str) -> None:
    with pytest.raises(ValidationError) as refused:
        chat(parts)
    error = refused.value.errors()[0]
    assert error["loc"] == ("messages", 0, "content") and words in error["msg"], error


@pytest.mark.parametrize("seed", [2**63 - 1, -(2**63)])
def test_choices_at_the_seed_limits_draw_distinct_streams(seed: int) -> None:
    # choice i is seeded seed + i: past 2**63 - 1 that is still a valid seed (the sampler hashes one outside
    # [0, 2**32) whole, engine/sampler.torch_seed), so no two choices share a stream
    body = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}], "seed": seed,
                                                 "n": 8, "temperature": 0.8})
    draws = {tuple(torch.rand(4, generator=SamplerState(body.sampling(8, None, seed_offset=i), [1], 10).generator)
                   .tolist()) for i in range(body.n)}
    assert len(draws) == body.n


@pytest.mark.parametrize("schema,body", [
    (CompletionRequest, {"prompt": "hi"}),
    (ChatCompletionRequest, {"messages": [{"role": "user", "content": "hi"}]}),
])
@pytest.mark.parametrize("stream", [{}, {"stream": False}])
def test_stream_options_without_a_stream_are_refused(schema: type, body: dict, stream: dict) -> None:
    with pytest.raises(ValidationError) as refused:
        schema.model_validate({**body, **stream, "stream_options": {"include_usage": True}})
    error = refused.value.errors()[0]
    assert error["loc"] == ("stream_options",) and "only allowed when stream is true" in error["msg"], error
    assert schema.model_validate({**body, "stream": True, "stream_options": {"include_usage": True}}).stream_options
    assert schema.model_validate({**body, "stream_options": None}).stream_options is None


@pytest.mark.parametrize(("response_format", "message"), [
    ({"type": "json_schema"}, "needs a json_schema"),
    ({"type": "text", "json_schema": {"name": "x"}}, "goes with type json_schema"),
    ({"type": "xml"}, "json_object"),
])
def test_response_format_is_checked_at_the_edge(response_format: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}],
                                              "response_format": response_format})


def test_response_format_schema_and_ignore_eos() -> None:
    body = {"messages": [{"role": "user", "content": "hi"}]}
    named = {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "array"}}}
    assert ChatCompletionRequest.model_validate({**body, "response_format": named}).response_format.schema_or_none() \
        == {"type": "array"}
    assert ChatCompletionRequest.model_validate({**body, "response_format": {"type": "json_object"}}) \
        .response_format.schema_or_none() == {"type": "object"}
    assert ChatCompletionRequest.model_validate({**body, "response_format": {"type": "text"}}) \
        .response_format.schema_or_none() is None
    with pytest.raises(ValidationError, match="ignore_eos cannot be used"):
        ChatCompletionRequest.model_validate({**body, "ignore_eos": True, "response_format": {"type": "json_object"}})


# --- tools ----------------------------------------------------------------------------------------------

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
NOOP = {"type": "function", "function": {"name": "noop"}}
ASK = {"messages": [{"role": "user", "content": "Weather in Paris?"}]}


def named(name: str) -> dict:
    return {"type": "function", "function": {"name": name}}


@pytest.mark.parametrize("extra,mode,forced", [
    ({}, "none", []),
    ({"tools": [WEATHER, NOOP]}, "auto", []),  # auto is the default with tools
    ({"tools": [WEATHER], "tool_choice": "auto"}, "auto", []),
    ({"tools": [WEATHER], "tool_choice": "none"}, "none", []),
    ({"tools": [WEATHER, NOOP], "tool_choice": "required"}, "forced", ["get_weather", "noop"]),
    ({"tools": [WEATHER, NOOP], "tool_choice": named("noop")}, "forced", ["noop"]),
    ({"tools": [], "tool_choice": "none"}, "none", []),  # [] is no tools
    ({"tool_choice": "none"}, "none", []),
])
def test_tool_choice_decides_what_the_tools_do(extra: dict, mode: str, forced: list[str]) -> None:
    body = ChatCompletionRequest.model_validate({**ASK, **extra})
    assert body.tool_mode() == mode and [t.function.name for t in body.forced_tools()] == forced
    assert body.parallel_tool_calls is True


@pytest.mark.parametrize("extra,loc,words", [
    ({"tools": [{"type": "function", "function": {"name": "get weather"}}]}, ("tools", 0, "function", "name"),
     "must be 1 to 64 letters, digits, '_' or '-'"),
    ({"tools": [{"type": "function", "function": {"name": "x" * 65}}]}, ("tools", 0, "function", "name"),
     "must be 1 to 64"),
    ({"tools": [WEATHER, WEATHER]}, ("tools",), "['get_weather'] are given more than once"),
    ({"tools": [{"type": "retrieval", "function": {"name": "a"}}]}, ("tools", 0, "type"), "'function'"),
    ({"tools": [{"type": "function", "function": {"name": "a", "parameters": {"type": "array"}}}]},
     ("tools", 0, "function", "parameters"), "give it type 'object'"),
    ({"tools": [WEATHER], "tool_choice": named("get_time")}, ("tool_choice",),
     "names 'get_time', which is not among the tools (get_weather); name one of them"),
    ({"tool_choice": "required"}, ("tool_choice",), "needs tools; send tools or drop tool_choice"),
    ({"tool_choice": named("get_weather")}, ("tool_choice",), "needs tools"),
    ({"tools": [], "tool_choice": "auto"}, ("tool_choice",), "needs tools"),
    ({"tools": [WEATHER], "tool_choice": "always"}, ("tool_choice",), "must be 'none', 'auto', 'required' or"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "get_weather"}}, ("tool_choice",),
     "must be 'none', 'auto', 'required' or"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, ("tool_choice",),
     "and a JSON response_format both hold the output to a grammar; pick one"),
    ({"tools": [WEATHER], "tool_choice": named("get_weather"), "ignore_eos": True}, ("tool_choice",),
     "ignore_eos cannot be used"),
])
def test_tools_and_tool_choice_are_checked_at_the_edge(extra: dict, loc: tuple, words: str) -> None:
    with pytest.raises(ValidationError) as refused:
        ChatCompletionRequest.model_validate({**ASK, **extra})
    error = refused.value.errors()[0]
    assert error["loc"] == loc and words in error["msg"], error


def test_auto_goes_with_a_json_response_format() -> None:
    # nothing to pick between: auto holds nothing, the JSON format holds the output
    body = ChatCompletionRequest.model_validate({**ASK, "tools": [WEATHER], "response_format": {"type": "json_object"}})
    assert body.tool_mode() == "auto"


CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}


def test_calls_and_results_in_the_history() -> None:
    body = ChatCompletionRequest.model_validate({"messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [CALL, {**CALL, "function": {
            "name": "get_weather", "arguments": "not json"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "21 C"}]},
    ], "tools": [WEATHER]})
    assert body.chat_messages()[1:] == [
        # templates write arguments with tojson: an object, or the text as sent when it is not JSON
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "not json"}}]},
        {"role": "tool", "content": "21 C", "tool_call_id": "call_1"},
    ]


@pytest.mark.parametrize("message,words", [
    ({"role": "user", "content": None}, "a user message needs content"),
    ({"role": "user"}, "a user message needs content"),
    ({"role": "assistant", "content": None}, "an assistant message needs content (only an assistant message with "
                                             "tool_calls may leave it null)"),  # it read "a assistant message"
    ({"role": "tool", "content": "21 C"}, "needs the tool_call_id"),
    ({"role": "user", "content": "x", "tool_call_id": "call_1"}, "goes with role 'tool'"),
    ({"role": "user", "content": "x", "tool_calls": [CALL]}, "a user message cannot carry them"),
])
def test_tool_fields_go_with_their_roles(message: dict, words: str) -> None:
    with pytest.raises(ValidationError) as refused:
        ChatCompletionRequest.model_validate({"messages": [message]})
    error = refused.value.errors()[0]
    assert error["loc"] == ("messages", 0) and words in error["msg"], error


@pytest.mark.parametrize("body", [ChatCompletionRequest, TokenizeRequest])
@pytest.mark.parametrize("history", [
    [],  # a result with no call before it
    [{"role": "assistant", "content": None, "tool_calls": [CALL]}],  # a call, but with another id
])
def test_a_result_must_answer_an_earlier_call(body: type, history: list) -> None:
    messages = [{"role": "user", "content": "hi"}, *history, {"role": "tool", "tool_call_id": "call_9", "content": "x"}]
    with pytest.raises(ValidationError) as refused:
        body.model_validate({"messages": messages})
    error = refused.value.errors()[0]
    assert error["loc"] == ("messages",) and "tool call 'call_9', which no earlier assistant" in error["msg"], error


# --- vLLM's sampling extensions -------------------------------------------------------------------------------


def test_the_extensions_reach_the_sampler_and_their_defaults_change_nothing() -> None:
    body = {"messages": [{"role": "user", "content": "hi"}]}
    plain = ChatCompletionRequest.model_validate(body).sampling(8, None)
    assert (plain.top_k, plain.min_p, plain.repetition_penalty, plain.logit_bias, plain.min_tokens,
            plain.stop_token_ids, plain.skip_special_tokens) == (0, 0.0, 1.0, (), 0, frozenset(), True)
    extended = ChatCompletionRequest.model_validate({
        **body, "top_k": 5, "min_p": 0.1, "repetition_penalty": 1.2, "logit_bias": {"7": -100, "0": 2.5},
        "min_tokens": 2, "stop_token_ids": [3, 3, 9], "skip_special_tokens": False}).sampling(8, None)
    assert (extended.top_k, extended.min_p, extended.repetition_penalty, extended.logit_bias, extended.min_tokens,
            extended.stop_token_ids, extended.skip_special_tokens) == (
        5, 0.1, 1.2, ((7, -100.0), (0, 2.5)), 2, frozenset({3, 9}), False)
    for off in (-1, 0):  # vLLM's two ways to say no top-k
        assert CompletionRequest.model_validate({"prompt": "x", "top_k": off}).sampling(8, None).top_k == 0
