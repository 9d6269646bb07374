"""Pruning: the masks have the promised shape, structured pruning shrinks tensors and keeps the model running."""

from __future__ import annotations

import torch

from kiln.compress.blocks import BlockWalker
from kiln.compress.prune import structured, unstructured
from kiln.model.llama import Block, LlamaModel


def test_magnitude_removes_the_smallest() -> None:
    w = torch.arange(1.0, 101.0).view(10, 10)
    mask = unstructured.magnitude_mask(w, 0.3)
    assert mask.sum() == 70 and not mask.flatten()[:30].any()


def test_wanda_scores_weight_times_input_norm_per_row() -> None:
    w = torch.ones(2, 4)
    norms = torch.tensor([1.0, 10.0, 2.0, 0.5])
    mask = unstructured.wanda_mask(w, norms, 0.5)
    assert mask.tolist() == [[False, True, True, False]] * 2


def test_two_four_keeps_two_of_every_four() -> None:
    score = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.1, 0.2, 0.3, 0.4, 9.0, 8.0]])
    mask = unstructured.two_four_mask(score)
    assert mask.tolist() == [[True, False, True, False, False, False, True, True, True, True]]


def test_useless_heads_are_removed_without_changing_the_output(tiny: LlamaModel, tokens: torch.Tensor) -> None:
    # zero the o_proj columns of two query heads per KV group: they contribute nothing, so importance is 0
    for block in tiny.layers:
        assert isinstance(block, Block)
        d = block.attn.head_dim
        for head in (1, 2, 5, 6):
            block.attn.o_proj.weight.data[:, head * d : (head + 1) * d] = 0
    before = tiny(tokens, logits="all")
    walker = BlockWalker(tiny, tokens)
    for i, block in enumerate(tiny.layers):
        assert isinstance(block, Block)
        importance = structured.head_importance(block, walker.collect(i, ("attn.o_proj",), hessian=True)["attn.o_proj"])
        assert set(importance.argsort()[:4].tolist()) == {1, 2, 5, 6}
        walker.advance(i)
        structured.prune_heads(block, importance, remove_per_group=2)
    structured.update_spec(tiny)
    assert tiny.spec.num_heads == 4 and tiny.layers[0].attn.qkv_proj.weight.shape[0] == (4 + 2 * 2) * 8
    assert torch.allclose(tiny(tokens, logits="all"), before, atol=1e-4)


def test_channels_and_layers_shrink(tiny: LlamaModel, tokens: torch.Tensor) -> None:
    walker = BlockWalker(tiny, tokens)
    for i, block in enumerate(tiny.layers):
        assert isinstance(block, Block)
        stats = walker.collect(i, ("mlp.down_proj",))["mlp.down_proj"]
        walker.advance(i)
        structured.prune_channels(block, structured.channel_importance(block, stats), keep=96)
    structured.update_spec(tiny)
    structured.remove_layers(tiny, {1, 2})
    assert tiny.spec.intermediate_size == 96 and tiny.spec.num_layers == 2 and len(tiny.layers) == 2
    assert tiny(tokens).shape == (8, 128)
    cache = tiny.new_cache(1, 16)
    assert tiny(tokens[:1, :4], cache).shape == (1, 128)


def test_block_influence_of_identity_is_zero() -> None:
    x = [torch.randn(2, 5, 8)]
    assert structured.block_influence(x, x) == 0.0
