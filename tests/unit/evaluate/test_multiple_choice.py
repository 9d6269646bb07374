"""Multiple-choice scoring follows lm-evaluation-harness: tokenization, acc / acc_norm, standard errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from kiln.errors import DataFormatError
from kiln.evaluate.multiple_choice import encode_choice, evaluate_items, mean_and_stderr, metrics, record
from kiln.evaluate.scorer import ModelScorer
from kiln.evaluate.tasks.multiple_choice import MCItem
from kiln.model.load import LoadedModel


def test_trailing_context_space_moves_to_the_continuation(default_model: LoadedModel) -> None:
    tok = default_model.tokenizer
    ctx, cont = encode_choice(tok, "The answer is ", "Paris")
    assert ctx == tok.encode("The answer is")
    assert ctx + cont == tok.encode("The answer is Paris")


def test_continuation_is_the_tail_of_the_whole_encoding(default_model: LoadedModel) -> None:
    tok = default_model.tokenizer
    ctx, cont = encode_choice(tok, "Question: 2+2\nAnswer:", " four")
    assert ctx + cont == tok.encode("Question: 2+2\nAnswer: four")


def test_empty_context_uses_the_prefix_token(default_model: LoadedModel) -> None:
    tok = default_model.tokenizer
    ctx, cont = encode_choice(tok, "", "hello world")
    assert ctx == [tok.prefix_token_id] and cont == tok.encode("hello world", add_special_tokens=False)


def test_acc_norm_divides_by_choice_length_without_delimiter() -> None:
    item = MCItem(0, "ctx", ["ab", "abcdef"], gold=1)
    r = record(item, [-4.0, -6.0])
    assert r["prediction"] == 0  # raw log-likelihood prefers the short choice
    assert r["prediction_norm"] == 1  # -6/6 > -4/2
    assert r["correct_norm"] and not r["correct"]


def test_ties_go_to_the_first_choice_like_numpy_argmax() -> None:
    r = record(MCItem(0, "c", ["x", "y"], gold=1), [-1.0, -1.0])
    assert r["prediction"] == 0 and r["prediction_norm"] == 0


def test_standard_error_is_sample_std_over_sqrt_n() -> None:
    mean, se = mean_and_stderr([1, 0, 1, 1])
    assert mean == 0.75 and se == pytest.approx(math.sqrt(0.25 / 4))
    out = metrics([{"correct": True, "correct_norm": False}, {"correct": False, "correct_norm": False}])
    assert out["acc"] == 0.5 and out["acc_norm"] == 0.0


def test_one_item_has_no_standard_error_and_says_so() -> None:
    # one item printed "acc 100.00 ± nan" and wrote NaN into the JSON, which JSON parsers refuse
    from kiln.evaluate import summary
    from kiln.evaluate.runner import EvalOutcome

    assert mean_and_stderr([1.0]) == (1.0, None)
    out = metrics([{"correct": True, "correct_norm": False}])
    assert out == {"acc": 1.0, "acc_stderr": None, "acc_norm": 0.0, "acc_norm_stderr": None}
    outcome = EvalOutcome("piqa", "multiple_choice", out, [{"index": 0, "score": 1.0}], 1.0)
    assert "acc 100.00 ± n/a  acc_norm 0.00 ± n/a" in summary.text(outcome)

    def refuse(constant: str) -> None:
        raise ValueError(constant)

    data = json.loads(summary.as_json(outcome, "m", "0" * 64), parse_constant=refuse)
    assert data["acc_stderr"] is None and data["acc_norm_stderr"] is None


def test_clear_answers_are_right(default_model: LoadedModel) -> None:
    items = [
        MCItem(0, "The capital of France is", ["Paris", "banana", "seventeen"], gold=0),
        MCItem(1, "One, two, three, four,", ["purple", "five"], gold=1),
        MCItem(2, "", ["The cat sat on the mat.", "mat the on sat cat The."], gold=0, delimiter=""),
    ]
    records = evaluate_items(ModelScorer(default_model.model), default_model.tokenizer, items)
    assert [r["prediction"] for r in records] == [0, 1, 0]
    assert all(len(r["loglikelihoods"]) == len(it.choices) for r, it in zip(records, items, strict=True))


def test_whitespace_context_is_scored_from_the_prefix_token(default_model: LoadedModel) -> None:
    # " " left an empty context once its space moved, and the scorer read an unwritten row of logits for it
    tok = default_model.tokenizer
    ctx, cont = encode_choice(tok, "  ", "hello")
    assert ctx == [tok.prefix_token_id] and cont == tok.encode("  hello", add_special_tokens=False)
    items = [MCItem(0, " ", ["blue", "green"], gold=0, delimiter=""),
             MCItem(1, "", [" blue", " green"], gold=0, delimiter="")]
    first, second = evaluate_items(ModelScorer(default_model.model), tok, items)
    assert first["loglikelihoods"] == pytest.approx(second["loglikelihoods"], abs=1e-4)


def test_a_choice_merged_into_the_context_is_refused_naming_its_line(default_model: LoadedModel,
                                                                     tmp_path: Path) -> None:
    # "x" + "a" is the one token "xa": the choice had no token to score, and the scorer an IndexError
    from kiln.evaluate.tasks.multiple_choice import custom

    path = tmp_path / "items.jsonl"
    path.write_text('\n{"context": "x", "choices": ["a", " b"], "gold": 1}\n')
    with pytest.raises(DataFormatError, match=r"items.jsonl:2: choice 'a' merges into the context's last token"):
        evaluate_items(ModelScorer(default_model.model), default_model.tokenizer, list(custom(path)))
