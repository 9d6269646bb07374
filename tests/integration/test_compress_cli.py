"""kiln compress / export as a user runs them; every artifact works in generate, eval and bench."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

KILN = str(Path(sys.executable).parent / "kiln")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return {**os.environ, "KILN_HOME": str(tmp_path_factory.mktemp("home"))}


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([KILN, *args], capture_output=True, text=True, timeout=900, env=env)


def one_line_error(proc: subprocess.CompletedProcess[str], text: str) -> None:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("kiln: error:")]
    assert proc.returncode == 2 and len(errors) == 1 and text in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def int8(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("art") / "int8"
    proc = run(env, "compress", "--quantize", "int8", "--quantize-embeddings", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    return out


def test_int8_artifact_is_a_quarter_of_fp32(int8: Path) -> None:
    size = (int8 / "model.safetensors").stat().st_size
    assert 0.24 < size / (134_515_008 * 4) < 0.27
    manifest = json.loads((int8 / "manifest.json").read_text())
    assert manifest["source"]["name"] == "default" and manifest["recipe"]["steps"][0]["bits"] == 8
    assert set(manifest["files"]) >= {"model.safetensors", "config.json", "tokenizer.json"}


def test_artifact_runs_in_generate_eval_and_bench(env: dict[str, str], int8: Path) -> None:
    gen = run(env, "generate", "-m", str(int8), "What is the capital of France?", "--temperature", "0")
    assert gen.returncode == 0 and "Paris" in gen.stdout, gen.stderr
    ev = run(env, "eval", "-m", str(int8), "--task", "wikitext2", "--limit-tokens", "1024", "--json")
    assert ev.returncode == 0 and 10 < json.loads(ev.stdout)["ppl"] < 60, ev.stderr
    bench = run(env, "bench", "-m", str(int8), "--runs", "1", "--batch-sizes", "1", "--prompt-tokens", "16",
                "--new-tokens", "4", "--json")
    assert bench.returncode == 0 and json.loads(bench.stdout)["bytes_in_memory"] < 200e6, bench.stderr


def test_flipped_byte_is_refused(env: dict[str, str], int8: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "flipped"
    shutil.copytree(int8, copy)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x01
    weights.write_bytes(bytes(data))
    one_line_error(run(env, "generate", "-m", str(copy), "hi"), "does not match its sha256")


def test_export_gguf(env: dict[str, str], int8: Path, tmp_path: Path) -> None:
    out = tmp_path / "int8.gguf"
    proc = run(env, "export", "-m", str(int8), "--format", "gguf", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    info = json.loads(run(env, "info", "-m", str(out), "--json").stdout)
    assert info["dtypes"]["Q8_0"] == 211 and info["parameters"] == 134_515_008
    # kiln reading the GGUF back runs the artifact's model: the export rounds only the scales (to
    # float16). Re-quantizing each block, as the export once did, moved these logits by 0.8.
    import torch

    from kiln.model.load import load

    artifact, exported = load(str(int8), progress=False), load(str(out), progress=False)
    ids = torch.tensor([artifact.tokenizer.encode("It was the best of times, it was the worst of times.")])
    with torch.inference_mode():
        gap = (artifact.model(ids, logits="all") - exported.model(ids, logits="all")).abs().max().item()
    assert gap < 0.1


def test_recipe_errors_before_any_work(env: dict[str, str], tmp_path: Path) -> None:
    recipe = tmp_path / "bad.toml"
    recipe.write_text('[[step]]\nkind = "quantize"\nbits = 5\n')
    one_line_error(run(env, "compress", "--recipe", str(recipe), "-o", str(tmp_path / "x")), "bits = 5")
    assert not (tmp_path / "x").exists()
    one_line_error(run(env, "compress", "-o", str(tmp_path / "y")), "nothing to do")


def test_sweep_makes_several_artifacts(env: dict[str, str], tmp_path: Path) -> None:
    sweep = tmp_path / "sweep.toml"
    sweep.write_text('[[artifact]]\nname = "a"\n[[artifact.step]]\nkind = "quantize"\nbits = 8\n'
                     '[[artifact]]\nname = "b"\n[[artifact.step]]\nkind = "prune"\nsparsity = 0.3\n')
    proc = run(env, "compress", "--sweep", str(sweep), "-o", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "a" / "manifest.json").is_file() and (tmp_path / "out" / "b" / "manifest.json").is_file()


def test_int4_with_integer_zero_points(env: dict[str, str], tmp_path: Path) -> None:
    # offsets -z x scale, which the ONNX export hands MatMulNBits as its zero points (its fast kernels)
    import torch

    from kiln.compress.quantize.qlinear import Int4Linear
    from kiln.model.load import load

    out = tmp_path / "int4-zero"
    proc = run(env, "compress", "--quantize", "int4", "--zero-point", "integer", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    step = json.loads((out / "manifest.json").read_text())["recipe"]["steps"][0]
    assert step["bits"] == 4 and step["zero_point"] == "integer" and not step["symmetric"]
    layers = [m for m in load(str(out)).model.modules() if isinstance(m, Int4Linear)]
    assert len(layers) == 4 * 30  # SmolLM2-135M's 30 blocks, four int4 matrices each
    for layer in layers:
        z = -layer.offsets.double() / layer.scales.double()
        assert (z - z.round()).abs().max() <= 1e-4 and z.min() > -0.5 and z.max() < 15.5
    assert bool(torch.cat([layer.offsets.flatten() for layer in layers]).ne(0).any())
