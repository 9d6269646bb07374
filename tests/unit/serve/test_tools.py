"""Tool calls read out of generated text: well-formed blocks naming given tools are calls, anything else is content
(never an error), and a stream, fed in any pieces, gives what the whole text gives."""

from __future__ import annotations

import json

import pytest

from kiln.serve.tools import ToolCallParser, split_tool_calls

NAMES = ("get_weather", "get_time")


def block(name: str = "get_weather", arguments: str = '{"city": "Paris"}') -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call>'


def calls_of(text: str, is_forced: bool = False) -> tuple[str | None, list[tuple[str, dict]]]:
    content, calls = split_tool_calls(text, NAMES, is_forced)
    return content, [(c.name, json.loads(c.arguments)) for c in calls]


PARIS = ("get_weather", {"city": "Paris"})


@pytest.mark.parametrize("text,expected", [
    (block(), (None, [PARIS])),
    (block() + "\n" + block("get_time", '{"tz": "UTC"}') + "\n", (None, [PARIS, ("get_time", {"tz": "UTC"})])),
    ("Let me check.\n" + block(), ("Let me check.", [PARIS])),
    ('<tool_call>{"name":"get_weather","arguments":{"city":"Paris"}}</tool_call>', (None, [PARIS])),  # no newlines
    (block() + "\nDone.", ("Done.", [PARIS])),
])
def test_well_formed_blocks_are_calls(text: str, expected: tuple) -> None:
    assert calls_of(text) == expected


@pytest.mark.parametrize("text", [
    "The weather in Paris is sunny.  \n",
    "",
    "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Par",  # cut short
    "Here:\n<tool_call>\n{not json}\n</tool_call>\nbye",
    block("rm_rf"),  # not a given tool
    block(arguments='"Paris"'),  # arguments not an object
    '<tool_call>\n{"name": "get_weather", "arguments": {}, "extra": 1}\n</tool_call>',
    "a < b and <tool_ but no call",
])
def test_anything_else_is_the_text_itself(text: str) -> None:
    assert calls_of(text) == (text, [])


def test_a_malformed_block_beside_a_good_one_stays_text() -> None:
    bad = "<tool_call>\n{oops}\n</tool_call>"
    assert calls_of(block() + "\n" + bad) == (bad, [PARIS])


def test_a_forced_output_cut_short_drops_its_open_block() -> None:
    cut = block() + "\n" + block("get_time")[:30]
    assert calls_of(cut, is_forced=True) == (None, [PARIS])
    assert calls_of(cut) == (block("get_time")[:30], [PARIS])  # free text: the model's own words


@pytest.mark.parametrize("cut", ["\n<tool_call", "\n<tool_", "\n<", "\n"])
def test_a_forced_output_cut_in_the_next_calls_tag_drops_it(cut: str) -> None:
    # max_tokens ran out while the grammar had the next call's opening tag begun: no text is the model's there
    assert calls_of(block() + cut, is_forced=True) == (None, [PARIS])
    parser = ToolCallParser(NAMES, is_forced=True)
    content, calls = parser.feed(block() + cut)
    assert (content + parser.finish()[0], len(calls)) == ("", 1)


@pytest.mark.parametrize("text", [
    "Let me check.\n" + block() + "\n" + block("get_time", "{}") + "\nDone.\n",
    "Here:\n<tool_call>\n{not json}\n</tool_call>\nbye <tool",
    "plain text with trailing spaces   ",
    block() + "\n" + block()[:25],
])
@pytest.mark.parametrize("size", [1, 3, 7])
def test_streamed_pieces_give_the_whole_texts_answer(text: str, size: int) -> None:
    parser = ToolCallParser(NAMES)
    content, calls = "", []
    for start in range(0, len(text), size):
        piece, done = parser.feed(text[start:start + size])
        content += piece
        calls += done
        assert "<tool_call" not in piece or "{not json}" in text  # no tag goes out as text while it may be a call
    content += parser.finish()[0]
    whole_content, whole_calls = split_tool_calls(text, NAMES)
    assert ((content or None) if calls else content) == whole_content
    assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in whole_calls]


def test_each_call_has_its_own_id_in_openais_shape() -> None:
    _, calls = split_tool_calls(block() + block(), NAMES)
    first, second = calls[0].to_dict(), calls[1].to_dict(index=1)
    assert first["id"] != second["id"] and first["id"].startswith("call_")
    assert first == {"id": first["id"], "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    assert second["index"] == 1


def test_one_call_is_kept_when_the_client_asked_for_one() -> None:
    # with parallel_tool_calls false a model that wrote two calls returned both
    rome = block(arguments='{"city": "Rome"}')
    text = f"{block()}\n{rome}"
    content, calls = split_tool_calls(text, ["get_weather"], max_calls=1)
    assert content is None and [json.loads(c.arguments) for c in calls] == [{"city": "Paris"}]
    parser = ToolCallParser(["get_weather"], max_calls=1)
    streamed = [parser.feed(piece) for piece in (block(), "\n", rome)]
    assert [len(calls) for _, calls in streamed] == [1, 0, 0] and "".join(c for c, _ in streamed) == ""
    assert len(split_tool_calls(text, ["get_weather"])[1]) == 2  # no limit by default
