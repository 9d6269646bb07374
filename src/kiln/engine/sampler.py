"""Choose the next token of each sequence in a batch, each with its own sampling parameters.

Hand-written because it is the product's core (it runs once per decode step on every sequence):
logit biases (OpenAI's logit_bias; min_tokens bans the tokens that would end a sequence too soon), then
penalties (repetition as in arXiv 1909.05858, presence and frequency as OpenAI defines them), then
temperature, top-k, top-p (arXiv 1904.09751) and min-p (arXiv 2407.01082). A per-sequence seeded
generator makes sampling reproducible whatever else shares the batch. A sequence held to a grammar
(engine/grammar.py) has the tokens it does not allow removed first, so every other rule picks among
allowed tokens only.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from kiln.errors import InvalidParameterError

if TYPE_CHECKING:
    from kiln.engine.grammar import Constraint

Logits = Tensor | np.ndarray  # [n, V]: torch from the torch runtime, numpy from onnxruntime
# the seeds a user may ask for, on the server and the CLI alike: a signed 64-bit integer, as OpenAI's seed (any
# integer could be hashed, see torch_seed; the bound only keeps the two front ends the same)
MIN_SEED, MAX_SEED = -(2**63), 2**63 - 1
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for a logit bias: -100 bans a token, +100 all but forces it


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence is generated. Defaults follow llama.cpp's command-line defaults."""

    max_tokens: int = 256  # tokens to generate at most
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 40  # keep the k most likely tokens; 0 = off
    top_p: float = 0.95  # keep the smallest set whose probability reaches p; 1 = off
    min_p: float = 0.05  # drop tokens below min_p x the top probability; 0 = off
    repetition_penalty: float = 1.0  # divide positive (multiply negative) logits of seen tokens; 1 = off
    presence_penalty: float = 0.0  # subtract once from every generated token's logit
    frequency_penalty: float = 0.0  # subtract per occurrence of a generated token
    seed: int | None = None  # fixes the random stream of this sequence
    stop: tuple[str, ...] = ()  # strings that end the generation (not included in the text)
    ignore_eos: bool = False  # keep generating past the end-of-sequence token (benchmarks)
    logprobs: int | None = None  # report each sampled token's log-probability and this many top alternatives
    grammar: str | None = None  # llguidance grammar the output must follow (engine/grammar.py json_grammar)
    # (token id, bias) pairs added to those tokens' logits before penalties and filters (the grammar's mask comes
    # after); logprobs stay those of the model's own logits, as vLLM reports them by default
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0  # tokens generated before an end-of-sequence or stop token or a stop string may end it
    stop_token_ids: frozenset[int] = frozenset()  # tokens that end the generation as EOS does (not in the output)
    skip_special_tokens: bool = True  # leave special tokens (<|im_end|>, ...) out of the text
    # each prompt token's log-probability given the tokens before it, with this many top alternatives (OpenAI's
    # echo with logprobs, vLLM's prompt_logprobs): read from the prefill's own logits, so the prompt is
    # computed whole (no cached prefix: its positions' logits were never kept)
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        _check("max_tokens", self.max_tokens, self.max_tokens >= 1, ">= 1")
        _check("temperature", self.temperature, 0 <= self.temperature <= 100, "in [0, 100]")
        _check("top_k", self.top_k, self.top_k >= 0, ">= 0 (0 = off)")
        _check("top_p", self.top_p, 0 < self.top_p <= 1, "in (0, 1]")
        _check("min_p", self.min_p, 0 <= self.min_p <= 1, "in [0, 1]")
        _check("repetition_penalty", self.repetition_penalty, 0 < self.repetition_penalty <= 10, "in (0, 10]")
        _check("presence_penalty", self.presence_penalty, -2 <= self.presence_penalty <= 2, "in [-2, 2]")
        _check("frequency_penalty", self.frequency_penalty, -2 <= self.frequency_penalty <= 2, "in [-2, 2]")
        if any(not s for s in self.stop):
            raise InvalidParameterError("stop strings must not be empty; drop the empty --stop value")
        if self.logprobs is not None:
            _check("logprobs", self.logprobs, 0 <= self.logprobs <= 20, "in [0, 20]")
        if self.prompt_logprobs is not None:
            _check("prompt_logprobs", self.prompt_logprobs, 0 <= self.prompt_logprobs <= 20, "in [0, 20]")
        if self.grammar is not None and self.ignore_eos:  # the grammar allows only the end once it is complete
            raise InvalidParameterError("ignore_eos cannot be used with a grammar; drop one of them")
        _check("min_tokens", self.min_tokens, 0 <= self.min_tokens <= self.max_tokens,
               f"in [0, max_tokens={self.max_tokens}]")
        if self.grammar is not None and self.min_tokens:  # banning the end could leave the grammar no token
            raise InvalidParameterError("min_tokens cannot be used with a grammar; drop one of them")
        for token, bias in self.logit_bias:
            _check(f"logit_bias[{token}]", bias, -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS,
                   f"in [{-MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]")
        if len({token for token, _ in self.logit_bias}) != len(self.logit_bias):
            raise InvalidParameterError("logit_bias names a token more than once; give each token one bias")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def _check(name: str, value: float, ok: bool, allowed: str) -> None:
    if not ok or (isinstance(value, float) and math.isnan(value)):
        raise InvalidParameterError(f"{name}={value} is out of range; it must be {allowed}", param=name)


def torch_seed(seed: int) -> int:
    """The torch generator seed for a request's seed: the seed itself in [0, 2**32), else a stable 64-bit
    hash (BLAKE2b) of the whole integer, whatever its size or sign.

    torch's CPU generator seeds its mt19937 from the low 32 bits of the seed it is given, so seeds that
    differ only above bit 32 (7 and 7 + 2**32; -1 and 2**32 - 1) drew the same stream. Hashing lets every
    bit count: there are still only 2**32 streams, so two seeds now share one by chance (1 in 2**32), not
    by construction, and the seeds below 2**32 keep the streams they always had.
    """
    if 0 <= seed < 2**32:
        return seed
    whole = seed.to_bytes(seed.bit_length() // 8 + 1, "little", signed=True)  # distinct ints, distinct bytes
    return int.from_bytes(hashlib.blake2b(whole, digest_size=8).digest(), "little")


class SamplerState:
    """One sequence's sampling state: its parameters, random stream and token counts."""

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int], vocab_size: int,
                 constraint: Constraint | None = None, eos_token_ids: Collection[int] = ()) -> None:
        self.params = params
        self.constraint = constraint  # the grammar's state for params.grammar
        self.num_generated = 0  # tokens sampled so far, for min_tokens
        seed = params.seed if params.seed is not None else random.SystemRandom().randrange(2**63)
        self.generator = torch.Generator().manual_seed(torch_seed(seed))
        self.counts: Tensor | None = None  # [V] generated-token counts, for presence/frequency
        self.seen: Tensor | None = None  # [V] tokens in prompt or output, for repetition penalty
        if params.presence_penalty or params.frequency_penalty:
            self.counts = torch.zeros(vocab_size, dtype=torch.int32)
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool)
            if prompt_ids:
                self.seen[torch.tensor(list(prompt_ids))] = True
        # [k] ids and [k] biases of params.logit_bias
        self.bias_ids: Tensor | None = None
        self.bias_values: Tensor | None = None
        if params.logit_bias:
            ids, biases = zip(*params.logit_bias, strict=True)
            self.bias_ids = _token_ids("logit_bias", ids, vocab_size)
            self.bias_values = torch.tensor(biases, dtype=torch.float32)
        # [k] the tokens that would end the sequence (EOS unless ignored, and the stop tokens), banned until
        # min_tokens are generated as vLLM does: a stop token kept from ending the output must not enter it either
        self.end_ids: Tensor | None = None
        if params.min_tokens:
            ends = sorted(set(params.stop_token_ids) | (set() if params.ignore_eos else
                                                        {t for t in eos_token_ids if t < vocab_size}))
            self.end_ids = _token_ids("stop_token_ids", ends, vocab_size) if ends else None

    @property
    def adjusts_logits(self) -> bool:
        """Whether this step's logits get penalties or biases (a ban for min_tokens only until it is reached)."""
        return (self.counts is not None or self.seen is not None or self.bias_ids is not None
                or (self.end_ids is not None and self.num_generated < self.params.min_tokens))

    @property
    def argmax_only(self) -> bool:
        """Greedy with nothing to change the logits or to follow (no penalties, biases or grammar)."""
        return self.params.is_greedy and not self.adjusts_logits and self.constraint is None

    def observe(self, token: int) -> None:
        self.num_generated += 1
        if self.constraint is not None:
            self.constraint.advance(token)
        if self.counts is not None:
            self.counts[token] += 1
        if self.seen is not None:
            self.seen[token] = True


def apply_penalties(logits: Tensor, states: Sequence[SamplerState]) -> Tensor:
    """Repetition, presence and frequency penalties, row by row where a row asks for them."""
    for i, st in enumerate(states):
        row = logits[i]
        if st.seen is not None:
            r = st.params.repetition_penalty
            # a penalty near 0 sends a positive logit past fp32's largest: held there, not +inf (inf - inf is NaN)
            penalised = torch.where(row > 0, row / r, row * r).clamp_(max=torch.finfo(torch.float32).max)
            logits[i] = torch.where(st.seen, penalised, row)
        if st.counts is not None:
            p = st.params
            logits[i] -= p.frequency_penalty * st.counts + p.presence_penalty * (st.counts > 0)
    return logits


def apply_biases(logits: Tensor, states: Sequence[SamplerState]) -> Tensor:
    """logit_bias, and -inf for the tokens that would end a sequence short of its min_tokens, in place, row by row
    where a row asks for them."""
    for i, st in enumerate(states):
        if st.bias_ids is not None:
            assert st.bias_values is not None
            logits[i].index_add_(0, st.bias_ids, st.bias_values)
        if st.end_ids is not None and st.num_generated < st.params.min_tokens:
            logits[i].index_fill_(0, st.end_ids, -math.inf)
    return logits


def _token_ids(name: str, ids: Sequence[int], vocab_size: int) -> Tensor:
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidParameterError(f"{name} names token {bad[0]}, outside the vocabulary [0, {vocab_size}); "
                                    "use ids the model's tokenizer gives")
    return torch.tensor(list(ids), dtype=torch.long)


def apply_constraints(logits: Tensor, states: Sequence[SamplerState], rows: Sequence[int]) -> Tensor:
    """-inf for the tokens that the grammar of each of `rows` does not allow next (a copy: the caller's
    logits stay as they were, for logprobs)."""
    logits = logits.float().clone()
    for i in rows:
        constraint = states[i].constraint
        assert constraint is not None
        constraint.mask(logits[i].numpy())
    return logits


def _argmax(logits: Tensor) -> list[int]:
    if logits.dtype == torch.float32:  # numpy's argmax: a few us on a 49k row, torch's about 60 at batch 1
        return list(logits.numpy().argmax(axis=-1).tolist())
    return list(logits.argmax(dim=-1).tolist())


def filter_logits(logits: Tensor, states: Sequence[SamplerState]) -> Tensor:
    """Temperature, then top-k, top-p and min-p: removed tokens get -inf. logits: [n, V] fp32."""
    params = [st.params for st in states]
    # shifted so that each row's best logit is 0 (softmax does not change): a tiny temperature then sends the others
    # to -inf rather than the best to +inf, whose softmax was NaN; one below fp32's smallest would round to 0
    temperature = torch.tensor([p.temperature for p in params]).clamp_(min=torch.finfo(torch.float32).tiny)
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature.unsqueeze(1)
    vocab = logits.shape[-1]
    top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params])
    top_p = torch.tensor([p.top_p for p in params])
    min_p = torch.tensor([p.min_p for p in params])
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [n, V]
    rank = torch.arange(vocab).unsqueeze(0)
    remove = rank >= top_k.unsqueeze(1)
    probs = sorted_logits.masked_fill(remove, -math.inf).softmax(dim=-1)
    # top-p: drop a token when the tokens before it already reach p (the first always stays)
    remove |= (probs.cumsum(dim=-1) - probs) >= top_p.unsqueeze(1)
    remove |= probs < min_p.unsqueeze(1) * probs[:, :1]
    # the best token always stays, whatever the rounding: a top_p below float32's smallest value (5e-324 is a valid
    # float) is 0 here and removed it too, and a row with no token left has no distribution (NaN), which failed the
    # step and so every request in it
    remove[:, 0] = False
    filtered = sorted_logits.masked_fill(remove, -math.inf)
    return torch.empty_like(logits).scatter_(1, order, filtered)


def sample(logits: Logits, states: Sequence[SamplerState]) -> list[int]:
    """Next token of each row of logits [n, V], row i sampled with states[i].

    numpy logits (the onnxruntime runtime's) stay numpy when every row is greedy without penalties."""
    if isinstance(logits, np.ndarray):
        if all(st.argmax_only for st in states):  # nothing to observe either
            return list(logits.argmax(axis=-1).tolist())
        logits = torch.from_numpy(logits)
    if any(st.adjusts_logits for st in states):  # penalties and biases write in place: the caller's stay raw
        # biases first, as vLLM: a penalty then scales what the bias made of a logit
        logits = apply_penalties(apply_biases(logits.float().clone(), states), states)
    tokens = _argmax(logits)
    # a greedy row keeps its best token when its grammar allows it (the usual case for a model that follows
    # the format), so only the rows that need it pay for the grammar's mask
    masked = [i for i, st in enumerate(states) if st.constraint is not None
              and not (st.params.is_greedy and st.constraint.allows(tokens[i]))]
    if masked:
        logits = apply_constraints(logits, states, masked)
        best = _argmax(logits[masked])
        for j, i in enumerate(masked):
            tokens[i] = best[j]
    sampled = [i for i, st in enumerate(states) if not st.params.is_greedy]
    if sampled:
        rows = torch.tensor(sampled)
        probs = filter_logits(logits[rows], [states[i] for i in sampled]).softmax(dim=-1)
        for j, i in enumerate(sampled):
            tokens[i] = int(torch.multinomial(probs[j], 1, generator=states[i].generator))
    for st, tok in zip(states, tokens, strict=True):
        st.observe(tok)
    return [int(t) for t in tokens]
