"""Artifacts: a compressed graph survives the round trip; tampered, truncated or partial folders are refused."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from kiln.artifact import io
from kiln.artifact.manifest import Manifest
from kiln.compress.prune import unstructured
from kiln.compress.quantize.qlinear import Int4Linear, Int8Linear, LowRankLinear, QuantEmbedding, W8A8Linear
from kiln.errors import InvalidParameterError, ModelFormatError
from kiln.model.llama import Block, LlamaModel

from ..compress.conftest import tiny_model


def compressed() -> LlamaModel:
    model = tiny_model()
    blocks = [b for b in model.layers if isinstance(b, Block)]
    blocks[0].attn.qkv_proj = Int8Linear.from_float(blocks[0].attn.qkv_proj)
    blocks[0].mlp.down_proj = Int4Linear.from_float(blocks[0].mlp.down_proj, 32, False)
    blocks[1].attn.o_proj = W8A8Linear.from_float(blocks[1].attn.o_proj)
    w = blocks[1].mlp.gate_up_proj.weight.detach()
    blocks[1].mlp.down_proj = LowRankLinear(torch.randn(4, 128), torch.randn(64, 4), None)
    unstructured.apply(blocks[2].mlp.gate_up_proj, unstructured.magnitude_mask(w, 0.5))
    head = model.lm_head
    assert isinstance(head, nn.Linear)
    model.lm_head = Int4Linear.from_float(head, 64, True)
    model.embed = QuantEmbedding(model.lm_head)
    return model


@pytest.fixture
def saved(tmp_path: Path) -> tuple[LlamaModel, Path]:
    model = compressed()
    tokenizer_dir = tmp_path / "tok"
    tokenizer_dir.mkdir()
    (tokenizer_dir / "tokenizer.json").write_text("{}")
    out = io.save(model, tokenizer_dir, tmp_path / "artifact", Manifest(source={"name": "tiny"}, recipe={}))
    return model, out


def test_round_trip(saved: tuple[LlamaModel, Path]) -> None:
    model, folder = saved
    manifest = Manifest.read(folder)
    assert set(manifest.files) == {"model.safetensors", "config.json", "tokenizer.json"}
    formats = {v["format"] for v in manifest.tensors.values()}
    assert formats == {"int8", "int4", "w8a8", "lowrank", "sparse", "tied_head"}
    spec, loaded, _ = io.load_graph(folder, torch.float32, progress=False)
    tokens = torch.randint(0, 128, (2, 16))
    assert torch.allclose(loaded(tokens, logits="all"), model(tokens, logits="all"), atol=1e-5)
    assert isinstance(loaded.embed, QuantEmbedding) and spec == model.spec


def test_sparse_matrix_is_stored_compactly(saved: tuple[LlamaModel, Path]) -> None:
    _, folder = saved
    info = Manifest.read(folder).tensors["layers.2.mlp.gate_up_proj.weight"]
    assert info["format"] == "sparse" and info["density"] == pytest.approx(0.5, abs=0.01)


def flip_a_byte(folder: Path) -> None:
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))


def test_flipped_byte_is_refused(saved: tuple[LlamaModel, Path]) -> None:
    _, folder = saved
    flip_a_byte(folder)
    with pytest.raises(ModelFormatError, match="model.safetensors does not match its sha256"):
        io.load_graph(folder, torch.float32, progress=False)


def test_a_weights_file_beside_the_artifacts_own_is_not_read(saved: tuple[LlamaModel, Path]) -> None:
    # a stray *.safetensors was read after model.safetensors, unverified, and its tensors replaced the artifact's
    from safetensors.torch import save_file

    from kiln.model.source import resolve

    model, folder = saved
    save_file({"norm.weight": torch.zeros_like(model.norm.weight)}, str(folder / "notes.safetensors"))
    _, loaded, _ = io.load_graph(folder, torch.float32, progress=False)
    assert torch.equal(loaded.norm.weight, model.norm.weight)
    assert resolve(str(folder)).weight_files() == [folder / "model.safetensors"]


def test_truncated_and_missing_files_are_refused(saved: tuple[LlamaModel, Path], tmp_path: Path) -> None:
    _, folder = saved
    cut = tmp_path / "cut"
    shutil.copytree(folder, cut)
    weights = cut / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelFormatError, match="does not match its sha256"):
        io.load_graph(cut, torch.float32, progress=False)
    (cut / "config.json").unlink()
    with pytest.raises(ModelFormatError, match="config.json is missing"):
        io.load_graph(cut, torch.float32, progress=False)


def test_info_refuses_a_damaged_artifact(saved: tuple[LlamaModel, Path], tmp_path: Path) -> None:
    # without its weights `kiln info` described 0 parameters, 0 bytes and the sha256 of nothing, exit 0
    from kiln.model.info import describe

    _, folder = saved
    flip_a_byte(folder)
    with pytest.raises(ModelFormatError, match="model.safetensors does not match its sha256"):
        describe(str(folder))
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelFormatError, match="model.safetensors is missing"):
        describe(str(folder))


def test_info_counts_the_parameters_of_the_uncompressed_layers(saved: tuple[LlamaModel, Path]) -> None:
    # packed int4 bytes counted as one parameter each, and scales and offsets as parameters, made the
    # default model's int4 artifact 88.1M parameters and its int8 one 134.7M (the model has 134.5M)
    from kiln.model.info import describe

    _, folder = saved
    dense = sum(p.numel() for p in tiny_model().parameters())  # tied: the head's matrix once
    low_rank = 4 * 128 + 64 * 4 - 64 * 128  # block 1's down projection became two factors of rank 4
    assert describe(str(folder))["parameters"] == dense + low_rank


def test_an_artifact_without_its_manifest_says_so(saved: tuple[LlamaModel, Path], tmp_path: Path) -> None:
    # without manifest.json the folder looked like a Hugging Face one, refused for a "missing" weight
    from kiln.model.source import resolve

    _, folder = saved
    bare = tmp_path / "bare"
    shutil.copytree(folder, bare)
    (bare / "manifest.json").unlink()
    with pytest.raises(ModelFormatError, match="no manifest.json"):
        resolve(str(bare))


def test_damaged_manifest(saved: tuple[LlamaModel, Path]) -> None:
    _, folder = saved
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(ModelFormatError, match="manifest.json cannot be read"):
        io.load_graph(folder, torch.float32, progress=False)
    (folder / "manifest.json").write_text(json.dumps({"format": "kiln-artifact", "format_version": 99}))
    with pytest.raises(ModelFormatError, match="upgrade kiln"):
        io.load_graph(folder, torch.float32, progress=False)


@pytest.mark.parametrize("edit", [
    lambda m: [m],  # valid JSON, not an object: an AttributeError traceback
    lambda m: {**m, "files": list(m["files"])},
    lambda m: {**m, "files": {**m["files"], "model.safetensors": 1}},
    lambda m: {**m, "files": {**m["files"], "../outside.txt": "0" * 64}},
    lambda m: {**m, "tensors": {name: "int4" for name in m["tensors"]}},
    lambda m: {**m, "source": "tiny"},
])
def test_a_hand_edited_manifest_of_the_wrong_shape_is_one_line(saved: tuple[LlamaModel, Path],
                                                               edit: Callable[[dict[str, Any]], Any]) -> None:
    _, folder = saved
    path = folder / "manifest.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    with pytest.raises(ModelFormatError, match="manifest.json cannot be read .*; the artifact is damaged"):
        io.load_graph(folder, torch.float32, progress=False)


def test_save_refuses_a_file_or_a_folder_of_other_things(saved: tuple[LlamaModel, Path], tmp_path: Path) -> None:
    # save() replaces its output whole: an artifact may be replaced, a user's files must not be deleted.
    model, folder = saved
    manifest = Manifest(source={"name": "tiny"}, recipe={})
    user_file = tmp_path / "notes.txt"
    user_file.write_text("keep me")
    with pytest.raises(InvalidParameterError, match="is a file"):
        io.save(model, folder, user_file, manifest)
    user_dir = tmp_path / "docs"
    user_dir.mkdir()
    (user_dir / "notes.txt").write_text("keep me")
    with pytest.raises(InvalidParameterError, match="not empty and not a kiln artifact"):
        io.save(model, folder, user_dir, manifest)
    assert user_file.read_text() == "keep me" and (user_dir / "notes.txt").read_text() == "keep me"
    assert not list(tmp_path.glob(".*.partial"))
    assert io.save(model, folder, folder, manifest) == folder  # an existing artifact is replaced


def test_save_to_an_unwritable_place_is_one_error(saved: tuple[LlamaModel, Path]) -> None:
    model, folder = saved
    with pytest.raises(InvalidParameterError, match="cannot write the artifact"):
        io.save(model, folder, Path("/proc/kiln-artifact"), Manifest(source={"name": "tiny"}, recipe={}))


@pytest.mark.parametrize("verb", [["compress", "--quantize", "int8"], ["distill", "--steps", "1"]])
def test_cli_refuses_the_output_before_any_work(verb: list[str], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from kiln.cli import main

    user_file = tmp_path / "notes.txt"
    user_file.write_text("keep me")
    # the model does not exist: a refusal that names the output shows it came before the load
    code = main([*verb, *(["-m"] if verb[0] == "compress" else ["--teacher"]), str(tmp_path / "missing"),
                 "-o", str(user_file)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "is a file" in err and user_file.read_text() == "keep me"


def test_onnx_export_refuses_a_file_or_a_folder_of_other_things_before_any_work(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # the export replaces its folder whole: a user's folder would have been deleted after the build
    from kiln.cli import main

    user_dir = tmp_path / "docs"
    user_dir.mkdir()
    (user_dir / "notes.txt").write_text("keep me")
    user_file = tmp_path / "notes.txt"
    user_file.write_text("keep me")
    for out, says in ((user_dir, "not empty and not a kiln ONNX export"), (user_file, "is a file")):
        # the model does not exist: a refusal that names the output shows it came before the load
        code = main(["export", "--format", "onnx", "-m", str(tmp_path / "missing"), "-o", str(out)])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and says in err
    assert (user_dir / "notes.txt").read_text() == "keep me" and user_file.read_text() == "keep me"
    earlier = tmp_path / "earlier"  # an earlier export may be replaced: the refusal is the missing model's
    earlier.mkdir()
    (earlier / "kiln-export.json").write_text("{}")
    assert main(["export", "--format", "onnx", "-m", str(tmp_path / "missing"), "-o", str(earlier)]) == 2
    assert "missing" in capsys.readouterr().err


@pytest.mark.parametrize("verb", [["compress", "--quantize", "int8", "-m"], ["compress", "--lowrank-rank", "4", "-m"],
                                  ["distill", "--steps", "1", "--teacher"]])
def test_compressing_a_compressed_artifact_is_refused_before_the_load(
        verb: list[str], saved: tuple[LlamaModel, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    # every step reads full-precision matrices: quantize and prune ended in an AssertionError, distill in a
    # failed backward pass, lowrank in "no layer gets smaller ... lower it", each after the load
    from kiln.cli import main
    from kiln.compress import pipeline

    def no_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(pipeline, "load", no_load)
    _, folder = saved
    assert main([*verb, str(folder), "-o", str(tmp_path / "again")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is already compressed (int4, int8, lowrank, w8a8 layers)" in err
    assert "pass the model it was made from (tiny)" in err and not (tmp_path / "again").exists()


def test_compressing_an_artifact_into_itself_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # a pruned artifact compressed with -o naming it was replaced, and the new manifest's source named itself
    from kiln.cli import main
    from kiln.compress import pipeline
    from kiln.compress.recipe import Quantize, Recipe

    model = tiny_model()
    for block in model.layers:
        assert isinstance(block, Block)
        layer = block.mlp.gate_up_proj
        unstructured.apply(layer, unstructured.magnitude_mask(layer.weight.detach(), 0.5))
    (tmp_path / "tok").mkdir()
    folder = io.save(model, tmp_path / "tok", tmp_path / "pruned", Manifest(source={"name": "tiny"}, recipe={}))
    before = (folder / "manifest.json").read_text()
    monkeypatch.setattr(pipeline, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    other_spelling = f"{tmp_path}/../{tmp_path.name}/pruned"
    assert main(["compress", "--quantize", "int8", "-m", str(folder), "-o", other_spelling]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"kiln: error: output {other_spelling} is the artifact being compressed") and "\n" not in err
    with pytest.raises(InvalidParameterError, match="writing would replace it, so pass another folder to -o"):
        pipeline.compress(str(folder), Recipe((Quantize(bits=8),)), folder)
    assert (folder / "manifest.json").read_text() == before


@pytest.mark.parametrize("edit,message", [
    (lambda t: {**t, "layers.0.attn.qkv_proj": {**t["layers.0.attn.qkv_proj"], "format": "int9"}},
     r"gives layers.0.attn.qkv_proj the format 'int9', which this kiln does not read; upgrade kiln"),
    (lambda t: {k: v for k, v in t.items() if k != "layers.0.attn.qkv_proj"}, r"does not match its manifest"),
])
def test_a_tensor_entry_of_another_format_or_removed_is_one_line(saved: tuple[LlamaModel, Path], edit: Callable,
                                                                 message: str) -> None:
    # the packed tensors went to a plain layer: an AttributeError traceback ('Linear' has no attribute 'scales')
    _, folder = saved
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["tensors"] = edit(manifest["tensors"])
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelFormatError, match=message):
        io.load_graph(folder, torch.float32, progress=False)
