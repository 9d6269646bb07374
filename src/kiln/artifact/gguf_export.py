"""`kiln export --format gguf`: write a model or artifact as a GGUF file that llama.cpp loads and runs.

int4 layers map exactly onto llama.cpp's blocks of 32 (a symmetric group's scale is Q4_0's d; an
asymmetric one's scale and zero give Q4_1's d and m); int8 per-channel weights (and W8A8 ones) keep
their integers in Q8_0 blocks, each block with its row's scale as d; other matrices are written as F32
(kiln's compute precision), norms as F32. The only rounding is of those scales (and Q4_1's m) to
float16.
q/k rows are permuted to llama.cpp's rotary layout, as its own converter does. The tokenizer and
chat template are copied from the source GGUF when the model came from one; the GGUF writer is
gguf-py's (llama.cpp's own Python package).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor, nn
from tqdm import tqdm

from kiln.artifact.manifest import Manifest, is_artifact
from kiln.compress.quantize import grid
from kiln.compress.quantize.qlinear import Int4Linear, Int8Linear, LowRankLinear, W8A8Linear
from kiln.errors import InvalidParameterError, ModelFormatError, ModelNotFoundError
from kiln.model.gguf import open_reader
from kiln.model.llama import Block
from kiln.model.load import LoadedModel
from kiln.model.source import ModelSource, resolve

BLOCK = 32  # llama.cpp's block for Q4_0, Q4_1 and Q8_0
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
NAME_MARK = " (kiln)"  # general.name's end in every export: an earlier export is the one file -o may replace


def _permute(w: Tensor, heads: int) -> Tensor:
    """HF rotary layout (halves) -> llama.cpp's (interleaved pairs), per head, on the rows."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _q4_blocks(weight: grid.Int4Weight) -> tuple[np.ndarray, Any]:
    """Exact Q4_0 (symmetric) or Q4_1 blocks from kiln's int4 groups."""
    from gguf import GGMLQuantizationType

    out, in_features = weight.q.shape[0], weight.in_features
    if in_features % BLOCK:
        raise InvalidParameterError(f"{in_features} inputs are not a multiple of {BLOCK}; GGUF int4 needs that")
    per_group = weight.group_size // BLOCK
    q = weight.q[:, :in_features].reshape(out, -1, BLOCK).numpy()  # [out, blocks, 32]
    scales = weight.scales.repeat_interleave(per_group, dim=1)[:, : q.shape[1]].numpy()
    offsets = weight.offsets.repeat_interleave(per_group, dim=1)[:, : q.shape[1]].numpy()
    nibbles = (q[..., :16] | (q[..., 16:] << 4)).astype(np.uint8)  # llama.cpp: low nibbles first half
    d = scales.astype(np.float16)[..., None].view(np.uint8)
    if weight.symmetric:  # w = d (q - 8)
        return np.concatenate([d, nibbles], axis=-1).reshape(out, -1), GGMLQuantizationType.Q4_0
    m = offsets.astype(np.float16)[..., None].view(np.uint8)  # w = d q + m
    return np.concatenate([d, m, nibbles], axis=-1).reshape(out, -1), GGMLQuantizationType.Q4_1


def _q8_blocks(q: Tensor, scales: Tensor) -> tuple[np.ndarray, Any]:
    """Q8_0 blocks holding kiln's int8 rows as they are: every block of a row gets the row's scale as d.

    Re-quantizing the dequantized row per block (gguf-py's quantizer) would pick a new d per block and
    round every weight again onto that grid: a second quantization of an already quantized matrix
    (default model: llama.cpp's perplexity on the int8 export was 0.51% above kiln's on the artifact
    that way, 0.22% with the integers kept)."""
    from gguf import GGMLQuantizationType

    out, in_features = q.shape
    if in_features % BLOCK:
        raise InvalidParameterError(f"{in_features} inputs are not a multiple of {BLOCK}; GGUF Q8_0 needs that")
    blocks = in_features // BLOCK
    d = np.repeat(scales.float().numpy().astype(np.float16)[:, None], blocks, axis=1)[..., None].view(np.uint8)
    values = q.numpy().astype(np.int8).reshape(out, blocks, BLOCK).view(np.uint8)
    return np.concatenate([d, values], axis=-1).reshape(out, -1), GGMLQuantizationType.Q8_0


def _int4_rows(layer: Int4Linear, rows: slice | None, heads: int | None) -> grid.Int4Weight:
    weight = layer.unpacked()
    q, scales, offsets = weight.q, weight.scales, weight.offsets
    if rows is not None:
        q, scales, offsets = q[rows], scales[rows], offsets[rows]
    if heads is not None:
        q, scales, offsets = (_permute(t, heads) for t in (q, scales, offsets))
    return grid.Int4Weight(q.contiguous(), scales.contiguous(), offsets.contiguous(), weight.group_size,
                           weight.in_features)


def _tensor(module: nn.Module, heads: int | None = None, rows: slice | None = None) -> tuple[np.ndarray, Any]:
    """(data, raw GGML type or None for F32) of one linear layer, a row slice of it, rotary-permuted."""
    from gguf import GGMLQuantizationType, quants

    if isinstance(module, Int4Linear):
        return _q4_blocks(_int4_rows(module, rows, heads))
    if isinstance(module, Int8Linear | W8A8Linear) and getattr(module, "smooth", None) is None:
        q = module.qweight if isinstance(module, Int8Linear) else module.qweight_t.t()
        q, scales = (q, module.scales) if rows is None else (q[rows], module.scales[rows])
        if heads is not None:
            q, scales = _permute(q, heads), _permute(scales, heads)
        return _q8_blocks(q.contiguous(), scales.contiguous())
    if isinstance(module, Int8Linear | W8A8Linear | LowRankLinear):
        w = module.dequantized()
    else:
        assert isinstance(module, nn.Linear)
        w = module.weight.detach().float()
    if rows is not None:
        w = w[rows]
    if heads is not None:
        w = _permute(w, heads)
    if isinstance(module, W8A8Linear):  # its unfolded SmoothQuant factor is now in w: new integers anyway
        return quants.quantize(w.contiguous().numpy(), GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0
    return w.contiguous().numpy().astype(np.float32), None


def _source_gguf(loaded: LoadedModel) -> Path | None:
    """The GGUF this model (or the artifact's source) was made from, for its tokenizer metadata."""
    if loaded.source.kind == "gguf":
        return loaded.source.path
    if is_artifact(loaded.folder):
        source = Manifest.read(loaded.folder).source
        if source.get("kind") == "gguf":
            return _artifact_origin(source)
    return None


def _artifact_origin(source: dict[str, Any]) -> Path:
    """The GGUF an artifact was made from, as its manifest names it, unchanged since. Its absence was the loader's
    "model '...' does not exist; pass a .gguf file" about a file the user never passed (or, changed, "this model
    has none" about an artifact made from one)."""
    name = str(source.get("name"))
    try:
        origin: ModelSource | None = resolve(name)
    except (ModelNotFoundError, ModelFormatError, OSError):
        origin = None
    if origin is None or origin.kind != "gguf" or origin.sha256 != source.get("sha256"):
        raise InvalidParameterError(
            f"GGUF export copies the tokenizer from the GGUF this artifact was made from, {name!r}, which is no "
            "longer there as it was; put that file back, or make the artifact again from a GGUF that is there")
    return origin.path


def _copy_tokenizer(writer: Any, gguf_path: Path) -> None:
    from gguf import GGUFValueType

    reader = open_reader(gguf_path)
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        kind = GGUFValueType(field.types[0])
        if kind == GGUFValueType.ARRAY:
            writer.add_key_value(key, field.contents(), kind, sub_type=GGUFValueType(field.types[-1]))
        else:
            writer.add_key_value(key, field.contents(), kind)


def check_output(out: Path, model_path: Path) -> None:
    """Refuse an output `export` would have to destroy: a folder, the GGUF file being exported (replaced by
    its export, the user's model was gone without a word, an F32 file five times its size in its place), or any
    other file but an earlier export (a text file or someone's GGUF was overwritten as readily)."""
    if out.is_dir():
        raise InvalidParameterError(f"output {out} is a folder; pass a file name such as {out / 'model.gguf'}")
    if not out.exists():
        return
    if out.resolve() == model_path.resolve():
        raise InvalidParameterError(f"output {out} is the model being exported, which the export would replace; "
                                    "pass another file name")
    if not out.is_file() or not _exported_by_kiln(out):  # a device or a FIFO is not opened (a FIFO would block)
        raise InvalidParameterError(f"output {out} exists and is not a GGUF that kiln exported; the export would "
                                    "replace it, so pass a new file name (or remove the file first)")


def _exported_by_kiln(path: Path) -> bool:
    """Whether `path` is a GGUF written by `export` (its general.name ends in NAME_MARK)."""
    from kiln.model.source import GGUF_MAGIC

    with path.open("rb") as f:
        if f.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
            return False
    try:
        name = open_reader(path).get_field("general.name")
    except ModelFormatError:  # a damaged file: whatever it was, it is not kiln's to replace
        return False
    return name is not None and str(name.contents()).endswith(NAME_MARK)


def export(loaded: LoadedModel, out: Path, progress: bool = True) -> Path:
    """Write `loaded` as the GGUF file `out`, through a temporary file beside it: an interrupted or failed
    export leaves no half-written GGUF (and keeps the file it was to replace)."""
    from gguf import GGUFWriter

    check_output(out, loaded.source.path)
    spec, model = loaded.spec, loaded.model
    source = _source_gguf(loaded)
    if source is None:
        raise InvalidParameterError(
            "GGUF export copies the tokenizer from the GGUF the model came from, and this model has none; "
            "export models made from a .gguf (such as the default)"
        )
    arch = GGUF_ARCH[spec.model_type]
    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
    writer = GGUFWriter(str(tmp), arch)
    writer.add_name(f"{loaded.source.name}{NAME_MARK}")
    writer.add_block_count(spec.num_layers)
    writer.add_context_length(spec.max_position)
    writer.add_embedding_length(spec.hidden_size)
    writer.add_feed_forward_length(spec.intermediate_size)
    writer.add_head_count(spec.num_heads)
    writer.add_head_count_kv(spec.num_kv_heads)
    writer.add_key_length(spec.head_dim)
    writer.add_value_length(spec.head_dim)
    writer.add_rope_dimension_count(spec.head_dim)
    writer.add_rope_freq_base(spec.rope_theta)
    writer.add_layer_norm_rms_eps(spec.rms_norm_eps)
    writer.add_vocab_size(spec.vocab_size)
    # steps: the tokenizer (its GGUF read takes seconds), each layer converted, the file written
    bar = tqdm(total=len(model.layers) + 2, desc="export gguf", unit="step", disable=None if progress else True)
    bar.set_postfix_str("tokenizer")
    _copy_tokenizer(writer, source)
    bar.update(1)
    bar.set_postfix_str("layers")
    permute = arch == "llama"  # llama.cpp's llama uses interleaved rotary pairs; qwen2 keeps halves

    def add(name: str, data: np.ndarray, raw: Any) -> None:
        writer.add_tensor(name, data, raw_dtype=raw) if raw is not None else writer.add_tensor(name, data)

    head = model.lm_head
    embed = model.embed
    if isinstance(embed, nn.Embedding):
        add("token_embd.weight", embed.weight.detach().float().numpy(), None)
    else:  # a quantized tied embedding is the quantized head
        add("token_embd.weight", *_tensor(head))
    if not spec.tie_embeddings:
        add("output.weight", *_tensor(head))
    add("output_norm.weight", model.norm.weight.detach().float().numpy(), None)
    h, hkv, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
    for i, block in enumerate(model.layers):
        assert isinstance(block, Block)
        qkv = block.attn.qkv_proj
        rows = {"q": slice(0, h * d), "k": slice(h * d, (h + hkv) * d), "v": slice((h + hkv) * d, (h + 2 * hkv) * d)}
        add(f"blk.{i}.attn_q.weight", *_tensor(qkv, h if permute else None, rows["q"]))
        add(f"blk.{i}.attn_k.weight", *_tensor(qkv, hkv if permute else None, rows["k"]))
        add(f"blk.{i}.attn_v.weight", *_tensor(qkv, None, rows["v"]))
        bias = getattr(qkv, "bias", None)
        if bias is not None:
            for part, name in (("q", "attn_q"), ("k", "attn_k"), ("v", "attn_v")):
                add(f"blk.{i}.{name}.bias", bias.detach().float()[rows[part]].numpy(), None)
        add(f"blk.{i}.attn_output.weight", *_tensor(block.attn.o_proj))
        inter = spec.intermediate_size
        add(f"blk.{i}.ffn_gate.weight", *_tensor(block.mlp.gate_up_proj, None, slice(0, inter)))
        add(f"blk.{i}.ffn_up.weight", *_tensor(block.mlp.gate_up_proj, None, slice(inter, 2 * inter)))
        add(f"blk.{i}.ffn_down.weight", *_tensor(block.mlp.down_proj))
        add(f"blk.{i}.attn_norm.weight", block.input_norm.weight.detach().float().numpy(), None)
        add(f"blk.{i}.ffn_norm.weight", block.post_attn_norm.weight.detach().float().numpy(), None)
        bar.update(1)
    try:
        bar.set_postfix_str("write")
        out.parent.mkdir(parents=True, exist_ok=True)  # as the ONNX export does: -o new/model.gguf just works
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
        bar.update(1)
    except OSError as exc:  # a missing or read-only folder, a full disk: one line, not a traceback
        raise InvalidParameterError(f"cannot write {out} ({exc}); pass a writable path with room for it") from exc
    finally:
        bar.close()
        tmp.unlink(missing_ok=True)
    return out

