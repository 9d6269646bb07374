"""SQuAD exact match and F1 as the official v1.1 script defines them; BLEU and ROUGE-L through their libraries."""

from __future__ import annotations

import pytest

from kiln.evaluate import metrics


def test_normalization_drops_case_punctuation_and_articles() -> None:
    assert metrics.normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert metrics.normalize_answer("an apple, a pear") == "apple pear"


def test_exact_match_takes_the_best_reference() -> None:
    assert metrics.exact_match("Denver Broncos", ["Broncos", "the Denver Broncos"]) == 1.0
    assert metrics.exact_match("Broncos team", ["Denver Broncos"]) == 0.0


def test_f1_is_token_overlap() -> None:
    # prediction "denver broncos team" vs "denver broncos": precision 2/3, recall 1
    assert metrics.f1("Denver Broncos team", ["Denver Broncos"]) == pytest.approx(0.8)
    assert metrics.f1("nothing", ["something else"]) == 0.0


def test_bleu_and_rouge_bounds() -> None:
    refs = [["the cat is on the mat"], ["there is a dog in the garden"]]
    assert metrics.corpus_bleu(["the cat is on the mat", "there is a dog in the garden"], refs) == pytest.approx(100)
    assert metrics.corpus_bleu(["completely unrelated words here", "nothing alike at all"], refs) < 10
    assert metrics.rouge_l(["the cat is on the mat", "a dog"], refs) == pytest.approx(
        100 * (1.0 + metrics_rouge_pair("a dog", "there is a dog in the garden")) / 2
    )


def metrics_rouge_pair(pred: str, ref: str) -> float:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(ref, pred)["rougeL"].fmeasure
