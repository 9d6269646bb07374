"""Speculative decoding (arXiv 2211.17192): a cheap draft model proposes k tokens, the target checks them
in one forward pass and keeps the longest prefix it agrees with, plus its own next token.

Greedy only: the output is exactly the target's greedy output, whatever the draft proposes. The draft
is any model with the same tokenizer: a distilled student (`kiln distill`), the target itself with
layers skipped (`skip_layers_draft`, which shares the target's weights), or a quantized artifact of the
target (an int4 export runs several times faster and agrees with it on most tokens). This module holds
the draft's side, which runs one sequence on either kiln's graph (a static KV cache) or an ONNX Runtime
export (its own in-place buffers), rolled back by writing over rejected positions; the engine checks
the proposals over its own cache (drafting.py, Engine._speculate) while one sequence decodes alone, as
the technique pays off where decoding is memory-bound.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
from torch import nn

from kiln.errors import InvalidParameterError
from kiln.model.llama import Block, LlamaModel

if TYPE_CHECKING:
    from kiln.engine.onnx_runtime import OnnxModel


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


class SequenceRunner:
    """One model's view of one sequence: run tokens from a position, get logits back."""

    def __init__(self, model: LlamaModel | OnnxModel, limit: int, seq: int) -> None:
        self.seq = seq  # the sequence id in an ONNX model (the engine's ids are >= 0)
        self.graph = model if isinstance(model, LlamaModel) else None
        self.onnx = None if isinstance(model, LlamaModel) else model
        self.cache = model.new_cache(1, limit) if isinstance(model, LlamaModel) else None

    def run(self, tokens: list[int], start: int, every: bool = False) -> torch.Tensor:
        """Logits after each of `tokens` ([T, V]) with `every`, else after the last one ([V])."""
        if self.onnx is not None:
            out = self.onnx.extend(self.seq, tokens, start, len(tokens) if every else 1)
            return out if every else out[-1]
        assert self.graph is not None and self.cache is not None
        self.cache.lengths[0] = start  # anything cached after `start` is overwritten
        logits = self.graph(torch.tensor([tokens]), self.cache, logits="all" if every else "last")
        return logits[0]

    def close(self) -> None:
        if self.onnx is not None:
            self.onnx.forget(self.seq)


def check_draft(draft: LlamaModel | OnnxModel, k: int, vocab_size: int) -> None:
    """Refuse a draft that proposes no tokens or that speaks another vocabulary than the target's."""
    if k < 1:
        raise InvalidParameterError(f"--speculate {k} must be at least 1")
    if draft.spec.vocab_size != vocab_size:
        raise InvalidParameterError("the draft model must share the target's tokenizer (vocabularies differ); "
                                    "pass a draft made from the same model (kiln distill, kiln compress)")


def propose(draft: SequenceRunner, sequence: list[int], known: int, k: int) -> list[int]:
    """k greedy draft tokens after `sequence`; the draft has keys for its first `known` tokens."""
    feed, position, drafts = sequence[known:], known, []
    for _ in range(k):
        drafts.append(int(draft.run(feed, position).argmax()))
        position += len(feed)
        feed = drafts[-1:]
    return drafts
