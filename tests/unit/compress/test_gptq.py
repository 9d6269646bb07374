"""GPTQ lowers the output error of a quantized layer on the inputs its Hessian came from."""

from __future__ import annotations

import pytest
import torch

from kiln.compress.quantize import gptq, grid

from .conftest import integral_zero_points


@pytest.mark.parametrize("bits,group,sym", [(4, 128, False), (4, 32, True), (8, 128, True)])
def test_gptq_beats_round_to_nearest(bits: int, group: int, sym: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(2048, 32) @ torch.randn(32, 192) * 0.3 + torch.randn(2048, 192) * 0.1  # correlated inputs
    x[:, :4] *= 10  # outlier channels
    w = torch.randn(64, 192) * 0.05
    hessian = 2 * x.T @ x / x.shape[0]
    deq, packed = gptq.gptq(w, hessian, bits, group, sym)
    ref = x @ w.T

    def err(q: torch.Tensor) -> float:
        return float(((x @ q.T) - ref).pow(2).mean())

    assert err(deq) < 0.2 * err(grid.fake_quantize(w, bits, group, sym))
    if bits == 4:
        assert torch.allclose(packed.dequantize(), deq, atol=1e-5)
    else:
        q, scales = packed
        assert torch.allclose(grid.dequantize_int8(q, scales), deq, atol=1e-6)


@pytest.mark.parametrize("sym", [False, True])
def test_refit_lowers_the_output_error_of_the_same_integers(sym: bool) -> None:
    torch.manual_seed(1)
    x = torch.randn(4096, 32) @ torch.randn(32, 320) * 0.3 + torch.randn(4096, 320) * 0.1
    x[:, :4] *= 10
    w = torch.randn(48, 320) * 0.05
    hessian = 2 * x.T @ x / x.shape[0]
    ref = x @ w.T

    def err(q: torch.Tensor) -> float:
        return float(((x @ q.T) - ref).pow(2).mean())

    plain, packed = gptq.gptq(w, hessian, 4, 128, sym)
    assert isinstance(packed, grid.Int4Weight)
    scales, offsets = gptq.refit_int4(w, hessian, packed.q, packed.scales, packed.offsets, 128, sym)
    same_integers = grid.Int4Weight(packed.q, scales, offsets, 128, 320).dequantize()
    assert err(same_integers) < 0.95 * err(plain)
    if sym:
        assert torch.allclose(offsets, -8 * scales)

    refitted, packed2 = gptq.gptq(w, hessian, 4, 128, sym, refit_rounds=2)
    assert isinstance(packed2, grid.Int4Weight)
    assert torch.allclose(packed2.dequantize(), refitted, atol=1e-5)
    assert packed2.symmetric == sym
    assert err(refitted) < err(plain)


def test_integer_zero_points_stay_integers_through_the_refits() -> None:
    torch.manual_seed(2)
    x = torch.randn(2048, 32) @ torch.randn(32, 192) * 0.3 + torch.randn(2048, 192) * 0.1
    x[:, :4] *= 10
    w = torch.randn(64, 192) * 0.05 + 0.01  # off-centre rows: zero points away from 8
    hessian = 2 * x.T @ x / x.shape[0]
    ref = x @ w.T

    def err(q: torch.Tensor) -> float:
        return float(((x @ q.T) - ref).pow(2).mean())

    plain, packed = gptq.gptq(w, hessian, 4, 64, False, integer_zero=True)
    assert isinstance(packed, grid.Int4Weight)
    zeros = integral_zero_points(packed.scales, packed.offsets)
    scales, offsets = gptq.refit_int4(w, hessian, packed.q, packed.scales, packed.offsets, 64, False,
                                      integer_zero=True)
    assert torch.equal(integral_zero_points(scales, offsets), zeros)  # the same z, only the scales solved for
    assert err(grid.Int4Weight(packed.q, scales, offsets, 64, 192).dequantize()) < err(plain)

    refitted, packed2 = gptq.gptq(w, hessian, 4, 64, False, refit_rounds=2, integer_zero=True)
    assert isinstance(packed2, grid.Int4Weight)
    integral_zero_points(packed2.scales, packed2.offsets)
    assert torch.allclose(packed2.dequantize(), refitted, atol=1e-5)
    assert err(refitted) < 0.2 * err(grid.fake_quantize(w, 4, 64, False, integer_zero=True))
