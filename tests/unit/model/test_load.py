"""Model sources: the default, GGUF files and HF folders; the GGUF cache; every refusal is one clear line."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from kiln.errors import ModelFormatError, ModelNotFoundError, UnsupportedArchitectureError
from kiln.model import gguf as kgguf
from kiln.model.load import LoadedModel, load
from kiln.model.source import default_gguf_path, resolve, sha256_file


def write_gguf(path: Path, arch: str) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_context_length(32)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="does not exist.*'default'"):
        resolve(str(tmp_path / "nope.gguf"))


def test_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelFormatError, match="no config.json"):
        resolve(str(tmp_path))


def test_folder_without_weights_mentions_pickle(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ModelFormatError, match=r"no \*\.safetensors.*pickle"):
        resolve(str(tmp_path))


def test_file_that_is_not_gguf(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(ModelFormatError, match="not a GGUF file"):
        resolve(str(path))


@pytest.mark.parametrize("keep", [8, 20, 100, 4000, 1_000_000, 50_000_000])
def test_truncated_gguf_is_refused(tmp_path: Path, keep: int) -> None:
    """Cut in the header, its key/values, its tensor list or its data: one line naming the file and the fix,
    none of the numpy wording the short read happened to cause."""
    path = tmp_path / "cut.gguf"
    with default_gguf_path().open("rb") as src:
        path.write_bytes(src.read(keep))
    with pytest.raises(ModelFormatError) as info:
        kgguf.read_header(path)
    message = str(info.value)
    assert f"GGUF file {path} is truncated or corrupt: it ends at byte {keep}" in message
    assert "download or copy it again" in message
    assert not any(word in message for word in ("reshape", "dtype", "axis", "unpack"))


def test_gguf_with_a_bad_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.gguf"
    with default_gguf_path().open("rb") as src:
        data = bytearray(src.read(1_000_000))
    data[4:8] = (99).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFormatError, match=r"bad.gguf is corrupt \(its header does not parse\); download"):
        kgguf.read_header(path)


def test_gguf_of_unsupported_architecture(tmp_path: Path) -> None:
    path = tmp_path / "gpt2.gguf"
    write_gguf(path, "gpt2")
    with pytest.raises(UnsupportedArchitectureError, match="'gpt2'.*llama"):
        kgguf.read_header(path)


def test_hf_folder_of_unsupported_architecture(tmp_path: Path, tiny_folder: Path) -> None:
    folder = tmp_path / "m"
    shutil.copytree(tiny_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UnsupportedArchitectureError, match="GPT2LMHeadModel"):
        load(str(folder), progress=False)


def test_corrupt_safetensors_is_refused(tmp_path: Path, tiny_folder: Path) -> None:
    folder = tmp_path / "m"
    shutil.copytree(tiny_folder, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelFormatError, match="truncated or corrupt"):
        load(str(folder), progress=False)


def test_default_header_describes_smollm2() -> None:
    header = kgguf.read_header(default_gguf_path())
    spec = header.spec
    assert (spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.hidden_size) == (30, 9, 3, 576)
    assert spec.tie_embeddings and spec.max_position == 8192
    assert header.tensor_types["Q4_1"] > 0
    assert header.num_parameters == spec.num_parameters


def test_sha256_is_memoised_and_correct(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "blob"
    path.write_bytes(b"kiln" * 1000)
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert sha256_file(path) == expected
    assert expected in (tmp_path / "cache" / "sha256.json").read_text()
    path.write_bytes(b"changed")  # new size and mtime: hashed again
    assert sha256_file(path) == hashlib.sha256(b"changed").hexdigest()


def test_default_model_is_cached_after_first_load(default_model: LoadedModel,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    assert (default_model.folder / kgguf.SOURCE_FILE).is_file()
    assert (default_model.folder / "model.safetensors").is_file()

    def refuse(*_args: object) -> None:
        raise AssertionError("a cached GGUF must not be dequantized again")

    monkeypatch.setattr(kgguf, "_convert", refuse)
    again = load("default", progress=False)
    assert again.folder == default_model.folder and again.sha256 == default_model.sha256


def test_interrupted_conversion_leaves_no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache"))

    def interrupted(*_args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(kgguf, "_convert", interrupted)
    source = resolve("default")
    with pytest.raises(KeyboardInterrupt):
        kgguf.ensure_converted(source.path, source.sha256)
    gguf_cache = tmp_path / "cache" / "gguf"
    assert not gguf_cache.exists() or not any(gguf_cache.iterdir())


def test_hf_folder_loads(tiny_folder: Path) -> None:
    loaded = load(str(tiny_folder), progress=False)
    assert loaded.source.kind == "hf"
    assert loaded.spec.max_position == 64
    logits = loaded.model(torch.tensor([loaded.tokenizer.encode("hello")]))
    assert logits.shape == (1, loaded.spec.vocab_size)


@pytest.mark.parametrize("bits", [8, 4])
def test_artifact_with_quantized_embeddings_runs_in_bf16(tiny_folder: Path, tmp_path: Path, bits: int) -> None:
    from kiln.compress.pipeline import compress
    from kiln.compress.recipe import Quantize, Recipe

    compress(str(tiny_folder), Recipe((Quantize(bits=bits, group_size=32, keep_embeddings=False),)), tmp_path / "q",
             progress=False)
    want = load(str(tmp_path / "q"), progress=False)
    got = load(str(tmp_path / "q"), precision="bf16", progress=False)
    ids = torch.tensor([[1, 5, 9, 200, 31]])
    with torch.inference_mode():  # the quantized embedding's fp32 rows enter a bf16 graph
        a, b = want.model(ids, logits="all")[0], got.model(ids, logits="all")[0]
    assert b.dtype == torch.bfloat16
    assert float((a - b.float()).abs().max()) < 0.05 * float(a.max() - a.min())


def test_text_that_is_not_utf8_is_refused_in_one_line(default_model: LoadedModel) -> None:
    # bytes that are not UTF-8 on stdin or in argv arrive as lone surrogates: kiln generate and chat ended in a
    # TypeError traceback from the Rust tokenizer (exit 1)
    from kiln.errors import InvalidParameterError

    text = b"hi \xff there".decode("utf-8", "surrogateescape")
    tok = default_model.tokenizer
    with pytest.raises(InvalidParameterError, match="bytes that are not valid UTF-8; pass UTF-8 text"):
        tok.encode(text)
    with pytest.raises(InvalidParameterError, match="not valid UTF-8"):
        tok.encode_chat([{"role": "user", "content": text}])
    assert tok.encode("hi 日本 🎉")  # any real text still encodes


def test_an_onnx_export_as_model_points_at_its_source(tmp_path: Path) -> None:
    # it was refused for lacking config.json, as if it were a damaged Hugging Face folder
    folder = tmp_path / "onnx"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"")
    (folder / "kiln-export.json").write_text(json.dumps({"source": "my-int4"}))
    with pytest.raises(ModelFormatError, match="is an ONNX export .*pass -m 'my-int4' --runtime onnxruntime$"):
        resolve(str(folder))


@pytest.mark.parametrize("damage", ["tokenizer_config", "heads"])
def test_a_tokenizer_transformers_cannot_load_is_one_line(tmp_path: Path, tiny_folder: Path, damage: str) -> None:
    # a damaged tokenizer_config.json, or a config.json that fails transformers' own checks, was a traceback
    folder = tmp_path / "m"
    shutil.copytree(tiny_folder, folder)
    if damage == "tokenizer_config":
        (folder / "tokenizer_config.json").write_text("{bad")
    else:
        config = json.loads((folder / "config.json").read_text())
        config.pop("head_dim", None)
        (folder / "config.json").write_text(json.dumps({**config, "num_attention_heads": 6}))  # 32 wide
    with pytest.raises(ModelFormatError, match=r"transformers cannot load its tokenizer \(.+\); fix config.json"):
        load(str(folder), progress=False)


def test_a_cache_that_cannot_be_written_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a KILN_CACHE that is a file (or read-only, or full) ended the GGUF's first load in an OSError traceback
    from kiln.errors import InvalidParameterError

    cache = tmp_path / "cache"
    cache.write_text("not a folder")
    monkeypatch.setenv("KILN_CACHE", str(cache))
    with pytest.raises(InvalidParameterError, match=f"under {cache} .*; set KILN_CACHE to a writable folder"):
        kgguf.ensure_converted(default_gguf_path(), "0" * 64)


@pytest.mark.parametrize("name", ["", "  "])
def test_an_empty_model_name_is_refused(name: str) -> None:
    # "" was the working folder ("folder '' has no config.json"); an unset shell variable passed as -m or --draft
    with pytest.raises(ModelNotFoundError, match="^the model name is empty; pass"):
        resolve(name)
