"""Tool calls read out of generated text, whole or as it streams, in OpenAI's response shape.

The model writes calls in the Hermes format (kiln.model.hermes): <tool_call> blocks of
{"name": ..., "arguments": {...}}. A block that names one of the request's tools and holds a JSON object of
arguments is a call; everything else, a malformed or unfinished block included, is content, so that a model
that gets the format wrong gives its text back rather than an error. One parser serves both paths: the
text of a response without a stream is what its stream's deltas join to.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from kiln.model.hermes import TOOL_CALL_CLOSE, TOOL_CALL_OPEN


@dataclass(frozen=True)
class ParsedCall:
    """One call, in OpenAI's shape: the arguments as JSON text."""

    name: str
    arguments: str
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_dict(self, index: int | None = None) -> dict[str, Any]:
        """OpenAI's tool call; a streamed one (a delta) carries its `index` among the choice's calls."""
        call = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


def parse_call(body: str, names: Collection[str]) -> ParsedCall | None:
    """The call a block's body (the text between its tags) holds, or None when it is not JSON, names no
    given tool, or has arguments that are not a JSON object."""
    try:
        call = json.loads(body)
    except ValueError:
        return None
    if not isinstance(call, dict) or set(call) != {"name", "arguments"} or call["name"] not in names:
        return None
    if not isinstance(call["arguments"], dict):
        return None
    return ParsedCall(call["name"], json.dumps(call["arguments"], ensure_ascii=False))


class ToolCallParser:
    """Split generated text, fed in pieces, into content and calls.

    feed() and finish() return the content that is safe to send and the calls completed meanwhile. Text that
    may begin a <tool_call> tag is held until it is known not to; so is whitespace, which is dropped where it
    only separates a call from what is around it (the line breaks between blocks). Without a valid call the
    content is the text exactly. With `is_forced` (the output was held to calls by a grammar) a block or tag left
    open at the end was only cut short by max_tokens, not written as text: it is dropped. Calls past `max_calls`
    (1 with parallel_tool_calls false) are dropped too: the client asked for one and reads only one.
    """

    def __init__(self, names: Collection[str], is_forced: bool = False, max_calls: int | None = None) -> None:
        self.names, self.is_forced, self.max_calls = names, is_forced, max_calls
        self.num_calls = 0  # calls returned so far, by all feeds
        self.buffer = ""  # text not yet sent: a possible tag's start and the whitespace before it, or a block's body
        self.in_block = False  # the buffer holds a block's body, its <tool_call> tag already read
        self.spacing = ""  # the whitespace before the open block: dropped if it is a call, sent if it is not
        self.is_after_call = False  # the last thing read was a call: whitespace that follows it is dropped

    def feed(self, text: str) -> tuple[str, list[ParsedCall]]:
        self.buffer += text
        content, calls = "", list[ParsedCall]()
        while True:
            if self.in_block:
                end = self.buffer.find(TOOL_CALL_CLOSE)
                if end < 0:
                    return content, calls
                body, self.buffer = self.buffer[:end], self.buffer[end + len(TOOL_CALL_CLOSE):]
                call = parse_call(body, self.names)
                if call is None:  # a malformed block is the model's text, tags and all
                    content += f"{self.spacing}{TOOL_CALL_OPEN}{body}{TOOL_CALL_CLOSE}"
                elif self.max_calls is None or self.num_calls < self.max_calls:
                    calls.append(call)
                    self.num_calls += 1
                self.in_block, self.spacing, self.is_after_call = False, "", call is not None
                continue
            start = self.buffer.find(TOOL_CALL_OPEN)
            if start >= 0:
                text_before = self._after_call(self.buffer[:start])
                kept = text_before.rstrip()
                content += kept
                self.spacing, self.in_block = text_before[len(kept):], True
                self.buffer = self.buffer[start + len(TOOL_CALL_OPEN):]
                continue
            sendable = self.buffer[:len(self.buffer) - _num_held(self.buffer)]
            if sendable:  # it ends in text: whitespace before it separates nothing
                content += self._after_call(sendable)
                self.buffer, self.is_after_call = self.buffer[len(sendable):], False
            return content, calls

    def finish(self) -> tuple[str, list[ParsedCall]]:
        """The text held at the end: an unfinished block, or a partial tag, is text (unless forced: the grammar
        allows no text, so either was a call max_tokens cut short); whitespace after a call is not."""
        if self.is_forced:
            rest = ""
        elif self.in_block:
            rest = f"{self.spacing}{TOOL_CALL_OPEN}{self.buffer}"
        else:
            rest = self._after_call(self.buffer)
        self.buffer, self.in_block, self.spacing = "", False, ""
        return rest, []

    def _after_call(self, text: str) -> str:
        return text.lstrip() if self.is_after_call else text


def _num_held(text: str) -> int:
    """How many characters at the end of `text` to hold back: a partial <tool_call> tag, and the whitespace
    before it (or at the very end), which belongs to what follows."""
    partial = next((size for size in range(min(len(TOOL_CALL_OPEN) - 1, len(text)), 0, -1)
                    if TOOL_CALL_OPEN.startswith(text[-size:])), 0)
    before = text[:len(text) - partial]
    return partial + len(before) - len(before.rstrip())


def split_tool_calls(text: str, names: Collection[str], is_forced: bool = False,
                     max_calls: int | None = None) -> tuple[str | None, list[ParsedCall]]:
    """A whole response's content and calls; with calls, content is None when there is none (OpenAI's null)."""
    parser = ToolCallParser(names, is_forced, max_calls)
    content, calls = parser.feed(text)
    content += parser.finish()[0]
    return (content or None) if calls else content, calls
