"""Quantization grids and packing: formulas of the issue, exact round trips, padding of ragged groups."""

from __future__ import annotations

import pytest
import torch

from kiln.compress.quantize import grid

from .conftest import integral_zero_points


def test_int8_per_channel_formula() -> None:
    w = torch.tensor([[0.5, -1.0, 0.25], [2.0, 0.0, -0.5]])
    q, s = grid.quantize_int8(w)
    assert torch.allclose(s, torch.tensor([1.0, 2.0]) / 127)
    assert q.tolist() == [[64, -127, 32], [127, 0, -32]]
    assert (grid.dequantize_int8(q, s) - w).abs().max() <= s.max() / 2


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [False, True])
def test_int4_groups_with_ragged_inputs(group_size: int, symmetric: bool) -> None:
    w = torch.randn(8, 576)  # 576 = 4.5 groups of 128
    q = grid.quantize_int4(w, group_size, symmetric)
    assert q.q.shape == (8, grid.groups_of(576, group_size) * group_size) and q.q.max() <= 15
    deq = q.dequantize()
    assert deq.shape == w.shape
    step = q.scales.repeat_interleave(group_size, dim=1)[:, :576]
    assert ((deq - w).abs() <= step / 2 + 1e-6).all()
    assert q.symmetric == symmetric


def test_values_on_the_grid_survive_exactly() -> None:
    # weights already on a g32 asymmetric grid (like the default model's Q4_1) requantize without error
    levels = torch.randint(0, 16, (4, 64)).float()
    levels[:, ::32], levels[:, 1::32] = 0, 15  # as in Q4_1: each block's min and max are levels 0 and 15
    w = levels * 0.01 - 0.07
    assert torch.allclose(grid.quantize_int4(w, 32, False).dequantize(), w, atol=1e-6)


def test_pack_unpack() -> None:
    q = torch.randint(0, 16, (3, 10), dtype=torch.uint8)
    packed = grid.pack_int4(q)
    assert packed.shape == (3, 5) and torch.equal(grid.unpack_int4(packed), q)


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_integer_zero_points_are_integers_at_float_zero_points_error(group_size: int) -> None:
    torch.manual_seed(group_size)
    w = torch.randn(64, 576) * 0.05
    w[:3] = w[:3].abs() + 0.01  # rows of positive weights only: their range is widened to hold 0, not clipped
    q = grid.quantize_int4(w, group_size, False, integer_zero=True)
    integral_zero_points(q.scales, q.offsets)
    assert ((q.dequantize() - w).abs() <= q.scales.repeat_interleave(group_size, 1)[:, :576] / 2 + 1e-6).all()
    float_error = (grid.fake_quantize(w, 4, group_size, False) - w).pow(2).mean()
    integer_error = (grid.fake_quantize(w, 4, group_size, False, integer_zero=True) - w).pow(2).mean()
    assert integer_error <= 1.15 * float_error  # measured 1.02-1.07 (g128-g32); z's rounding moves the grid by < s/2
    integral_zero_points(*grid.int4_params_mse(w, group_size, False, integer_zero=True))


def test_a_symmetric_grid_ignores_integer_zero_points() -> None:
    w = torch.randn(16, 256)
    assert torch.equal(grid.quantize_int4(w, 64, True, integer_zero=True).dequantize(),
                       grid.quantize_int4(w, 64, True).dequantize())
    assert all(torch.equal(a, b) for a, b in zip(grid.int4_params_mse(w, 64, True, integer_zero=True),
                                                 grid.int4_params_mse(w, 64, True), strict=True))
