"""AWQ's searches score candidates by the mean squared output error over every calibration token."""

from __future__ import annotations

import torch
from torch import nn

from kiln.compress.blocks import InputStats
from kiln.compress.quantize import awq, grid


def _inputs() -> torch.Tensor:
    torch.manual_seed(0)
    x = torch.randn(2, 60, 80) * (torch.rand(80) * 3)
    x[:, 0, :4] *= 40  # a few very large activations, as a sequence's first positions carry
    return x


def _stats(x: torch.Tensor) -> InputStats:
    stats = InputStats(x.shape[-1], hessian=True)
    for batch in x.split(1):  # accumulated over batches, as the walker does
        stats.update(batch)
    return stats


def test_the_error_is_the_mean_squared_output_error_over_every_token() -> None:
    x = _inputs()
    w = torch.randn(24, 80)
    delta = grid.fake_quantize(w, 4, 32, False) - w
    rows = x.reshape(-1, 80)
    explicit = float((rows @ (w + delta).T - rows @ w.T).pow(2).mean())
    assert abs(awq._error(_stats(x).gram(), delta) - explicit) <= 1e-4 * explicit


def test_the_scale_search_returns_the_grid_point_with_the_least_explicit_error() -> None:
    x = _inputs()
    layer = nn.Linear(80, 24, bias=False)
    stats = _stats(x)
    chosen = awq.search_scale(layer, stats, 32, False)
    rows, w = x.reshape(-1, 80), layer.weight.detach()

    def explicit(s: torch.Tensor) -> float:
        q = grid.fake_quantize(w * s, 4, 32, False)
        return float(((rows / s) @ q.T - rows @ w.T).pow(2).mean())

    base = stats.mean_abs.clamp(min=1e-6)
    candidates = [torch.ones(80)] + [(base.pow(a / awq.GRID) / (base.pow(a / awq.GRID).max()
                                      * base.pow(a / awq.GRID).min()).sqrt()) for a in range(1, awq.GRID)]
    best = min(candidates, key=explicit)
    assert torch.allclose(chosen, best)
    assert explicit(chosen) < explicit(torch.ones(80))  # the large channels make scaling worth it here


def test_clipping_picks_each_groups_best_ratio_on_every_token() -> None:
    x = _inputs()
    layer = nn.Linear(80, 12, bias=False)  # 80 inputs at g32: a last group of 16, padded
    w = layer.weight.detach().clone()
    awq.clip_weights(layer, _stats(x), 32, False)
    rows = torch.nn.functional.pad(x.reshape(-1, 80), (0, 16)).view(-1, 3, 32)
    tried = []
    for ratio in awq.CLIP_GRID:
        padded = torch.nn.functional.pad(w, (0, 16)).view(12, 3, 32)
        limit = padded.abs().amax(-1, keepdim=True) * ratio
        clipped = padded.clamp(-limit, limit)
        q = torch.nn.functional.pad(grid.fake_quantize(clipped.reshape(12, -1)[:, :80], 4, 32, False), (0, 16))
        err = torch.einsum("tgi,ogi->tog", rows, q.view(12, 3, 32) - padded).pow(2).mean(0)  # [out, groups]
        tried.append((err, clipped))
    errors = torch.stack([e for e, _ in tried])  # [ratios, out, groups]
    best = errors.argmin(0)
    expected = torch.stack([c for _, c in tried])[best, torch.arange(12)[:, None], torch.arange(3)[None, :]]
    assert torch.equal(layer.weight.detach(), expected.reshape(12, -1)[:, :80])
    assert (best > 0).any()  # some group gained from clipping, so the check compared real choices
