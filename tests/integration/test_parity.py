"""The default model in kiln's graph computes what transformers computes, alone and in a batch."""

from __future__ import annotations

import pytest
import torch

from kiln.engine.generate import Generator
from kiln.engine.sampler import SamplingParams
from kiln.model.load import LoadedModel

NEW_TOKENS = 64


@pytest.fixture(scope="module")
def prompts(default_model: LoadedModel, mt_bench_prompts: list[str]) -> list[list[int]]:
    """Five real MT-bench first turns, chat template applied."""
    tok = default_model.tokenizer
    return [tok.encode_chat([{"role": "user", "content": p}]) for p in mt_bench_prompts[:5]]


@torch.inference_mode()
def test_logits_match_transformers(default_model: LoadedModel, hf_reference, prompts) -> None:
    for ids in prompts:
        tokens = torch.tensor([ids])
        ref = hf_reference(tokens).logits[0]
        got = default_model.model(tokens, logits="all")[0]
        assert (ref - got).abs().max().item() <= 1e-3


@torch.inference_mode()
def test_greedy_generation_matches_transformers(default_model: LoadedModel, hf_reference, prompts) -> None:
    gen = Generator(default_model.model, default_model.tokenizer)
    eos = sorted(default_model.tokenizer.eos_token_ids)
    compared = 0
    for ids in prompts:
        ref = hf_reference.generate(
            torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eos,
            pad_token_id=eos[0],
        )[0, len(ids):].tolist()
        ref = [t for t in ref if t not in eos]
        got = gen.generate([ids], SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS))[0].token_ids
        assert got == ref
        compared += len(got)
    assert compared >= 3 * NEW_TOKENS  # most prompts run to the full 64 tokens


def test_batch_of_different_lengths_matches_each_alone(default_model: LoadedModel, prompts) -> None:
    gen = Generator(default_model.model, default_model.tokenizer)
    batch = prompts[:4]
    assert len({len(p) for p in batch}) == 4, "the prompts should differ in length"
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS)
    together = [o.token_ids for o in gen.generate(batch, params)]
    alone = [gen.generate([p], params)[0].token_ids for p in batch]
    assert together == alone
