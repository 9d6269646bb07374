"""Pruning: the masks have the promised shape, structured pruning shrinks tensors and keeps the model running."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kiln.compress import pipeline
from kiln.compress.blocks import BlockWalker
from kiln.compress.prune import structured, unstructured
from kiln.compress.recipe import Prune
from kiln.errors import InvalidParameterError
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
        assert structured.prune_heads(block, importance, remove_per_group=2) == [1, 2, 5, 6]
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


@pytest.mark.parametrize("method,sparsity,message", [
    ("heads", 0.1, r"sparsity 0.1 removes 0 of the 4 query heads in each KV group; .* removes 1 to 3 of them"),
    ("heads", 0.95, r"sparsity 0.95 removes 4 of the 4 query heads"),
    ("layers", 0.1, r"sparsity 0.1 removes 0 of the 4 layers"),
    ("layers", 0.95, r"sparsity 0.95 removes 4 of the 4 layers; pass a fraction that removes 1 to 3"),
    ("channels", 0.0, r"sparsity 0.0 keeps 128 of the 128 MLP channels"),
])
def test_structured_pruning_of_none_or_all_is_refused_before_calibration(
        tiny: LlamaModel, method: str, sparsity: float, message: str) -> None:
    # every head of a group or every layer was capped at one kept, and a fraction rounding to none wrote the
    # model unchanged; the artifact's recipe named a sparsity it did not have
    def no_calibration() -> None:
        raise AssertionError("calibration ran")

    ctx = SimpleNamespace(model=tiny, walker=no_calibration, history={})
    with pytest.raises(InvalidParameterError, match=message):
        pipeline._prune_structured(ctx, Prune(sparsity=sparsity, method=method))  # type: ignore[arg-type]


def test_heads_are_not_pruned_without_grouped_query_heads() -> None:
    with pytest.raises(InvalidParameterError, match="each of the 4 KV heads serves one query head"):
        structured.heads_to_remove(4, 4, 0.5)
    assert structured.heads_to_remove(9, 3, 0.5) == 2 and structured.layers_to_remove(30, 0.5) == 15
