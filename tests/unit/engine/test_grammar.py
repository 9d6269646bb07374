"""Structured output: sequences held to a JSON schema give valid JSON, leave the other rows of a batch as they
were, and bad schemas are one-line errors; tool calls held to their tools' schemas."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kiln.engine.engine import Engine, EngineConfig
from kiln.engine.grammar import Constraint, GrammarError, json_grammar, ll_tokenizer, tool_call_grammar
from kiln.engine.request import RequestStatus
from kiln.engine.sampler import SamplerState, SamplingParams, sample
from kiln.errors import InvalidParameterError
from kiln.model.load import LoadedModel

PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "role": {"enum": ["pilot", "chemist"]}},
          "required": ["name", "age", "role"], "additionalProperties": False}


def run(model: LoadedModel, jobs: list[tuple[str, SamplingParams]]) -> list[tuple[str, RequestStatus]]:
    engine = Engine(model.model, model.tokenizer, EngineConfig(kv_budget_bytes=64 << 20))
    tok = model.tokenizer
    requests = [engine.add_request(tok.encode_chat([{"role": "user", "content": text}]), params)
                for text, params in jobs]
    engine.run()
    return [(r.text, r.status) for r in requests]


def test_greedy_and_sampled_output_match_the_schema(default_model: LoadedModel) -> None:
    grammar = json_grammar(PERSON)
    ask = "Describe Ada, a 36 year old chemist, as JSON."
    outs = run(default_model, [(ask, SamplingParams(max_tokens=96, temperature=0, grammar=grammar)),
                               (ask, SamplingParams(max_tokens=96, temperature=1.0, seed=3, grammar=grammar))])
    for text, status in outs:
        assert status == RequestStatus.FINISHED_STOPPED, text  # ended by the grammar, not by max_tokens
        person = json.loads(text)
        assert set(person) == {"name", "age", "role"} and isinstance(person["age"], int)
        assert person["role"] in ("pilot", "chemist") and isinstance(person["name"], str)


def test_any_object_and_an_unconstrained_row_beside_it(default_model: LoadedModel) -> None:
    plain = SamplingParams(max_tokens=24, temperature=0)
    ask = "What is the capital of France? Answer in JSON."
    alone = run(default_model, [(ask, plain)])[0]
    both = run(default_model, [(ask, SamplingParams(max_tokens=64, temperature=0, grammar=json_grammar(None))),
                               (ask, plain)])
    assert isinstance(json.loads(both[0][0]), dict)
    assert both[1] == alone  # the grammar of one row changes nothing in another


@pytest.mark.parametrize(("schema", "message"), [
    ({"type": "nonsense"}, "Invalid type"),
    ({"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}, "does not exist"),
    ({"type": "string", "pattern": "[a-"}, "unclosed character class"),
    # overlapping branches (5 matches both); the message said to enable an llguidance option
    ({"oneOf": [{"type": "integer", "minimum": 0}, {"type": "integer", "maximum": 10}]},
     "oneOf has branches that one value may match together, which cannot be enforced; make the branches exclusive "
     "or use anyOf"),
])
def test_bad_schemas_are_one_line_errors(schema: dict, message: str) -> None:
    with pytest.raises(GrammarError) as info:
        json_grammar(schema)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert isinstance(info.value, InvalidParameterError)


def test_ignore_eos_with_a_grammar_is_refused() -> None:
    with pytest.raises(InvalidParameterError, match="ignore_eos"):
        SamplingParams(grammar=json_grammar(None), ignore_eos=True)


def test_greedy_takes_the_best_allowed_token_and_masks_only_when_it_must(
        default_model: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    tok = default_model.tokenizer
    brace, word = tok.encode("{", add_special_tokens=False)[0], tok.encode("hello", add_special_tokens=False)[0]
    state = SamplerState(SamplingParams(temperature=0, grammar=json_grammar(None)), [], default_model.spec.vocab_size,
                         Constraint(json_grammar(None), ll_tokenizer(tok, default_model.spec.vocab_size)))
    masks = []
    real_mask = Constraint.mask
    monkeypatch.setattr(Constraint, "mask", lambda self, row: (masks.append(1), real_mask(self, row)))
    logits = np.zeros((1, default_model.spec.vocab_size), dtype=np.float32)
    logits[0, word], logits[0, brace] = 9.0, 5.0  # the best token cannot start a JSON object
    assert sample(logits.copy(), [state]) == [brace] and len(masks) == 1
    logits[0, word] = 0.0
    quote = tok.encode('"', add_special_tokens=False)[0]
    logits[0, quote] = 7.0  # after "{" a key's quote is allowed: no mask needed
    assert sample(logits, [state]) == [quote] and len(masks) == 1


# 600 optional properties: compiles, but after '{' llguidance's Earley row outgrows its limit of 2000 items
TOO_WIDE = {"type": "object", "properties": {f"f{i}": {"type": "string"} for i in range(600)}}


def test_a_grammar_that_fails_part_way_ends_its_sequence_alone(default_model: LoadedModel) -> None:
    engine = Engine(default_model.model, default_model.tokenizer, EngineConfig(kv_budget_bytes=64 << 20))
    prompt = default_model.tokenizer.encode_chat([{"role": "user", "content": "Any JSON object, please."}])
    plain = SamplingParams(max_tokens=8, temperature=0)
    alone = run(default_model, [("Any JSON object, please.", plain)])[0]
    wide = engine.add_request(prompt, SamplingParams(max_tokens=16, temperature=0.7, seed=1,
                                                     grammar=json_grammar(TOO_WIDE)))
    other = engine.add_request(prompt, plain)
    engine.run()  # no exception: the failing row does not fail the step of the batch
    assert wide.status == RequestStatus.FINISHED_ABORTED and isinstance(wide.error, GrammarError)
    assert "max is 2000" in str(wide.error) and "<state>" not in str(wide.error), wide.error
    assert (other.text, other.status) == alone and other.error is None


def test_an_empty_schema_is_any_value_and_none_any_object(default_model: LoadedModel) -> None:
    tok, vocab = default_model.tokenizer, default_model.spec.vocab_size
    digit = tok.encode("4", add_special_tokens=False)[0]
    assert Constraint(json_grammar({}), ll_tokenizer(tok, vocab)).allows(digit)  # JSON Schema's {}: anything
    assert not Constraint(json_grammar(None), ll_tokenizer(tok, vocab)).allows(digit)  # json_object


# --- tool calls ---------------------------------------------------------------------------------------------

# a schema with a $ref to its own $defs: it must resolve against the tool's schema, not the grammar around it
CITY = {"type": "object", "properties": {"city": {"$ref": "#/$defs/City"}}, "required": ["city"],
        "additionalProperties": False, "$defs": {"City": {"type": "string", "maxLength": 12}}}


def call(name: str, arguments: str) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call>'


def accepted(model: LoadedModel, grammar: str, text: str) -> tuple[bool, bool]:
    """Whether the grammar takes every token of `text`, and whether it may end there."""
    import llguidance

    matcher = llguidance.LLMatcher(ll_tokenizer(model.tokenizer, model.spec.vocab_size), grammar)
    ids = model.tokenizer.encode(text, add_special_tokens=False)
    taken = matcher.validate_tokens(ids)
    matcher.consume_tokens(ids[:taken])
    return taken == len(ids), matcher.is_accepting()


@pytest.mark.parametrize("text,whole,complete", [
    (call("get_weather", '{"city": "Paris"}'), True, True),
    (call("get_weather", '{"city": "Paris"}') + "\n" + call("noop", "{}"), True, True),  # parallel
    (call("get_weather", '{"city": "Paris"}')[:-3], True, False),  # not closed yet
    (call("get_weather", '{"town": "Paris"}'), False, False),  # not the tool's schema
    (call("get_weather", '{"city": "Paris is a fine city"}'), False, False),  # the $ref's maxLength
    (call("get_time", '{}'), False, False),  # not a given tool
    ("Sure! " + call("noop", "{}"), False, False),  # text first
])
def test_tool_calls_are_held_to_their_tools_schemas(default_model: LoadedModel, text: str, whole: bool,
                                                    complete: bool) -> None:
    grammar = tool_call_grammar([("get_weather", CITY), ("noop", None)], parallel=True)
    assert accepted(default_model, grammar, text) == (whole, complete)


def test_one_call_unless_parallel(default_model: LoadedModel) -> None:
    two = call("noop", "{}") + "\n" + call("noop", "{}")
    assert accepted(default_model, tool_call_grammar([("noop", None)], parallel=False), call("noop", "{}")) == \
        (True, True)
    assert accepted(default_model, tool_call_grammar([("noop", None)], parallel=False), two)[0] is False
    assert accepted(default_model, tool_call_grammar([("noop", None)], parallel=True), two) == (True, True)


def test_a_tool_call_is_generated_whole(default_model: LoadedModel) -> None:
    ask = "What is the weather in Paris? Call get_weather."
    text, status = run(default_model, [(ask, SamplingParams(
        max_tokens=40, temperature=0, grammar=tool_call_grammar([("get_weather", CITY)], parallel=False)))])[0]
    assert status == RequestStatus.FINISHED_STOPPED, text  # ended by the grammar, not by max_tokens
    assert text.startswith("<tool_call>\n") and text.endswith("\n</tool_call>")
    body = json.loads(text.removeprefix("<tool_call>\n").removesuffix("\n</tool_call>"))
    assert body["name"] == "get_weather" and set(body["arguments"]) == {"city"}
