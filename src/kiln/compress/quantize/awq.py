"""AWQ (arXiv 2306.00978): scale up the input channels that carry large activations before quantizing,
so their weights keep more precision, and fold the inverse scale into the preceding operation.

Per linear layer, s = mean|x|^a (normalised), with a searched on a grid to minimise the error of the
quantized layer's output on the calibration inputs; then a per-group clipping ratio of the weights is
searched the same way. Hand-written as one of kiln's compression algorithms.

The error is scored on every calibration token through their Gram matrix G = XᵀX / tokens: weights off
by D give a mean squared output error of tr(D G Dᵀ) / out. The reference code runs each candidate
through the layer instead, its clipping search on a sample of 512 tokens; the quadratic form is exact
for all tokens at out x in² multiply-adds per candidate, whatever their number (BENCHMARKS.md: AWQ).

Before the searches, kiln's pipeline aims each block's first layer at the uncompressed model's outputs
(the drift correction of GPTQ's target = "model"; compress/pipeline.py says why only the first); the
recipe's target = "layer" leaves that out, which is the paper's algorithm.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kiln.compress.blocks import InputStats
from kiln.compress.fold import fold, group_shared
from kiln.compress.quantize import grid
from kiln.model.llama import Block

GRID = 20  # candidate exponents a = 0, 1/20, ..., 19/20
CLIP_GRID = tuple(1 - i / 40 for i in range(20))  # clipping ratios 1.0, 0.975, ..., 0.525


def _error(gram: Tensor, delta: Tensor) -> float:
    """Mean squared output error over the calibration tokens and outputs of weights off by `delta`."""
    return float(((delta @ gram) * delta).sum() / delta.shape[0])


def search_scale(layer: nn.Linear, stats: InputStats, group_size: int, symmetric: bool,
                 shared: tuple[int, int, int] | None = None, *, integer_zero: bool = False) -> Tensor:
    """The input scale s that minimises the quantized output error (s = 1 when nothing helps)."""
    w = layer.weight.detach().float()
    gram = stats.gram()
    base = stats.mean_abs.clamp(min=1e-6)
    best_s = torch.ones_like(base)
    best_err = _error(gram, grid.fake_quantize(w, 4, group_size, symmetric, integer_zero=integer_zero) - w)
    for step in range(1, GRID):
        s = base.pow(step / GRID)
        s = s / (s.max() * s.min()).sqrt()
        if shared is not None:
            s = group_shared(s, *shared)
        scaled = w * s
        # (x / s) Q(W s)ᵀ - x Wᵀ = x ((Q(W s) - W s) / s)ᵀ: the error in the original input space
        delta = (grid.fake_quantize(scaled, 4, group_size, symmetric, integer_zero=integer_zero) - scaled) / s
        err = _error(gram, delta)
        if err < best_err:
            best_s, best_err = s, err
    return best_s


def clip_weights(layer: nn.Linear, stats: InputStats, group_size: int, symmetric: bool, *,
                 integer_zero: bool = False) -> None:
    """Clip each group's weights to the ratio of its range that minimises the output error (per group)."""
    w = layer.weight.detach().float()
    padded = grid.pad_inputs(w, group_size)
    groups = padded.shape[1] // group_size
    gram = grid.pad_inputs(grid.pad_inputs(stats.gram(), group_size).T, group_size)
    # the group's own block of G: a group's output error is d G_gg dᵀ (its partial output alone)
    blocks = torch.stack([gram[g * group_size:(g + 1) * group_size, g * group_size:(g + 1) * group_size]
                          for g in range(groups)])  # [groups, g, g]
    wg = padded.view(w.shape[0], groups, group_size)
    best = wg.clone()
    best_err = torch.full((w.shape[0], groups), float("inf"))
    for ratio in CLIP_GRID:
        limit = wg.abs().amax(dim=-1, keepdim=True) * ratio
        clipped = wg.clamp(-limit, limit)
        deq = grid.fake_quantize(clipped.reshape(w.shape[0], -1)[:, : w.shape[1]], 4, group_size, symmetric,
                                 integer_zero=integer_zero)
        delta = (grid.pad_inputs(deq, group_size).view(w.shape[0], groups, group_size) - wg).transpose(0, 1)
        err = (torch.bmm(delta, blocks) * delta).sum(dim=-1).T  # [out, groups]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better.unsqueeze(-1), clipped, best)
    layer.weight.data = best.reshape(w.shape[0], -1)[:, : w.shape[1]].to(layer.weight.dtype)


def apply_to_block(block: Block, stats: dict[str, InputStats], group_size: int, symmetric: bool, *,
                   integer_zero: bool = False) -> None:
    """Search and fold the scales of the block's four linear layers, then clip their weights, each search
    on the grid the layers will be quantized to (`integer_zero`: integer zero points). `stats` must hold
    each layer's Gram matrix (collected with hessian=True)."""
    attn = block.attn
    heads = (attn.num_heads, attn.num_kv_heads, attn.head_dim)
    for name in ("attn.qkv_proj", "attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
        layer = block.get_submodule(name)
        assert isinstance(layer, nn.Linear)
        s = search_scale(layer, stats[name], group_size, symmetric, heads if name == "attn.o_proj" else None,
                         integer_zero=integer_zero)
        fold(block, name, s)
        stats[name].divide_inputs(s)  # the inputs the layer now receives
        if name != "attn.qkv_proj":  # as in the paper's code, q/k are not clipped (softmax is sensitive)
            clip_weights(layer, stats[name], group_size, symmetric, integer_zero=integer_zero)
