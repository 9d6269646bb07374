"""The request schemas at the HTTP edge: chat content parts."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from kiln.serve.protocol import ChatCompletionRequest


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
