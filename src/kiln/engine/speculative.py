"""Speculative decoding (arXiv 2211.17192): a cheap draft model proposes k tokens, the target checks them
in one forward pass and keeps the longest prefix it agrees with, plus its own next token.

Greedy only: the output is exactly the target's greedy output, whatever the draft proposes. The draft
is any model with the same tokenizer: a distilled student (`kiln distill`) or the target itself with
layers skipped (`skip_layers_draft`, which shares the target's weights). Batch 1, as the technique
pays off where decoding is memory-bound; both models use a static KV cache rolled back on rejection.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from kiln.engine.sampler import SamplingParams
from kiln.errors import InvalidParameterError
from kiln.model.kv_cache import StaticKVCache
from kiln.model.llama import Block, LlamaModel


@dataclass
class SpeculativeResult:
    tokens: list[int]
    proposed: int = 0  # draft tokens proposed
    accepted: int = 0  # draft tokens the target kept
    target_passes: int = 0
    seconds: float = 0.0
    first_token_s: float = 0.0
    acceptance_history: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_pass(self) -> float:
        return len(self.tokens) / self.target_passes if self.target_passes else 0.0


def skip_layers_draft(target: LlamaModel, keep: list[int]) -> LlamaModel:
    """A draft that runs only the target's layers `keep` (weights shared, nothing copied)."""
    draft = LlamaModel.__new__(LlamaModel)
    nn.Module.__init__(draft)
    sliding = tuple(target.spec.sliding_layers[i] for i in keep) if target.spec.sliding_layers else ()
    draft.spec = dataclasses.replace(target.spec, num_layers=len(keep), sliding_layers=sliding)
    draft.embed, draft.norm, draft.lm_head = target.embed, target.norm, target.lm_head
    layers: list[Block] = []
    for i in keep:
        block = target.layers[i]
        assert isinstance(block, Block)
        clone = Block.__new__(Block)
        nn.Module.__init__(clone)
        clone.input_norm, clone.post_attn_norm, clone.mlp = block.input_norm, block.post_attn_norm, block.mlp
        attn = type(block.attn).__new__(type(block.attn))
        attn.__dict__.update(block.attn.__dict__)
        attn.layer = len(layers)  # its own slot in the draft's cache
        clone.attn = attn
        layers.append(clone)
    draft.layers = nn.ModuleList(layers)
    draft.cos_table, draft.sin_table = target.cos_table, target.sin_table
    return draft


class SpeculativeDecoder:
    def __init__(self, target: LlamaModel, draft: LlamaModel, k: int = 4) -> None:
        if k < 1:
            raise InvalidParameterError(f"speculate k={k} must be at least 1")
        if draft.spec.vocab_size != target.spec.vocab_size:
            raise InvalidParameterError("the draft model must share the target's tokenizer (vocabularies differ)")
        self.target, self.draft, self.k = target, draft, k

    @torch.inference_mode()
    def generate(self, prompt: list[int], params: SamplingParams,
                 eos: frozenset[int] = frozenset()) -> SpeculativeResult:
        if not params.is_greedy:
            raise InvalidParameterError("speculative decoding here is greedy only; set temperature 0")
        start = time.perf_counter()
        limit = len(prompt) + params.max_tokens + self.k + 1
        t_cache = self.target.new_cache(1, limit)
        d_cache = self.draft.new_cache(1, limit)
        result = SpeculativeResult(tokens=[])
        logits = self.target(torch.tensor([prompt]), t_cache)
        if len(prompt) > 1:
            self.draft(torch.tensor([prompt[:-1]]), d_cache)
        result.target_passes += 1
        next_token = int(logits[0].argmax())
        result.first_token_s = time.perf_counter() - start
        while True:
            result.tokens.append(next_token)
            if self._done(result.tokens, next_token, params, eos):
                break
            drafts = self._propose(d_cache, prompt, result.tokens)
            verify = torch.tensor([[next_token, *drafts]])
            base = t_cache.lengths[0]
            target_logits = self.target(verify, t_cache, logits="all")[0]  # [k + 1, V]
            result.target_passes += 1
            choices = target_logits.argmax(dim=-1).tolist()
            kept = 0
            while kept < len(drafts) and drafts[kept] == choices[kept]:
                kept += 1
            result.proposed += len(drafts)
            result.accepted += kept
            result.acceptance_history.append(kept)
            for tok in drafts[:kept]:
                result.tokens.append(tok)
                if self._done(result.tokens, tok, params, eos):
                    result.seconds = time.perf_counter() - start
                    return result
            next_token = choices[kept]
            t_cache.lengths[0] = base + 1 + kept  # drop the rejected drafts' keys and values
        result.seconds = time.perf_counter() - start
        return result

    def _propose(self, cache: StaticKVCache, prompt: list[int], tokens: list[int]) -> list[int]:
        """k greedy draft tokens after prompt + tokens (the draft's cache catches up first)."""
        sequence = prompt + tokens
        known = cache.lengths[0]
        feed = sequence[known:]
        drafts: list[int] = []
        for _ in range(self.k):
            logits = self.draft(torch.tensor([feed]), cache)
            drafts.append(int(logits[0].argmax()))
            feed = drafts[-1:]
        cache.lengths[0] = len(sequence)  # forget the drafts: the target decides what stays
        return drafts

    @staticmethod
    def _done(tokens: list[int], last: int, params: SamplingParams, eos: frozenset[int]) -> bool:
        return len(tokens) >= params.max_tokens or (last in eos and not params.ignore_eos)
