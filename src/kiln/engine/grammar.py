"""Structured output: a sequence held to a JSON schema (OpenAI's `response_format`), or to tool calls
(a forcing `tool_choice`), token by token.

llguidance, the grammar engine behind llama.cpp's and vLLM's guidance backends, compiles the schema and
says before each token which tokens of the vocabulary keep the text a valid prefix; the sampler gives the
others -inf. Not hand-written: an incremental JSON-schema matcher over a BPE vocabulary is a project of
its own. Once the JSON is complete the only token left is end-of-sequence, so the sequence stops there.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from kiln.errors import InvalidParameterError
from kiln.model.hermes import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

ANY_OBJECT: dict[str, Any] = {"type": "object"}  # response_format json_object: any JSON object
# Whitespace between JSON tokens: none, a space, or one or two line breaks and an indent of up to 20, as
# llama.cpp's JSON grammars allow. Unbounded whitespace let the default model write newline after
# newline until max_tokens (33 line breaks in a 64-token answer).
WHITESPACE = r"( |\n{1,2}[ \t]{0,20})?"


class GrammarError(InvalidParameterError):
    """A JSON schema that cannot be compiled, or a token the grammar does not allow."""


def json_grammar(schema: Mapping[str, Any] | None) -> str:
    """llguidance's grammar for JSON that matches `schema` (any object when None; `{}` is any JSON value,
    as JSON Schema reads it); a schema it cannot compile is a one-line GrammarError."""
    import llguidance

    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(ANY_OBJECT if schema is None else schema),
                                                                  defaults={"whitespace_pattern": WHITESPACE})
    except (TypeError, ValueError) as exc:  # not serialisable, or not a schema llguidance understands
        raise _schema_error(str(exc)) from None
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise _schema_error(error)
    return grammar


def _schema_error(reason: str) -> GrammarError:
    """The one-line error for a schema llguidance refuses, with its reason."""
    if "coerce_one_of" in reason:  # its advice is an llguidance option that no kiln user can set
        return GrammarError("the JSON schema's oneOf has branches that one value may match together, which cannot "
                            "be enforced; make the branches exclusive or use anyOf")
    if "recursion limit" in reason:  # deeper than its parser nests (Python's JSON reader may give up first)
        return GrammarError("the JSON schema nests too deeply to be read; flatten it, naming repeated parts in $defs "
                            "and pointing at them with $ref")
    return GrammarError(f"the JSON schema cannot be used ({_one_line(reason)}); fix the schema")


def tool_call_grammar(tools: Sequence[tuple[str, Mapping[str, Any] | None]], parallel: bool) -> str:
    """llguidance's grammar for Hermes tool calls (model/hermes.py) to one of `tools` (name, parameters schema;
    None: any object): one <tool_call> block, or with `parallel` one or more a line apart, each
    {"name": <a tool's name>, "arguments": <JSON matching that tool's schema>}, and nothing else.

    Each tool's schema is its own %json, so its "$ref"s resolve against its own root as the client wrote them;
    the text around the arguments is fixed, as the prompt shows it. Check each schema with json_grammar first:
    this says which tool's schema fails only as the whole grammar's error.
    """
    import llguidance

    def literal(text: str) -> str:  # a Lark string takes JSON's escapes
        return json.dumps(text)

    names = " | ".join(f"fn_{i}" for i in range(len(tools)))
    opening, closing, newline = literal(TOOL_CALL_OPEN + "\n"), literal("\n" + TOOL_CALL_CLOSE), literal("\n")
    lines = ["%llguidance {}", f"start: call ({newline} call)*" if parallel else "start: call",
             f"call: {opening} ({names}) {closing}"]
    for i, (name, schema) in enumerate(tools):
        head = literal('{"name": ' + json.dumps(name) + ', "arguments": ')
        # no schema, or {}: any object (arguments are an object, whatever JSON Schema makes of {})
        arguments = {"x-guidance": {"whitespace_pattern": WHITESPACE}, **(schema or ANY_OBJECT)}
        lines.append(f"fn_{i}: {head} %json {json.dumps(arguments)} " + literal("}"))
    try:
        grammar = llguidance.LLMatcher.grammar_from_lark("\n".join(lines))
    except (TypeError, ValueError) as exc:
        raise GrammarError(f"the tools' schemas cannot be used ({_one_line(exc)}); fix the schemas") from None
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise GrammarError(f"the tools' schemas cannot be used together ({_one_line(error)}); fix the schemas")
    return str(grammar)


def _one_line(error: object) -> str:
    """llguidance's message on one line (some span several, such as a regex's with a caret under the fault)."""
    text = " ".join(str(error).split())
    return (text[:197] + "...") if len(text) > 200 else text or type(error).__name__


def ll_tokenizer(tokenizer: Any, vocab_size: int) -> Any:
    """llguidance's view of kiln's tokenizer (its vocabulary as byte strings), built once per tokenizer
    (about 0.3 s for a 49k vocabulary) and kept on it."""
    cached = getattr(tokenizer, "_ll_tokenizer", None)
    if cached is None or cached.vocab_size != vocab_size:
        import llguidance.hf

        eos = sorted(tokenizer.eos_token_ids)
        cached = llguidance.hf.from_tokenizer(tokenizer.hf, n_vocab=vocab_size, eos_token=eos)
        tokenizer._ll_tokenizer = cached
    return cached


class Constraint:
    """One sequence's position in its grammar: mask() before each sampled token, advance() after it.

    Neither raises once the matcher is running: a grammar that fails part-way (llguidance's parser has
    limits, such as 2000 items in an Earley row, that a schema may only reach on some token) sets `error`,
    and the engine ends that sequence alone; an exception here would fail the step of the whole batch.
    """

    def __init__(self, grammar: str, tokenizer: Any) -> None:
        import llguidance
        import llguidance.numpy

        self.matcher = llguidance.LLMatcher(tokenizer, grammar)
        if self.matcher.is_error():
            raise GrammarError(f"the grammar cannot be used ({_one_line(self.matcher.get_error())})")
        self.bitmask = llguidance.numpy.allocate_token_bitmask(1, tokenizer.vocab_size)
        self._fill = llguidance.numpy.fill_next_token_bitmask
        self._apply = llguidance.numpy.apply_token_bitmask_inplace
        self.error: GrammarError | None = None  # why the grammar failed part-way; the sequence must end

    def mask(self, row: np.ndarray) -> None:
        """Give the tokens the grammar does not allow next -inf, in place; row: [V] float32, contiguous."""
        if self.error is not None:
            return
        self._fill(self.matcher, self.bitmask, 0)
        if self.matcher.is_error():  # an empty mask would leave no token to sample (NaN probabilities)
            self._fail()
            return
        self._apply(row.reshape(1, -1), self.bitmask)

    def allows(self, token: int) -> bool:
        """Whether the grammar takes `token` next (about a microsecond, where mask() takes 0.1-1 ms)."""
        return bool(self.matcher.validate_tokens([token]) == 1)

    def advance(self, token: int) -> None:
        if self.error is None and not self.matcher.consume_token(token):
            self._fail()

    def _fail(self) -> None:
        reason = _one_line(self.matcher.get_error().split("<state>")[0])  # not its dump of the parser's state
        self.error = GrammarError(f"the output could not be held to the JSON schema ({reason}); simplify the schema")
