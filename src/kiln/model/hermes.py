"""Tool calls in the Hermes format (NousResearch Hermes 2 Pro, Qwen 2.5), for chat templates that have none.

The tools go into the system message as JSON lines inside <tools></tools>, a call is a JSON object
{"name": ..., "arguments": {...}} between <tool_call> tags, and a tool's result goes back to the model in a
user turn between <tool_response> tags, as Hermes templates write them. Reading calls back out of
generated text is kiln.serve.tools' job; holding the output to calls is kiln.engine.grammar's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE = "<tool_response>", "</tool_response>"


def tools_block(tools: Sequence[Mapping[str, Any]]) -> str:
    """The system message's part that lists the tools (OpenAI's {"type": "function", "function": {...}} each)
    and says how to call one, as Qwen 2.5's template words it."""
    lines = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n"
            f"<tools>\n{lines}\n</tools>\n\n"
            "For each function call, return a json object with function name and arguments within "
            f"{TOOL_CALL_OPEN}{TOOL_CALL_CLOSE} XML tags:\n{TOOL_CALL_OPEN}\n"
            f'{{"name": <function-name>, "arguments": <args-json-object>}}\n{TOOL_CALL_CLOSE}')


def call_block(name: str, arguments: Any) -> str:
    """One call as the model writes it; `arguments` is the parsed object (or, if it was not JSON, the string)."""
    call = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"{TOOL_CALL_OPEN}\n{call}\n{TOOL_CALL_CLOSE}"


def hermes_messages(messages: Sequence[Mapping[str, Any]],
                    tools: Sequence[Mapping[str, Any]] | None) -> list[dict[str, str]]:
    """`messages` (OpenAI's shape: assistant tool_calls, role "tool") as plain role/content turns that any
    chat template renders: the tools appended to the system message (one is added when there is none), calls
    as <tool_call> blocks after the assistant's text, and each run of tool results as one user turn."""
    out: list[dict[str, str]] = []
    rest = list(messages)
    if tools:
        system = rest.pop(0)["content"] + "\n\n" if rest and rest[0]["role"] == "system" else ""
        out.append({"role": "system", "content": system + tools_block(tools)})
    is_response_turn = False  # the last turn in `out` holds tool results: the next result joins it
    for message in rest:
        role, content = message["role"], message.get("content") or ""
        if role == "tool":
            block = f"{TOOL_RESPONSE_OPEN}\n{content}\n{TOOL_RESPONSE_CLOSE}"
            if is_response_turn:
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block})
            is_response_turn = True
            continue
        calls = [call_block(c["function"]["name"], c["function"]["arguments"]) for c in message.get("tool_calls") or ()]
        out.append({"role": role, "content": "\n".join([content, *calls] if content else calls)})
        is_response_turn = False
    return out
