"""Compressed linear layers compute what their dequantized weights compute, and store/restore exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kiln.compress.quantize import grid, qlinear
from kiln.compress.quantize.qlinear import Int4Linear, Int8Linear, LowRankLinear, QuantEmbedding, W8A8Linear, widened

from .conftest import integral_zero_points


@pytest.fixture
def layer() -> nn.Linear:
    torch.manual_seed(0)
    lin = nn.Linear(96, 40, bias=True)
    return lin


def roundtrip(module: nn.Module) -> nn.Module:
    return type(module).from_tensors({k: v.clone() for k, v in module.tensors().items()}, module.meta())


def test_int8(layer: nn.Linear) -> None:
    q = Int8Linear.from_float(layer)
    x = torch.randn(3, 5, 96)
    expected = torch.nn.functional.linear(x, grid.fake_quantize(layer.weight.detach(), 8, 0, True), layer.bias)
    assert torch.allclose(q(x), expected, atol=1e-5)
    assert torch.allclose(roundtrip(q)(x), q(x))


@pytest.mark.parametrize("symmetric,integer_zero", [(False, False), (True, False), (False, True)])
def test_int4(layer: nn.Linear, symmetric: bool, integer_zero: bool) -> None:
    q = Int4Linear.from_float(layer, 32, symmetric, integer_zero=integer_zero)
    x = torch.randn(2, 96)
    deq = grid.fake_quantize(layer.weight.detach(), 4, 32, symmetric, integer_zero=integer_zero)
    expected = torch.nn.functional.linear(x, deq, layer.bias)
    assert torch.allclose(q(x), expected, atol=1e-5)
    assert torch.allclose(roundtrip(q)(x), q(x))
    if integer_zero:  # stored as offsets -z * scale, which read back as integers
        restored = roundtrip(q)
        assert isinstance(restored, Int4Linear)
        integral_zero_points(restored.scales, restored.offsets)
    assert q.qweight.dtype == torch.uint8 and q.qweight.shape == (40, 48)


def test_w8a8_uses_int8_activations(layer: nn.Linear) -> None:
    q = W8A8Linear.from_float(layer)
    x = torch.randn(4, 96)
    exact = layer(x)
    assert (q(x) - exact).abs().max() < 0.05 * exact.abs().max()
    assert torch.allclose(roundtrip(q)(x), q(x))
    assert q.qweight_t.dtype == torch.int8


def test_lowrank_and_tied_embedding(layer: nn.Linear) -> None:
    a, b = torch.randn(4, 96), torch.randn(40, 4)
    low = LowRankLinear(a, b, None)
    x = torch.randn(2, 96)
    assert torch.allclose(low(x), x @ (b @ a).T, atol=1e-5)
    head = Int8Linear.from_float(layer)
    embed = QuantEmbedding(head)
    ids = torch.tensor([[0, 39, 7]])
    assert torch.allclose(embed(ids)[0], head.dequantized()[ids[0]], atol=1e-6)
    head4 = Int4Linear.from_float(layer, 32, False)
    assert torch.allclose(QuantEmbedding(head4)(ids)[0], head4.dequantized()[ids[0]], atol=1e-6)


def test_model_bytes_counts_packed_weights(tiny) -> None:
    from types import SimpleNamespace

    from kiln.benchmark.latency import model_bytes

    loaded = SimpleNamespace(model=tiny)
    before = model_bytes(loaded)  # type: ignore[arg-type]
    block = tiny.layers[0]
    dense = block.mlp.down_proj.weight.numel()
    block.mlp.down_proj = Int8Linear.from_float(block.mlp.down_proj)
    after = model_bytes(loaded)  # type: ignore[arg-type]
    # the int8 codes (1 byte each) and one fp32 scale per row replace 4 bytes per weight
    assert after == before - 4 * dense + dense + 4 * block.mlp.down_proj.out_features


def test_widened_layers_compute_the_same_and_let_go_after(layer: nn.Linear, monkeypatch: pytest.MonkeyPatch) -> None:
    model = nn.Sequential(Int8Linear.from_float(layer), nn.ReLU(), Int4Linear.from_float(nn.Linear(40, 64), 32, True))
    x = torch.randn(4, 96)
    before = model(x)
    with widened(model) as kept:
        assert kept and all(m.wide is not None for m in (model[0], model[2]))
        assert torch.equal(model(x), before)  # the matrix each call would have built: bit for bit
    assert model[0].wide is None and model[2].wide is None
    monkeypatch.setattr(qlinear, "available_bytes", lambda: 1000)  # no room: nothing is kept
    with widened(model) as kept:
        assert not kept and model[0].wide is None
