"""AWQ (arXiv 2306.00978): scale up the input channels that carry large activations before quantizing,
so their weights keep more precision, and fold the inverse scale into the preceding operation.

Per linear layer, s = mean|x|^a (normalised), with a searched on a grid to minimise the error of the
quantized layer's output on calibration inputs; then a per-group clipping ratio of the weights is
searched the same way. Hand-written as one of kiln's compression algorithms.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kiln.compress.blocks import InputStats
from kiln.compress.fold import fold, group_shared
from kiln.compress.quantize import grid
from kiln.model.llama import Block

GRID = 20  # candidate exponents a = 0, 1/20, ..., 19/20
CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


def _error(x: Tensor, w: Tensor, w_q: Tensor) -> float:
    return float(((x @ w_q.T) - (x @ w.T)).pow(2).mean())


def search_scale(layer: nn.Linear, stats: InputStats, group_size: int, symmetric: bool,
                 shared: tuple[int, int, int] | None = None, *, integer_zero: bool = False) -> Tensor:
    """The input scale s that minimises the quantized output error (s = 1 when nothing helps)."""
    w = layer.weight.detach().float()
    x = stats.sample()
    base = stats.mean_abs.clamp(min=1e-6)
    best_s = torch.ones_like(base)
    best_err = _error(x, w, grid.fake_quantize(w, 4, group_size, symmetric, integer_zero=integer_zero))
    for step in range(1, GRID):
        s = base.pow(step / GRID)
        s = s / (s.max() * s.min()).sqrt()
        if shared is not None:
            s = group_shared(s, *shared)
        err = _error(x / s, w * s, grid.fake_quantize(w * s, 4, group_size, symmetric, integer_zero=integer_zero))
        if err < best_err:
            best_s, best_err = s, err
    return best_s


def clip_weights(layer: nn.Linear, stats: InputStats, group_size: int, symmetric: bool, *,
                 integer_zero: bool = False) -> None:
    """Clip each group's weights to the ratio of its range that minimises the output error (per group)."""
    w = layer.weight.detach().float()
    x = stats.sample()
    padded = grid.pad_inputs(w, group_size)
    groups = padded.shape[1] // group_size
    xp = grid.pad_inputs(x, group_size).view(x.shape[0], groups, group_size)
    wg = padded.view(w.shape[0], groups, group_size)
    ref = torch.einsum("tgi,ogi->tog", xp, wg)  # per-group partial outputs [tokens, out, groups]
    best = wg.clone()
    best_err = torch.full((w.shape[0], groups), float("inf"))
    for ratio in CLIP_GRID:
        limit = wg.abs().amax(dim=-1, keepdim=True) * ratio
        clipped = wg.clamp(-limit, limit).reshape(w.shape[0], -1)
        deq = grid.fake_quantize(clipped[:, : w.shape[1]], 4, group_size, symmetric, integer_zero=integer_zero)
        dq = grid.pad_inputs(deq, group_size).view(w.shape[0], groups, group_size)
        err = (torch.einsum("tgi,ogi->tog", xp, dq) - ref).pow(2).mean(dim=0)  # [out, groups]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better.unsqueeze(-1), clipped.view(w.shape[0], groups, group_size), best)
    layer.weight.data = best.reshape(w.shape[0], -1)[:, : w.shape[1]].to(layer.weight.dtype)


def apply_to_block(block: Block, stats: dict[str, InputStats], group_size: int, symmetric: bool, *,
                   integer_zero: bool = False) -> None:
    """Search and fold the scales of the block's four linear layers, then clip their weights, each search
    on the grid the layers will be quantized to (`integer_zero`: integer zero points)."""
    attn = block.attn
    heads = (attn.num_heads, attn.num_kv_heads, attn.head_dim)
    for name in ("attn.qkv_proj", "attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
        layer = block.get_submodule(name)
        assert isinstance(layer, nn.Linear)
        s = search_scale(layer, stats[name], group_size, symmetric, heads if name == "attn.o_proj" else None,
                         integer_zero=integer_zero)
        fold(block, name, s)
        stats[name].rows = [r / s for r in stats[name].rows]  # the inputs the layer now receives
        if name != "attn.qkv_proj":  # as in the paper's code, q/k are not clipped (softmax is sensitive)
            clip_weights(layer, stats[name], group_size, symmetric, integer_zero=integer_zero)
