"""The calibration-based quantizers run through the pipeline on a tiny model and beat rounding."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kiln.compress import pipeline
from kiln.compress.blocks import LINEARS, BlockWalker
from kiln.compress.calibration import CalibrationSet
from kiln.compress.quantize import awq
from kiln.compress.quantize.qlinear import Int4Linear
from kiln.compress.recipe import Calibration, Quantize, Recipe
from kiln.model.llama import LlamaModel


def _quantized(model: LlamaModel, tokens: torch.Tensor, step: Quantize) -> LlamaModel:
    model = copy.deepcopy(model)
    calib = CalibrationSet(tokens, Path("calibration.txt"), "0" * 64, Calibration(samples=tokens.shape[0]))
    ctx = pipeline.Context(SimpleNamespace(model=model), Recipe((step,)), None, False, calibration=calib)  # type: ignore[arg-type]
    pipeline.quantize(ctx, step)
    return model


def _logit_error(model: LlamaModel, reference: LlamaModel, tokens: torch.Tensor) -> float:
    with torch.inference_mode():
        return float((model(tokens, logits="all") - reference(tokens, logits="all")).pow(2).mean())


@pytest.fixture
def calib_tokens() -> torch.Tensor:
    return torch.randint(0, 128, (16, 64), generator=torch.Generator().manual_seed(2))


def test_gptq_targets_beat_round_to_nearest(tiny: LlamaModel, calib_tokens: torch.Tensor) -> None:
    errors = {}
    for name, step in {
        "rtn": Quantize(bits=4, method="rtn", group_size=32),
        "layer": Quantize(bits=4, method="gptq", group_size=32, target="layer", refit=0),
        "model": Quantize(bits=4, method="gptq", group_size=32, target="model", refit=2),
    }.items():
        model = _quantized(tiny, calib_tokens, step)
        assert all(isinstance(b.get_submodule("mlp.down_proj"), Int4Linear) for b in model.layers)
        errors[name] = _logit_error(model, tiny, calib_tokens)
    assert errors["layer"] < errors["rtn"]
    assert errors["model"] < errors["layer"]


def test_awq_with_the_layer_target_is_the_papers_algorithm(tiny: LlamaModel, calib_tokens: torch.Tensor) -> None:
    # target = "layer": no reference stream and no first layer aimed at the uncompressed model; each block is
    # scaled, clipped and rounded on the stream the blocks before it, already quantized, hand on
    step = Quantize(bits=4, method="awq", group_size=32, target="layer")
    model = _quantized(tiny, calib_tokens, step)
    expected = copy.deepcopy(tiny)
    walker = BlockWalker(expected, calib_tokens)
    for i in walker:
        block = walker.block(i)
        awq.apply_to_block(block, walker.collect(i, LINEARS, hessian=True), 32, False)
        for name in LINEARS:
            pipeline._set(block, name, pipeline._quantized(pipeline._linear(block, name), step))
        walker.advance(i)
    with torch.inference_mode():
        got = model(calib_tokens, logits="all")
        assert torch.equal(got, expected(calib_tokens, logits="all"))
        # the default target changes what comes out (its first layers aim at the uncompressed model)
        aimed = _quantized(tiny, calib_tokens, Quantize(bits=4, method="awq", group_size=32))
        assert not torch.equal(got, aimed(calib_tokens, logits="all"))


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_integer_zero_points_reach_every_int4_layer_and_the_head(tiny: LlamaModel, calib_tokens: torch.Tensor,
                                                                method: str) -> None:
    from .conftest import integral_zero_points

    step = Quantize(bits=4, method=method, group_size=32, zero_point="integer", keep_embeddings=False)
    model = _quantized(tiny, calib_tokens, step)
    layers = [m for m in model.modules() if isinstance(m, Int4Linear)]
    assert model.lm_head in layers and len(layers) == 4 * len(model.layers) + 1
    for layer in layers:
        integral_zero_points(layer.scales, layer.offsets)
