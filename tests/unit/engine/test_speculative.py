"""Speculative decoding: the target's greedy output whatever the draft proposes, on either runtime."""

from __future__ import annotations

import pytest

from kiln.engine.generate import Generator
from kiln.engine.sampler import SamplingParams
from kiln.engine.speculative import SpeculativeDecoder, skip_layers_draft
from kiln.errors import InvalidParameterError
from kiln.model.load import LoadedModel

GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)


def prompts(model: LoadedModel) -> list[list[int]]:
    return [model.tokenizer.encode_chat([{"role": "user", "content": "Name three rivers in Europe."}]),
            model.tokenizer.encode("The history of the printing press begins")]


@pytest.fixture(scope="module")
def plain(default_model: LoadedModel) -> list[list[int]]:
    gen = Generator(default_model.model, default_model.tokenizer, prefix_caching=False)
    return [out.token_ids for out in gen.generate(prompts(default_model), GREEDY)]


def test_a_weak_draft_still_gives_the_targets_greedy_tokens(default_model: LoadedModel,
                                                            plain: list[list[int]]) -> None:
    target = default_model.model
    # five middle layers skipped: it agrees on about a quarter of its tokens, so both paths are exercised
    draft = skip_layers_draft(target, [i for i in range(30) if i not in (10, 12, 14, 16, 18)])
    decoder = SpeculativeDecoder(target, draft, k=4)
    results = [decoder.generate(p, GREEDY) for p in prompts(default_model)]
    assert [r.tokens for r in results] == plain
    assert all(0 < r.accepted < r.proposed for r in results)  # some kept, some rejected


def test_the_target_as_its_own_draft_accepts_everything(default_model: LoadedModel,
                                                        plain: list[list[int]]) -> None:
    decoder = SpeculativeDecoder(default_model.model, default_model.model, k=3)
    result = decoder.generate(prompts(default_model)[0], GREEDY)
    assert result.tokens == plain[0]
    assert result.acceptance_rate == 1.0
    assert result.target_passes < len(result.tokens) / 3  # k + 1 tokens per pass, less the end


def test_eos_and_max_tokens_end_the_output(default_model: LoadedModel) -> None:
    tok = default_model.tokenizer
    prompt = tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    params = SamplingParams(temperature=0.0, max_tokens=60)
    want = Generator(default_model.model, tok).generate([prompt], params)[0]
    got = SpeculativeDecoder(default_model.model, skip_layers_draft(default_model.model, list(range(15))), 4)
    result = got.generate(prompt, params, tok.eos_token_ids)
    assert result.tokens[-1] in tok.eos_token_ids and result.tokens[:-1] == want.token_ids
    short = got.generate(prompt, SamplingParams(temperature=0.0, max_tokens=3), tok.eos_token_ids)
    assert short.tokens == want.token_ids[:3]


def test_bad_settings_are_refused(default_model: LoadedModel) -> None:
    model = default_model.model
    with pytest.raises(InvalidParameterError, match="at least 1"):
        SpeculativeDecoder(model, model, k=0)
    with pytest.raises(InvalidParameterError, match="greedy only"):
        SpeculativeDecoder(model, model).generate([1, 2, 3], SamplingParams(temperature=0.7))
