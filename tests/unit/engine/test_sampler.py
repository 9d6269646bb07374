"""The sampler: parameter checks, each filter's support, penalties, seeds, per-row parameters."""

from __future__ import annotations

import math

import pytest
import torch

from kiln.engine.sampler import SamplerState, SamplingParams, apply_penalties, sample, torch_seed
from kiln.errors import InvalidParameterError

V = 50


def state(prompt: list[int] | None = None, **kw: object) -> SamplerState:
    return SamplerState(SamplingParams(**{"top_k": 0, "top_p": 1.0, "min_p": 0.0, **kw}), prompt or [], V)


def support(logits: torch.Tensor, n: int = 400, **kw: object) -> set[int]:
    st = state(temperature=1.0, seed=0, **kw)
    return {sample(logits.clone().unsqueeze(0), [st])[0] for _ in range(n)}


@pytest.mark.parametrize(
    "field,value",
    [("max_tokens", 0), ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1),
     ("min_p", 2.0), ("repetition_penalty", 0.0), ("presence_penalty", 3.0), ("temperature", math.nan)],
)
def test_out_of_range_parameter_is_named(field: str, value: float) -> None:
    with pytest.raises(InvalidParameterError, match=f"{field}="):
        SamplingParams(**{field: value})


def test_empty_stop_string_is_refused() -> None:
    with pytest.raises(InvalidParameterError, match="stop"):
        SamplingParams(stop=("",))


def test_greedy_is_argmax() -> None:
    logits = torch.randn(4, V)
    got = sample(logits, [state(temperature=0.0) for _ in range(4)])
    assert got == logits.argmax(-1).tolist()


def test_greedy_is_argmax_in_bf16_and_on_a_strided_view() -> None:
    logits = torch.randn(3, V)
    assert sample(logits.bfloat16(), [state(temperature=0.0) for _ in range(3)]) == \
        logits.bfloat16().argmax(-1).tolist()
    wide = torch.randn(3, 2 * V)
    view = wide[:, ::2]  # not contiguous
    assert sample(view, [state(temperature=0.0) for _ in range(3)]) == view.argmax(-1).tolist()


def test_top_k_keeps_k_tokens() -> None:
    logits = torch.linspace(0, 1, V)
    assert support(logits, top_k=3) <= {V - 1, V - 2, V - 3}
    assert len(support(logits, top_k=3)) == 3


def test_top_p_keeps_the_nucleus() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15] + [0.05 / (V - 3)] * (V - 3))
    assert support(probs.log(), top_p=0.7) == {0, 1}
    assert support(probs.log(), top_p=0.85) == {0, 1, 2}



@pytest.mark.parametrize("top_p", [5e-324, 1e-46])  # valid floats that float32 rounds to 0
def test_a_top_p_below_float32_keeps_the_best_token(top_p: float) -> None:
    # every token was removed, the first included: the softmax of -inf was NaN and the step failed, and with it
    # every request running beside this one
    probs = torch.tensor([0.5, 0.3, 0.15] + [0.05 / (V - 3)] * (V - 3))
    assert support(probs.log(), n=20, top_p=top_p) == {0}


def test_min_p_drops_unlikely_tokens() -> None:
    probs = torch.tensor([0.4, 0.3, 0.2] + [0.1 / (V - 3)] * (V - 3))
    assert support(probs.log(), min_p=0.6) == {0, 1}


def test_temperature_sharpens() -> None:
    logits = torch.tensor([1.0, 0.5] + [-10.0] * (V - 2))
    cold = [sample(logits.unsqueeze(0), [state(temperature=0.05, seed=s)])[0] for s in range(50)]
    assert set(cold) == {0}


def test_seed_reproduces_and_batch_does_not_matter() -> None:
    logits = torch.randn(V)
    alone = [sample(logits.unsqueeze(0), [st])[0] for st in [state(temperature=1.0, seed=7)] * 20]
    a, b = state(temperature=1.0, seed=7), state(temperature=1.0, seed=99)
    batched = [sample(torch.stack([logits, logits]), [a, b])[0] for _ in range(20)]
    assert alone == batched
    other = [sample(logits.unsqueeze(0), [st])[0] for st in [state(temperature=1.0, seed=8)] * 20]
    assert other != alone


def draws(seed: int, logits: torch.Tensor, n: int = 20) -> list[int]:
    st = state(temperature=1.0, seed=seed)
    return [sample(logits.unsqueeze(0), [st])[0] for _ in range(n)]


@pytest.mark.parametrize("seed,twin", [(7, 7 + 2**32), (7, 7 + 2**40), (-1, 2**32 - 1), (-5, 2**64 - 5),
                                       (2**63 - 1, 2**64 - 1), (3, 3 + 2**64)])
def test_seeds_that_differ_only_above_32_bits_draw_different_streams(seed: int, twin: int) -> None:
    # torch's generator keeps a seed's low 32 bits: these pairs shared them, and so their samples
    logits = torch.zeros(V)  # uniform: 20 draws from 50 tokens agree by chance with probability 50**-20
    assert draws(seed, logits) != draws(twin, logits)
    assert draws(twin, logits) == draws(twin, logits)  # still reproducible


@pytest.mark.parametrize("seed", [0, 7, 12345, 2**31, 2**32 - 1])
def test_seeds_below_2_to_the_32_keep_their_streams(seed: int) -> None:
    # the stream such a seed always gave: torch's generator seeded with the seed itself
    assert torch_seed(seed) == seed
    logits = torch.randn(V, generator=torch.Generator().manual_seed(1))
    generator = torch.Generator().manual_seed(seed)
    probs = logits.softmax(dim=-1)
    want = [int(torch.multinomial(probs, 1, generator=generator)) for _ in range(20)]
    assert draws(seed, logits) == want


def test_per_row_parameters_in_one_batch() -> None:
    logits = torch.linspace(0, 1, V).repeat(2, 1)
    greedy, wide = state(temperature=0.0), state(temperature=1.0, seed=1)
    picks = [sample(logits.clone(), [greedy, wide]) for _ in range(100)]
    assert {p[0] for p in picks} == {V - 1}
    assert len({p[1] for p in picks}) > 10


def test_repetition_penalty_on_prompt_and_output_tokens() -> None:
    logits = torch.zeros(1, V)
    logits[0, 3], logits[0, 4] = 2.0, -2.0
    st = state(prompt=[3, 4], repetition_penalty=2.0)
    out = apply_penalties(logits.clone(), [st])
    assert out[0, 3] == 1.0 and out[0, 4] == -4.0 and out[0, 5] == 0.0


def test_presence_and_frequency_penalties_count_output_tokens() -> None:
    st = state(prompt=[9], presence_penalty=0.5, frequency_penalty=0.25, temperature=0.0)
    st.observe(3)
    st.observe(3)
    st.observe(4)
    out = apply_penalties(torch.zeros(1, V), [st])
    assert out[0, 3].item() == pytest.approx(-(0.5 + 2 * 0.25))
    assert out[0, 4].item() == pytest.approx(-(0.5 + 0.25))
    assert out[0, 9].item() == 0.0  # prompt tokens are not penalised by presence/frequency


def test_greedy_repeats_are_broken_by_penalty() -> None:
    logits = torch.zeros(1, V)
    logits[0, 1], logits[0, 2] = 1.0, 0.9
    st = state(temperature=0.0, repetition_penalty=1.5)
    assert sample(logits.clone(), [st]) == [1]
    assert sample(logits.clone(), [st]) == [2]


def test_numpy_logits_sample_as_torch_logits_do() -> None:
    """The onnxruntime runtime hands the sampler numpy rows: greedy, seeded, penalised and mixed batches
    must pick what the same rows as torch tensors pick."""
    logits = torch.randn(3, V)
    logits[0, 1], logits[0, 2] = 5.0, 4.9  # row 0: a repetition penalty on token 1 moves greedy to 2
    settings = [dict(temperature=0.0), dict(temperature=0.0, repetition_penalty=3.0), dict(temperature=1.0, seed=5)]
    for kw in settings:
        for rows in ([0], [0, 1, 2]):
            with_torch = [state(prompt=[1], **kw) for _ in rows]
            with_numpy = [state(prompt=[1], **kw) for _ in rows]
            for _ in range(5):  # later steps see the counts and penalties the earlier ones left
                assert sample(logits[rows].clone().numpy(), with_numpy) == sample(logits[rows].clone(), with_torch)
    penalised = state(prompt=[1], temperature=0.0, repetition_penalty=3.0)
    assert sample(logits[[0]].numpy(), [penalised]) == [2]
    assert sample(logits[[0]].numpy(), [state(prompt=[1], temperature=0.0)]) == [1]


# --- logit_bias, min_tokens ------------------------------------------------------------------------------


def test_logit_bias_bans_and_forces_a_token() -> None:
    logits = torch.linspace(0, 1, V).repeat(2, 1)
    logits[1] = logits[1].flip(0)  # row 1's best is token 0
    banned = [state(temperature=0.0, logit_bias=((V - 1, -100.0),)), state(temperature=1.0, seed=3,
                                                                            logit_bias=((0, -100.0),))]
    picks = [sample(logits.clone(), banned) for _ in range(200)]
    assert {p[0] for p in picks} == {V - 2} and 0 not in {p[1] for p in picks}
    forced = [state(temperature=0.0, logit_bias=((7, 100.0),)), state(temperature=1.0, seed=3,
                                                                       logit_bias=((7, 100.0),))]
    assert {tuple(sample(logits.clone(), forced)) for _ in range(50)} == {(7, 7)}


def test_only_rows_with_a_bias_change_and_the_callers_logits_stay_raw() -> None:
    logits = torch.linspace(0, 1, V).repeat(2, 1)
    raw = logits.clone()
    assert sample(logits, [state(temperature=0.0), state(temperature=0.0, logit_bias=((3, 100.0),))]) == [V - 1, 3]
    assert torch.equal(logits, raw)  # logprobs are taken from these: the model's own logits


def test_numpy_logits_with_a_bias_are_biased() -> None:
    logits = torch.linspace(0, 1, V).unsqueeze(0).numpy()
    assert sample(logits, [state(temperature=0.0, logit_bias=((3, 100.0),))]) == [3]


@pytest.mark.parametrize("kw,words", [
    ({"logit_bias": ((1, 101.0),)}, "logit_bias[1]=101.0 is out of range"),
    ({"logit_bias": ((1, 1.0), (1, 2.0))}, "more than once"),
    ({"min_tokens": -1}, "min_tokens=-1"),
    ({"min_tokens": 5, "max_tokens": 4}, "min_tokens=5 is out of range; it must be in [0, max_tokens=4]"),
    ({"min_tokens": 1, "grammar": "start: 'x'"}, "min_tokens cannot be used with a grammar"),
])
def test_bias_and_min_tokens_are_checked(kw: dict, words: str) -> None:
    with pytest.raises(InvalidParameterError, match=words.replace("[", r"\[").replace("]", r"\]")):
        SamplingParams(**kw)


def test_a_token_outside_the_vocabulary_is_named() -> None:
    with pytest.raises(InvalidParameterError, match=f"logit_bias names token {V}, outside the vocabulary"):
        state(logit_bias=((V, 1.0),))


def test_min_tokens_bans_the_end_until_reached() -> None:
    logits = torch.zeros(1, V)
    logits[0, 2] = 10.0  # token 2 (EOS here) is by far the best
    st = SamplerState(SamplingParams(temperature=0.0, top_k=0, min_tokens=3, stop_token_ids=frozenset({5})), [],
                      V, eos_token_ids={2})
    logits[0, 5] = 9.0  # then the stop token
    assert [sample(logits.clone(), [st])[0] for _ in range(4)] == [0, 0, 0, 2]
    ignoring = SamplerState(SamplingParams(temperature=0.0, top_k=0, min_tokens=1, ignore_eos=True,
                                           stop_token_ids=frozenset({5})), [], V, eos_token_ids={2})
    assert sample(logits.clone(), [ignoring]) == [2]  # EOS does not end this one, so it is not banned; 5 is


def test_top_k_1_is_greedy() -> None:
    logits = torch.randn(4, V)
    assert sample(logits, [state(temperature=1.5, top_k=1, seed=s) for s in range(4)]) == logits.argmax(-1).tolist()


@pytest.mark.parametrize("kw", [{"temperature": 1e-300}, {"temperature": 1e-30}, {"repetition_penalty": 1e-300},
                                {"repetition_penalty": 1e-300, "temperature": 1e-300}])
def test_extreme_temperatures_and_penalties_sample_the_best_not_nan(kw: dict) -> None:
    # dividing by a temperature or penalty near 0 overflowed to +inf, and softmax of inf is NaN: multinomial raised,
    # which failed the whole batch's step
    logits = torch.zeros(1, V)
    logits[0, 4] = 2.0
    assert sample(logits, [state(prompt=[4], seed=0, **{"temperature": 1.0, **kw})]) == [4]
