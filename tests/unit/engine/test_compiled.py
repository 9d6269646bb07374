"""The torch-compiled runtime: int8 / int4 decode kernels, their dispatch, their results and their disk cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kiln.compress.pipeline import compress
from kiln.compress.quantize import grid
from kiln.compress.quantize.qlinear import Int4Linear, Int8Linear
from kiln.compress.recipe import Quantize, Recipe
from kiln.engine import compiled
from kiln.engine.generate import Generator
from kiln.engine.onnx_runtime import runtime_model
from kiln.engine.sampler import SamplingParams
from kiln.model.load import load


def int4_layer(out_features: int, in_features: int, group_size: int, symmetric: bool) -> Int4Linear:
    torch.manual_seed(0)
    weight = torch.randn(out_features, in_features) * 0.05
    float_layer = nn.Linear(in_features, out_features, bias=False).requires_grad_(False)
    return Int4Linear.from_float(float_layer, group_size, symmetric, grid.quantize_int4(weight, group_size, symmetric))


def close(a: Tensor, b: Tensor) -> bool:
    return bool((a - b).abs().max() <= 1e-5 * b.abs().max())


def test_int8_rows_is_the_layers_product() -> None:
    torch.manual_seed(0)
    layer = Int8Linear.from_float(nn.Linear(96, 40, bias=False).requires_grad_(False))
    x = torch.randn(3, 96)
    assert close(compiled.int8_rows(x, layer.qweight, layer.scales), layer(x))


@pytest.mark.parametrize(("in_features", "group_size", "symmetric"), [(96, 32, True), (200, 64, False)])
def test_int4_rows_is_the_layers_product(in_features: int, group_size: int, symmetric: bool) -> None:
    # 200 inputs in groups of 64: the packed width is padded to 256, and so is x (with zeros)
    layer = int4_layer(24, in_features, group_size, symmetric)
    x = torch.randn(2, in_features)
    padded = F.pad(x, (0, 2 * layer.qweight.shape[1] - in_features))
    assert close(compiled.int4_rows(padded, layer.qweight, layer.scales, layer.offsets), layer(x))
    layer.forward = compiled._DecodeKernel(layer, compiled.int4_rows)  # type: ignore[method-assign]
    assert close(layer(x), compiled.int4_rows(padded, layer.qweight, layer.scales, layer.offsets))


def test_decode_rows_take_the_kernel_and_others_the_layers_forward() -> None:
    layer = Int8Linear.from_float(nn.Linear(16, 8).requires_grad_(False))
    calls: list[int] = []

    def kernel(rows: Tensor, q: Tensor, s: Tensor) -> Tensor:
        calls.append(rows.shape[0])
        return compiled.int8_rows(rows, q, s)

    expected = {n: layer(torch.ones(1, n, 16)) for n in (1, compiled.DECODE_ROWS + 1)}
    layer.forward = compiled._DecodeKernel(layer, kernel)  # type: ignore[method-assign]
    assert close(layer(torch.ones(1, 1, 16)), expected[1])  # the bias is added after the kernel
    assert close(layer(torch.ones(1, compiled.DECODE_ROWS + 1, 16)), expected[compiled.DECODE_ROWS + 1])
    layer(torch.ones(1, 1, 16, dtype=torch.bfloat16))  # bf16 keeps the eager path
    assert calls == [1]


@pytest.mark.parametrize("bits", [8, 4])
def test_compiled_runtime_gives_the_same_greedy_tokens_and_caches_on_disk(
    tiny_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bits: int
) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("KILN_CACHE", str(cache))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    artifact = tmp_path / f"int{bits}"
    quantize = Quantize(bits=bits, group_size=32, symmetric=True, keep_embeddings=False)
    compress(str(tiny_folder), Recipe((quantize,)), artifact, progress=False)
    prompts = [[1, 5, 9, 200, 31], [1, 77, 4]]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    eager = load(str(artifact), progress=False)
    want = [o.token_ids for o in Generator(eager.model, eager.tokenizer).generate(prompts, params)]
    fast = load(str(artifact), progress=False)
    model = runtime_model(fast, "torch-compiled")
    kind = Int8Linear if bits == 8 else Int4Linear
    layers = [m for m in fast.model.modules() if isinstance(m, kind)]
    assert layers and all(isinstance(m.forward, compiled._DecodeKernel) for m in layers)
    got = [o.token_ids for o in Generator(model, fast.tokenizer).generate(prompts, params)]  # type: ignore[arg-type]
    assert got == want
    assert any((cache / "inductor").rglob("*.py"))  # the compiled kernels' sources, for the next process


def test_a_failed_compile_falls_back_to_the_eager_layers_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    layers = [Int8Linear.from_float(nn.Linear(16, 8, bias=False).requires_grad_(False)) for _ in range(2)]
    x = torch.ones(1, 1, 16)
    expected = [layer(x) for layer in layers]

    def broken(*args: Tensor) -> Tensor:
        raise RuntimeError("the C++ compiler failed\nlong log")

    model = nn.Sequential(*layers)
    compiled.compile_decode(model)  # clears an earlier failure
    for layer in layers:
        layer.forward.kernel = broken  # type: ignore[union-attr]
    assert all(close(layer(x), want) for layer, want in zip(layers, expected, strict=True))
    err = capsys.readouterr().err
    assert err.count("kiln: compiling the decode kernels failed") == 1 and "C++ compiler failed" in err
    assert "long log" not in err
    compiled._failed.clear()


def test_a_model_with_nothing_to_compile_says_so(tiny_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    loaded = load(str(tiny_folder), progress=False)  # fp32, no int8 / int4 layers
    assert runtime_model(loaded, "torch-compiled") is loaded.model
    assert "runs as --runtime torch" in capsys.readouterr().err


@pytest.mark.parametrize("chosen", [False, True])
def test_compiled_kernels_are_cached_under_kiln_cache_in_a_fresh_process(tmp_path: Path, chosen: bool) -> None:
    # importing torch._dynamo (a model load does) sets TORCHINDUCTOR_CACHE_DIR to inductor's default first,
    # which the cache's setdefault then took for the user's choice: the kernels went to /tmp/torchinductor_*
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env["KILN_CACHE"] = str(tmp_path / "cache")
    if chosen:
        env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "mine")
    code = ("import os, kiln.engine.compiled as c, torch._dynamo; c.use_disk_cache(); "
            "print(os.environ['TORCHINDUCTOR_CACHE_DIR'])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(tmp_path / ("mine" if chosen else "cache/inductor"))
