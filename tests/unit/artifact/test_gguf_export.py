"""GGUF export: tensor types and values as llama.cpp will read them, the tokenizer copied from the source."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kiln.artifact.gguf_export import _permute, export
from kiln.compress.quantize.qlinear import Int4Linear, Int8Linear, QuantEmbedding, W8A8Linear
from kiln.model.llama import Block
from kiln.model.load import LoadedModel


@pytest.fixture(scope="module")
def exported(default_model: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> tuple[LoadedModel, Path]:
    import copy

    loaded = copy.copy(default_model)
    model = copy.deepcopy(default_model.model)
    block = model.layers[0]
    assert isinstance(block, Block)
    block.attn.qkv_proj = Int4Linear.from_float(block.attn.qkv_proj, 32, symmetric=False)
    block.mlp.down_proj = Int4Linear.from_float(block.mlp.down_proj, 128, symmetric=True)
    block.mlp.gate_up_proj = Int8Linear.from_float(block.mlp.gate_up_proj)
    block.attn.o_proj = W8A8Linear.from_float(block.attn.o_proj)
    model.lm_head = Int8Linear.from_float(model.lm_head)  # an int8 tied head, as `--quantize-embeddings int8` makes
    model.embed = QuantEmbedding(model.lm_head)
    loaded.model = model
    out = tmp_path_factory.mktemp("gguf") / "model.gguf"
    return loaded, export(loaded, out)


def tensors(path: Path) -> dict[str, object]:
    from gguf import GGUFReader

    return {t.name: t for t in GGUFReader(path).tensors}


def dequantized(t: object) -> np.ndarray:
    from gguf import quants

    return quants.dequantize(t.data, t.tensor_type).reshape(list(reversed([int(x) for x in t.shape])))


def test_types_follow_the_layers(exported: tuple[LoadedModel, Path]) -> None:
    _, path = exported
    found = tensors(path)
    assert found["blk.0.attn_q.weight"].tensor_type.name == "Q4_1"
    assert found["blk.0.ffn_down.weight"].tensor_type.name == "Q4_0"
    assert found["blk.0.ffn_gate.weight"].tensor_type.name == "Q8_0"
    assert found["blk.0.attn_output.weight"].tensor_type.name == "Q8_0"
    assert found["blk.1.attn_q.weight"].tensor_type.name == "F32"
    assert found["token_embd.weight"].tensor_type.name == "Q8_0"
    assert len(found) == 2 + 9 * 30  # embedding, final norm, 9 per layer (tied head: no output.weight)


def test_int4_values_are_kept_exactly(exported: tuple[LoadedModel, Path]) -> None:
    loaded, path = exported
    block = loaded.model.layers[0]
    assert isinstance(block, Block)
    found = tensors(path)
    q_rows = block.attn.qkv_proj.dequantized()[: 9 * 64]
    expected = _permute(q_rows, 9).numpy()  # llama.cpp's rotary row order
    assert np.allclose(dequantized(found["blk.0.attn_q.weight"]), expected, atol=2e-3)
    down = block.mlp.down_proj.dequantized().numpy()
    assert np.allclose(dequantized(found["blk.0.ffn_down.weight"]), down, atol=2e-3)


def test_tokenizer_comes_from_the_source(exported: tuple[LoadedModel, Path], default_model: LoadedModel) -> None:
    from gguf import GGUFReader

    _, path = exported
    ours = GGUFReader(path).fields
    theirs = GGUFReader(default_model.source.path).fields
    assert ours["tokenizer.ggml.model"].contents() == "gpt2"
    assert len(ours["tokenizer.ggml.tokens"].contents()) == 49152
    assert ours["tokenizer.chat_template"].contents() == theirs["tokenizer.chat_template"].contents()


def test_int8_blocks_hold_kilns_integers(exported: tuple[LoadedModel, Path]) -> None:
    """Q8_0 keeps each row's integers and scale (as float16), not a second per-block quantization."""
    loaded, path = exported
    block = loaded.model.layers[0]
    assert isinstance(block, Block)
    layer = block.mlp.gate_up_proj
    assert isinstance(layer, Int8Linear)
    gate = tensors(path)["blk.0.ffn_gate.weight"]
    rows = gate.data.reshape(gate.data.shape[0], -1, 34)  # Q8_0 block: float16 d, then 32 int8
    inter = rows.shape[0]
    d = rows[..., :2].copy().view(np.float16)[..., 0]
    q = rows[..., 2:].copy().view(np.int8).reshape(inter, -1)
    assert np.array_equal(q, layer.qweight[:inter].numpy())
    assert np.array_equal(d, np.repeat(layer.scales[:inter].numpy().astype(np.float16)[:, None], d.shape[1], axis=1))
    # so the weights llama.cpp reads differ from kiln's by the float16 rounding of the scales alone
    w = layer.dequantized()[:inter].numpy()
    assert np.allclose(dequantized(gate), w, rtol=2**-11, atol=0)
    w8a8 = block.attn.o_proj
    assert isinstance(w8a8, W8A8Linear)
    out = tensors(path)["blk.0.attn_output.weight"]
    q_out = out.data.reshape(out.data.shape[0], -1, 34)[..., 2:].copy().view(np.int8).reshape(out.data.shape[0], -1)
    assert np.array_equal(q_out, w8a8.qweight_t.t().numpy())


def test_a_folder_or_unwritable_output_is_one_error(exported: tuple[LoadedModel, Path], tmp_path: Path) -> None:
    # these once ended in IsADirectoryError / FileNotFoundError tracebacks
    from kiln.errors import InvalidParameterError

    loaded, _ = exported
    with pytest.raises(InvalidParameterError, match="is a folder"):
        export(loaded, tmp_path)
    with pytest.raises(InvalidParameterError, match="cannot write /proc/kiln.gguf"):
        export(loaded, Path("/proc/kiln.gguf"))
    assert not list(tmp_path.glob(".*.partial"))


@pytest.mark.parametrize("args,says", [
    (["-o", "{model}"], "is the model being exported"),  # the export replaced the user's GGUF with its own
    (["--precision", "int4", "-o", "{out}"], "--precision int4 applies to --format onnx"),  # ignored: F32 came out
])
def test_export_refuses_its_input_as_output_and_an_onnx_precision_before_the_load(
        args: list[str], says: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from kiln import cli
    from kiln.model import load as load_module

    def no_load(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(load_module, "load", no_load)
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF keep me")
    argv = [a.format(model=model, out=tmp_path / "out.gguf") for a in args]
    assert cli.main(["export", "-m", str(model), "--format", "gguf", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err
    assert model.read_bytes() == b"GGUF keep me" and not (tmp_path / "out.gguf").exists()



@pytest.mark.parametrize("kind", ["text", "another GGUF", "cut GGUF"])
def test_an_existing_output_that_kiln_did_not_export_is_kept(kind: str, exported: tuple[LoadedModel, Path],
                                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """-o naming a file the user has: refused before the load, the file as it was (it was overwritten)."""
    from kiln import cli
    from kiln.model import load as load_module
    from kiln.model.source import default_gguf_path

    def no_load(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the model was loaded")

    out = tmp_path / "out.gguf"
    if kind == "text":
        out.write_text("my notes")
    else:
        with default_gguf_path().open("rb") as src:  # llama.cpp's file, general.name not kiln's
            out.write_bytes(src.read(None if kind == "another GGUF" else 1000))
    before = out.read_bytes()
    monkeypatch.setattr(load_module, "load", no_load)
    assert cli.main(["export", "--format", "gguf", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "exists and is not a GGUF that kiln exported" in err
    assert out.read_bytes() == before


def test_an_output_in_a_new_folder_is_written(exported: tuple[LoadedModel, Path], tmp_path: Path) -> None:
    # the folder's absence ended the export with an error after all of its work
    out = tmp_path / "new" / "deeper" / "model.gguf"
    assert export(exported[0], out, progress=False) == out and out.read_bytes()[:4] == b"GGUF"


def test_a_fifo_as_output_is_refused_without_opening_it(tmp_path: Path) -> None:
    # opened to read its first bytes, a FIFO without a writer blocked the command for good
    import os
    import threading

    from kiln.artifact.gguf_export import check_output
    from kiln.errors import InvalidParameterError
    from kiln.model.source import default_gguf_path

    fifo = tmp_path / "out.gguf"
    os.mkfifo(fifo)
    raised: list[BaseException] = []

    def check() -> None:
        try:
            check_output(fifo, default_gguf_path())
        except InvalidParameterError as exc:
            raised.append(exc)

    thread = threading.Thread(target=check, daemon=True)  # a daemon: a blocked open must not hang the suite
    thread.start()
    thread.join(10)
    if thread.is_alive():
        with open(fifo, "wb"):  # let the blocked open return
            pass
        raise AssertionError("check_output opened the FIFO and blocked")
    assert len(raised) == 1 and "exists and is not a GGUF that kiln exported" in str(raised[0])


def test_an_earlier_export_is_replaced(exported: tuple[LoadedModel, Path]) -> None:
    from kiln.artifact.gguf_export import check_output
    from kiln.model.source import default_gguf_path

    check_output(exported[1], default_gguf_path())  # no error: the export's own output may be written again


def test_export_shows_progress(default_model: LoadedModel, tmp_path: Path, recorded_bars: Callable[[object], list[Any]]
                               ) -> None:
    # the export ran for seconds (minutes on a larger model) with no bar after the load's
    from kiln.artifact import gguf_export

    bars = recorded_bars(gguf_export)
    export(default_model, tmp_path / "m.gguf")
    [bar] = bars
    assert bar.disable is None and bar.total == default_model.spec.num_layers + 2 and bar.done == bar.total


@pytest.mark.parametrize("where", ["missing", "changed"])
def test_an_artifact_whose_source_gguf_is_gone_says_so(where: str, tmp_path: Path) -> None:
    # missing: "model '...' does not exist; pass a .gguf file" about a file the user never passed;
    # changed: "this model has none", about an artifact made from a GGUF
    from types import SimpleNamespace

    from kiln.artifact.manifest import Manifest
    from kiln.errors import InvalidParameterError

    origin = tmp_path / "origin.gguf"
    if where == "changed":
        origin.write_bytes(b"GGUF but another file")
    folder = tmp_path / "artifact"
    folder.mkdir()
    Manifest(source={"name": str(origin), "sha256": "0" * 64, "kind": "gguf"}, recipe={}).write(folder)
    loaded = SimpleNamespace(source=SimpleNamespace(kind="artifact", path=folder, name=str(folder)), folder=folder,
                             spec=None, model=None)
    with pytest.raises(InvalidParameterError, match=f"made from, '{origin}', which is no longer there as it was; "):
        export(loaded, tmp_path / "out.gguf")  # type: ignore[arg-type]
