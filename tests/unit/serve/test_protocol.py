"""The request schemas at the HTTP edge: chat content parts, per-choice seeds, stream_options and response_format."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from kiln.engine.sampler import SamplerState
from kiln.serve.protocol import ChatCompletionRequest, CompletionRequest


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
