"""Shared-context scoring gives what scoring each (context + continuation) in full gives."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kiln.evaluate import loglikelihood
from kiln.evaluate.loglikelihood import ScoreRequest, length_batches, score
from kiln.model.llama import build_model
from kiln.model.spec import ModelSpec


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))
    return build_model(ModelSpec.from_hf_config(hf.config.to_dict()), hf.state_dict(), torch.float32)


@torch.inference_mode()
def full_score(model, context: list[int], cont: list[int]) -> tuple[float, bool]:
    ids = torch.tensor([context + cont])
    logprobs = torch.log_softmax(model(ids, logits="all")[0].float(), dim=-1)
    positions = range(len(context) - 1, len(context) + len(cont) - 1)
    picked = [logprobs[p, t].item() for p, t in zip(positions, cont, strict=True)]
    greedy = all(logprobs[p].argmax().item() == t for p, t in zip(positions, cont, strict=True))
    return sum(picked), greedy


@pytest.mark.parametrize("max_rows", [1, 3, 32])
@pytest.mark.parametrize("min_batch_tokens", [1, 128])  # 1: every length change starts a sub-batch
def test_matches_full_sequences(model, max_rows: int, min_batch_tokens: int, monkeypatch) -> None:
    monkeypatch.setattr(loglikelihood, "MIN_BATCH_TOKENS", min_batch_tokens)
    g = torch.Generator().manual_seed(1)

    def ids(n: int) -> list[int]:
        return torch.randint(0, 64, (n,), generator=g).tolist()

    requests = [
        ScoreRequest(ids(7), [ids(1), ids(5), ids(3)]),  # a one-token continuation has no second forward
        ScoreRequest(ids(2), [ids(9), ids(2)]),
        ScoreRequest(ids(20), [ids(4), ids(4), ids(6), ids(1)]),
        ScoreRequest(ids(1), [ids(3)]),
    ]
    got = score(model, requests, max_rows=max_rows)
    for req, scores in zip(requests, got, strict=True):
        assert len(scores) == len(req.continuations)
        for cont, s in zip(req.continuations, scores, strict=True):
            expected, greedy = full_score(model, req.context, cont)
            assert s.logprob == pytest.approx(expected, abs=1e-4)
            assert s.is_greedy == greedy and s.num_tokens == len(cont)


def test_reports_progress_in_request_order(model) -> None:
    requests = [ScoreRequest([1, 2, 3], [[4] * n]) for n in (5, 1, 3, 2)]
    seen: list[int] = []
    score(model, requests, max_rows=1, on_done=seen.append)
    assert sum(seen) == len(requests)


def test_greedy_continuation_is_flagged(model) -> None:
    context = [3, 9, 27]
    with torch.inference_mode():
        best = int(model(torch.tensor([context]))[0].argmax())
    [[s]] = score(model, [ScoreRequest(context, [[best]])])
    assert s.is_greedy


def test_rows_of_similar_length_are_batched_together() -> None:
    lengths = [10, 60, 58, 12, 11, 59, 30]
    batches = length_batches(lengths, min_tokens=25)
    assert batches == [[1, 5, 2], [6], [3, 4, 0]]  # 60/59/58, then 30, then 12/11/10
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert length_batches(lengths, min_tokens=10_000) == [[1, 5, 2, 6, 3, 4, 0]]  # too few tokens to split
    assert length_batches([], min_tokens=1) == []


def test_a_small_cache_budget_scores_in_smaller_groups_with_the_same_results(model, monkeypatch) -> None:
    g = torch.Generator().manual_seed(2)
    requests = [ScoreRequest(torch.randint(0, 64, (12,), generator=g).tolist(),
                             [torch.randint(0, 64, (n,), generator=g).tolist() for n in (3, 5, 2)]) for _ in range(6)]
    sizes: list[int] = []
    real = model.new_cache
    monkeypatch.setattr(model, "new_cache", lambda rows, length: sizes.append(rows) or real(rows, length))
    roomy = score(model, requests, max_rows=32)
    row_bytes = 17 * model.spec.kv_bytes_per_token(4)  # the longest request: 12 + 5 tokens, fp32
    tight = score(model, requests, max_rows=32, kv_budget_bytes=4 * row_bytes)
    assert sizes == [18, 3]  # every continuation in one group; then one request (3 rows) per group
    for a, b in zip(roomy, tight, strict=True):
        assert [s.logprob for s in a] == pytest.approx([s.logprob for s in b], abs=1e-5)
