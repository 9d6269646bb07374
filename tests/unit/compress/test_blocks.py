"""The block walker's reference stream and the drift correction GPTQ's `target = "model"` uses."""

from __future__ import annotations

import copy

import torch

from kiln.compress.blocks import LINEARS, BlockWalker, InputStats
from kiln.compress.quantize import grid
from kiln.model.llama import LlamaModel


def test_drift_correction_fits_the_reference_outputs() -> None:
    torch.manual_seed(0)
    reference = torch.randn(4096, 16) @ torch.randn(16, 96) + 0.1 * torch.randn(4096, 96)
    drifted = reference @ (torch.eye(96) + 0.05 * torch.randn(96, 96)) + 0.02 * torch.randn(4096, 96)
    w = torch.randn(32, 96) * 0.1
    stats = InputStats(96, hessian=True)
    for rows in range(0, 4096, 1024):  # accumulated over batches, as the walker does
        stats.update_pair(drifted[rows:rows + 1024], reference[rows:rows + 1024])
    corrected = stats.drift_corrected(w, damp=0.01)
    target = reference @ w.T

    def err(weight: torch.Tensor) -> float:
        return float((drifted @ weight.T - target).pow(2).mean())

    assert err(corrected) < 0.2 * err(w)


def test_no_drift_leaves_the_weight_alone() -> None:
    x = torch.randn(512, 24)
    stats = InputStats(24, hessian=True)
    stats.update_pair(x, x)
    w = torch.randn(8, 24)
    assert torch.allclose(stats.drift_corrected(w, damp=0.01), w, atol=1e-6)


def test_reference_stream_follows_the_uncompressed_model(tiny: LlamaModel, tokens: torch.Tensor) -> None:
    untouched = copy.deepcopy(tiny)
    walker = BlockWalker(tiny, tokens, batch_size=4, reference=True)
    expected = BlockWalker(untouched, tokens, batch_size=4)
    for i in walker:
        block = walker.block(i)
        for name, seen in walker.sequential(i):
            assert seen.drift is not None
            if name == LINEARS[0]:
                if i == 0:  # nothing changed before block 0's first layer
                    assert float(seen.drift.abs().max()) == 0.0
                else:  # the blocks before were quantized: the inputs drifted from the reference
                    assert float(seen.drift.abs().max()) > 0.0
            layer = block.get_submodule(name)  # change it the way quantization does
            layer.weight.data = grid.fake_quantize(layer.weight.data, 4, 32, True)
        expected.advance(i)
        assert walker.reference is not None
        for ref, exp in zip(walker.reference, expected.hidden, strict=True):
            assert torch.allclose(ref, exp, atol=1e-5)
        assert not torch.allclose(walker.hidden[0], expected.hidden[0], atol=1e-3)


def test_sequential_inputs_see_the_layers_changed_before_them(tiny: LlamaModel, tokens: torch.Tensor) -> None:
    walker = BlockWalker(tiny, tokens, batch_size=4)
    for i in walker:
        block = walker.block(i)
        inputs = walker.hidden
        names = []
        for name, seen in walker.sequential(i):
            # a whole run of the block as it is now hands the layer the same inputs
            whole = walker.collect(i, (name,), hessian=True)[name]
            assert seen.xtx is not None and whole.xtx is not None
            assert torch.allclose(seen.xtx, whole.xtx, rtol=1e-5, atol=1e-6)
            layer = block.get_submodule(name)
            layer.weight.data = grid.fake_quantize(layer.weight.data, 4, 32, True)
            names.append(name)
        assert names == list(LINEARS)
        with torch.inference_mode():  # the walker moved on by the changed block
            outputs = [block(h, walker.cos, walker.sin, walker.meta[h.shape[0]], None) for h in inputs]
        for got, want in zip(walker.hidden, outputs, strict=True):
            assert torch.equal(got, want)


def test_divided_inputs_have_the_statistics_of_the_scaled_inputs() -> None:
    # AWQ folds s into what produces x and keeps searching on the statistics of x / s
    torch.manual_seed(0)
    x = torch.randn(3, 40, 48) * (torch.rand(48) * 4)
    s = torch.rand(48) + 0.5
    divided, direct = InputStats(48, hessian=True), InputStats(48, hessian=True)
    divided.update(x)
    divided.divide_inputs(s)
    direct.update(x / s)
    assert divided.xtx is not None and direct.xtx is not None
    assert torch.allclose(divided.xtx, direct.xtx, rtol=1e-5, atol=1e-3)
    assert torch.allclose(divided.mean_abs, direct.mean_abs, rtol=1e-5)
    assert torch.allclose(divided.norm, direct.norm, rtol=1e-5)
    assert torch.allclose(divided.abs_max, direct.abs_max, rtol=1e-5)


def test_collected_drift_is_what_the_sequential_walk_sees(tiny: LlamaModel, tokens: torch.Tensor) -> None:
    # AWQ collects a whole block at once and aims its first layer at the uncompressed model; that layer's drift
    # and the reference stream must be the ones GPTQ's layer-by-layer walk computes
    twin = copy.deepcopy(tiny)
    whole = BlockWalker(tiny, tokens, batch_size=4, reference=True)
    sequential = BlockWalker(twin, tokens, batch_size=4, reference=True)
    first = LINEARS[0]
    for i in whole:
        block = whole.block(i)
        stats = whole.collect(i, LINEARS, hessian=True, drift=(first,))
        assert stats[first].drift is not None and all(stats[n].drift is None for n in LINEARS[1:])
        for name, seen in sequential.sequential(i):
            if name == first:
                assert seen.drift is not None and seen.xtx is not None and stats[first].xtx is not None
                assert torch.allclose(stats[first].drift, seen.drift, rtol=1e-5, atol=1e-6)
                assert torch.allclose(stats[first].xtx, seen.xtx, rtol=1e-5, atol=1e-6)
                # nothing changed before block 0; the blocks before the others were quantized
                assert (float(seen.drift.abs().max()) == 0.0) == (i == 0)
            layer = sequential.block(i).get_submodule(name)
            layer.weight.data = grid.fake_quantize(layer.weight.data, 4, 32, True)
        for name in LINEARS:
            layer = block.get_submodule(name)
            layer.weight.data = grid.fake_quantize(layer.weight.data, 4, 32, True)
        whole.advance(i)
        assert whole.reference is not None and sequential.reference is not None
        for got, want in zip([*whole.reference, *whole.hidden], [*sequential.reference, *sequential.hidden],
                             strict=True):
            assert torch.allclose(got, want, atol=1e-5)
