"""Tools in the prompt: written in the Hermes format for a chat template without tools (SmolLM2's), handed to a
template that renders them itself."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kiln.errors import InvalidParameterError, ModelFormatError
from kiln.model.load import LoadedModel
from kiln.model.tokenizer import Tokenizer

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
HISTORY: list[dict[str, Any]] = [
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"celsius": 21}'},
    {"role": "tool", "tool_call_id": "call_2", "content": "sunny"},
]


def turns(text: str) -> list[tuple[str, str]]:
    """ChatML turns (SmolLM2's template) as (role, content)."""
    return [tuple(t.split("<|im_end|>")[0].split("\n", 1)) for t in text.split("<|im_start|>")[1:]]  # type: ignore[misc]


@pytest.fixture
def tok(default_model: LoadedModel) -> Tokenizer:
    assert not default_model.tokenizer.template_takes_tools  # the case the Hermes format is for
    return default_model.tokenizer


def test_tools_join_the_system_message_or_make_one(tok: Tokenizer) -> None:
    ask = {"role": "user", "content": "Weather in Paris?"}
    own = turns(tok.render_chat([{"role": "system", "content": "Be brief."}, ask], tools=[WEATHER]))
    made = turns(tok.render_chat([ask], tools=[WEATHER]))
    for system, rest in ((own[0], own[1:]), (made[0], made[1:])):
        assert system[0] == "system" and f"<tools>\n{json.dumps(WEATHER)}\n</tools>" in system[1]
        assert '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>' in system[1]
        assert rest == [("user", "Weather in Paris?"), ("assistant", "")]
    assert own[0][1].startswith("Be brief.\n\n# Tools\n") and made[0][1].startswith("# Tools\n")


def test_calls_and_results_are_hermes_blocks(tok: Tokenizer) -> None:
    rendered = turns(tok.render_chat(HISTORY, tools=[WEATHER]))
    assert rendered[1:] == [
        ("user", "Weather in Paris and Rome?"),
        ("assistant", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'),
        # a run of results is one user turn, as Hermes templates write it
        ("user", '<tool_response>\n{"celsius": 21}\n</tool_response>\n<tool_response>\nsunny\n</tool_response>'),
        ("assistant", ""),
    ]
    with_text = [{"role": "assistant", "content": "Let me look.", "tool_calls": [CALL, CALL]}]
    assert turns(tok.render_chat(with_text))[1][1] == "Let me look.\n" + "\n".join(
        ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'] * 2)


def test_without_tools_the_prompt_is_the_templates_own(tok: Tokenizer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"}]
    assert tok.render_chat(messages) == tok.hf.apply_chat_template(messages, tokenize=False,
                                                                   add_generation_prompt=True)
    assert tok.render_chat(messages, tools=[]) == tok.render_chat(messages)


def test_a_template_with_tools_gets_them_and_the_messages_as_they_are(tok: Tokenizer,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    template = ("{% for t in tools or [] %}[tool {{ t.function.name }}]{% endfor %}"
                "{% for m in messages %}<{{ m.role }}>{{ m.content or '' }}"
                "{% for c in m.tool_calls or [] %}[call {{ c.function.name }} {{ c.function.arguments | tojson }}]"
                "{% endfor %}{% endfor %}")
    monkeypatch.setattr(tok.hf, "chat_template", template)
    assert tok.template_takes_tools
    assert tok.render_chat(HISTORY, tools=[WEATHER]) == (
        '[tool get_weather]<user>Weather in Paris and Rome?<assistant>[call get_weather {"city": "Paris"}]'
        '<tool>{"celsius": 21}<tool>sunny')


def test_a_template_that_refuses_the_messages_is_a_one_line_error(tok: Tokenizer,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """As Llama 2's and Mistral's templates refuse roles that do not alternate."""
    template = ("{% for m in messages %}{% if (m.role == 'user') != (loop.index0 % 2 == 0) %}"
                "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
                "{{ m.content }}{% endfor %}")
    monkeypatch.setattr(tok.hf, "chat_template", template)
    assert tok.render_chat([{"role": "user", "content": "hi"}]) == "hi"
    with pytest.raises(InvalidParameterError) as refused:
        tok.render_chat([{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}])
    assert str(refused.value) == ("the model's chat template refused these messages: Conversation roles must "
                                  "alternate user/assistant; change the messages as it asks")


def test_a_template_that_cannot_be_read_names_the_line(tok: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tok.hf, "chat_template", "{% for m in messages %}\n{{ m.content }")
    with pytest.raises(ModelFormatError) as broken:
        tok.render_chat([{"role": "user", "content": "hi"}], fix="send a plain prompt")
    message = str(broken.value)
    assert message.startswith("the model's chat template cannot be read (line 2: ") and "\n" not in message
    assert message.endswith("fix chat_template in its tokenizer_config.json, or send a plain prompt")


@pytest.mark.parametrize("template", [
    "{{ strftime_now_missing('%d %b') }}{% for m in messages %}{{ m.content }}{% endfor %}",
    "{% for m in messages %}{{ m.content.text.strip() }}{% endfor %}",
    "{% for m in messages %}{{ m.content + 1 }}{% endfor %}",  # TypeError, raised by Python inside the template
    "{% for m in messages %}{{ 1 // 0 }}{% endfor %}",
])
def test_a_template_that_fails_is_not_a_refusal_of_the_messages(tok: Tokenizer, monkeypatch: pytest.MonkeyPatch,
                                                                template: str) -> None:
    # an undefined function or attribute is the template's (or this transformers') failure, not raise_exception():
    # the error names the template, and does not ask the caller to change the messages
    monkeypatch.setattr(tok.hf, "chat_template", template)
    with pytest.raises(ModelFormatError) as failed:
        tok.render_chat([{"role": "user", "content": "hi"}], fix="send a plain prompt")
    message = str(failed.value)
    assert message.startswith("the model's chat template failed on these messages (") and "\n" not in message
    assert message.endswith("fix chat_template in its tokenizer_config.json, or send a plain prompt")
