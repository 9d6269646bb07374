"""Perplexity with llama.cpp's protocol, checked against a direct computation with transformers."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kiln.evaluate import perplexity
from kiln.model.llama import build_model
from kiln.model.spec import ModelSpec


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128)).eval()
    return hf, build_model(ModelSpec.from_hf_config(hf.config.to_dict()), hf.state_dict(), torch.float32)


def test_chunks_are_non_overlapping_and_start_with_bos() -> None:
    tokens = list(range(100, 1100))
    chunks = perplexity.chunks(tokens, 256, bos=1)
    assert len(chunks) == 3 and all(len(c) == 256 for c in chunks)
    assert [c[0] for c in chunks] == [1, 1, 1]
    assert chunks[1][1:] == tokens[257:512]
    assert len(perplexity.chunks(tokens, 256, bos=None, limit_tokens=600)) == 2
    assert perplexity.chunks(tokens, 256, bos=None)[0][0] == 100


@torch.inference_mode()
def test_second_half_nll_matches_transformers(pair) -> None:
    hf, ours = pair
    torch.manual_seed(1)
    chunks = torch.randint(0, 50, (3, 32)).tolist()
    sums = perplexity.Sums()
    for s in perplexity.score_chunks(ours, chunks):
        sums.add(s)
    nll = []
    for c in chunks:
        logp = torch.log_softmax(hf(torch.tensor([c])).logits[0], dim=-1)
        nll += [-logp[j, c[j + 1]].item() for j in range(16, 31)]  # positions ctx/2 .. ctx-2
    assert sums.count == len(nll) == 45
    stats = perplexity.statistics(sums)
    mean = sum(nll) / len(nll)
    assert stats["ppl"] == pytest.approx(math.exp(mean), rel=1e-5)
    var = sum(x * x for x in nll) / len(nll) - mean * mean
    assert stats["ppl_stderr"] == pytest.approx(math.exp(mean) * math.sqrt(var / (len(nll) - 1)), rel=1e-4)


def test_too_few_tokens_have_no_standard_error() -> None:
    # one chunk at --ctx 16 scores 7 tokens: the error was printed as ± 0.0000, a certainty nothing measured
    few = perplexity.Sums(count=7, nll=7 * 2.0, nll2=7 * 4.5)
    stats = perplexity.statistics(few)
    assert stats["ppl"] == pytest.approx(math.exp(2.0)) and stats["ppl_stderr"] is None
    one_chunk = perplexity.Sums(count=255, nll=255 * 2.0, nll2=255 * 4.5)  # one chunk at the default --ctx 512
    assert perplexity.statistics(one_chunk)["ppl_stderr"] == pytest.approx(math.exp(2.0) * math.sqrt(0.5 / 254))
    with_base = perplexity.Sums(count=7, nll=14.0, nll2=31.5, nll_base=14.0, nll_base2=31.5, nll_nll_base=31.5,
                                kld=0.7, kld2=0.1, same_top=7, kld_values=[0.1] * 7)
    stats = perplexity.statistics(with_base)
    assert stats["ppl_base_stderr"] is None and stats["delta_ppl_stderr"] is None and stats["kld_stderr"] is None


@torch.inference_mode()
def test_model_against_itself_has_no_divergence(pair) -> None:
    _, ours = pair
    chunks = torch.randint(0, 50, (2, 32)).tolist()
    sums = perplexity.Sums()
    for s in perplexity.score_chunks(ours, chunks, baseline=ours):
        sums.add(s)
    stats = perplexity.statistics(sums)
    assert stats["kld"] == pytest.approx(0.0, abs=1e-6)
    assert stats["same_top1"] == 1.0 and stats["delta_ppl"] == pytest.approx(0.0, abs=1e-9)


@torch.inference_mode()
def test_kld_is_positive_for_a_perturbed_model(pair) -> None:
    hf, ours = pair
    state = {k: v + 0.05 * torch.randn_like(v) for k, v in hf.state_dict().items()}
    other = build_model(ours.spec, state, torch.float32)
    chunks = torch.randint(0, 50, (2, 32)).tolist()
    sums = perplexity.Sums()
    for s in perplexity.score_chunks(other, chunks, baseline=ours):
        sums.add(s)
    stats = perplexity.statistics(sums)
    assert stats["kld"] > 0 and stats["kld_stderr"] > 0 and stats["same_top1"] < 1.0
    assert stats["ppl_base"] != stats["ppl"]
