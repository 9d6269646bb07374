"""Folding a scale into the producing operation leaves a block's output unchanged (before quantization)."""

from __future__ import annotations

import pytest
import torch

from kiln.compress.blocks import LINEARS, BlockWalker
from kiln.compress.fold import fold, group_shared
from kiln.compress.quantize import awq, smoothquant
from kiln.model.llama import Block, LlamaModel


@pytest.mark.parametrize("target", LINEARS)
def test_fold_preserves_the_block(tiny: LlamaModel, tokens: torch.Tensor, target: str) -> None:
    walker = BlockWalker(tiny, tokens)
    before = walker.run(0)
    block = tiny.layers[0]
    assert isinstance(block, Block)
    s = torch.rand(block.get_submodule(target).in_features) + 0.5
    if target == "attn.o_proj":
        s = group_shared(s, block.attn.num_heads, block.attn.num_kv_heads, block.attn.head_dim)
    fold(block, target, s)
    after = walker.run(0)
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(before, after, strict=True))


def test_smoothquant_and_awq_keep_the_float_block(tiny: LlamaModel, tokens: torch.Tensor) -> None:
    walker = BlockWalker(tiny, tokens)
    before = walker.run(1)
    block = tiny.layers[1]
    assert isinstance(block, Block)
    smoothquant.smooth_block(block, walker.collect(1, LINEARS), alpha=0.5)
    after = walker.run(1)
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(before, after, strict=True))
    stats = walker.collect(2, LINEARS, hessian=True)
    layer = tiny.layers[2].mlp.down_proj
    s = awq.search_scale(layer, stats["mlp.down_proj"], 32, False)
    assert s.shape == (layer.in_features,) and torch.isfinite(s).all() and (s > 0).all()


def test_awq_searches_on_the_integer_zero_point_grid(tiny: LlamaModel, tokens: torch.Tensor,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # the scales and clipping ratios were chosen for float offsets, then the layers got integer zero points
    from kiln.compress.quantize import grid

    seen: list[bool] = []
    real = grid.fake_quantize

    def spy(*args: object, integer_zero: bool = False) -> torch.Tensor:
        seen.append(integer_zero)
        return real(*args, integer_zero=integer_zero)  # type: ignore[arg-type]

    monkeypatch.setattr(grid, "fake_quantize", spy)
    block = tiny.layers[0]
    assert isinstance(block, Block)
    awq.apply_to_block(block, BlockWalker(tiny, tokens).collect(0, LINEARS, hessian=True), 32, False,
                       integer_zero=True)
    assert seen and all(seen)
