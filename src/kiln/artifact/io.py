"""Write a compressed model as an artifact folder, and load one back into kiln's graph.

Layout: model.safetensors (kiln's parameter names; compressed layers as their packed tensors, sparse
matrices as values + bit mask), config.json (the shapes, Hugging Face style), the tokenizer files,
manifest.json (formats, provenance, sha256 of every file). Writing goes to a temporary folder that is
renamed at the end, so an interrupted run never leaves a half artifact.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from kiln.artifact.manifest import Manifest, file_sha256, verify
from kiln.compress.quantize.qlinear import (
    LAYER_KINDS,
    Int4Linear,
    Int8Linear,
    LowRankLinear,
    QuantEmbedding,
    W8A8Linear,
)
from kiln.errors import InvalidParameterError, ModelFormatError
from kiln.files import check_replaceable, replace_folder
from kiln.model.llama import LlamaModel, storage_layout
from kiln.model.load import SafetensorsReader, read_config
from kiln.model.spec import ModelSpec

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "generation_config.json")
SPARSE_MIN = 0.25  # store a float matrix as values + mask when at least this fraction is zero


def _sparse(tensor: Tensor) -> dict[str, Tensor] | None:
    if tensor.dim() != 2:
        return None
    mask = tensor != 0
    if 1 - mask.float().mean().item() < SPARSE_MIN:
        return None
    flat = mask.flatten()
    padded = torch.nn.functional.pad(flat, (0, (-flat.numel()) % 8)).view(-1, 8).to(torch.uint8)
    bits = (padded << torch.arange(8, dtype=torch.uint8)).sum(dim=1).to(torch.uint8)
    return {"values": tensor.flatten()[flat].contiguous(), "mask": bits}


def _dense(values: Tensor, bits: Tensor, shape: list[int]) -> Tensor:
    flat = ((bits.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1).flatten().bool()
    numel = shape[0] * shape[1]
    out = torch.zeros(numel, dtype=values.dtype)
    out[flat[:numel]] = values
    return out.view(shape)


def state_of(model: LlamaModel) -> tuple[dict[str, Tensor], dict[str, dict[str, Any]]]:
    """Tensors to store and the formats of the non-plain ones, from a (possibly compressed) graph."""
    tensors: dict[str, Tensor] = {}
    formats: dict[str, dict[str, Any]] = {}
    seen: set[int] = set()
    for path, module in model.named_modules():
        if isinstance(module, Int8Linear | Int4Linear | W8A8Linear | LowRankLinear):
            formats[path] = module.meta()
            for name, t in module.tensors().items():
                tensors[f"{path}.{name}"] = t.contiguous()
            continue
        if isinstance(module, QuantEmbedding):
            formats[path] = {"format": "tied_head"}  # the lookup reads the quantized lm_head
            continue
        for name, param in module.named_parameters(recurse=False):
            if param.data_ptr() in seen:
                continue  # a tied weight is stored once
            seen.add(param.data_ptr())
            key = f"{path}.{name}"
            sparse = _sparse(param.data)
            if sparse is not None:
                formats[key] = {"format": "sparse", "shape": list(param.shape),
                                "density": round(sparse["values"].numel() / param.numel(), 6)}
                tensors.update({f"{key}.{k}": v for k, v in sparse.items()})
            else:
                tensors[key] = param.data.contiguous()
    return tensors, formats


def check_output(out: Path) -> None:
    """Refuse an output that `save` would have to destroy (it replaces `out` whole: right for an older
    artifact, not for a user's files)."""
    check_replaceable(out, "manifest.json", "artifact")


def save(model: LlamaModel, tokenizer_folder: Path, out: Path, manifest: Manifest) -> Path:
    """Write the artifact folder `out` (replacing an artifact that exists) and return it."""
    check_output(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        tensors, formats = state_of(model)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "kiln"})
        (tmp / "config.json").write_text(json.dumps(model.spec.to_hf_config(), indent=2))
        for name in TOKENIZER_FILES:
            if (tokenizer_folder / name).is_file():
                shutil.copy(tokenizer_folder / name, tmp / name)
        manifest.tensors = formats
        manifest.files = {p.name: file_sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest.write(tmp)
        replace_folder(tmp, out)
    except OSError as exc:  # a read-only place or a full disk: one line, not a traceback after the work
        raise InvalidParameterError(
            f"cannot write the artifact {out} ({exc}); pass a writable folder with room for it"
        ) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_graph(folder: Path, dtype: torch.dtype, progress: bool = True) -> tuple[ModelSpec, LlamaModel, Manifest]:
    """Verify the artifact's files against its manifest, then rebuild the graph with its compressed layers."""
    manifest = Manifest.read(folder)
    verify(folder, manifest)
    spec = ModelSpec.from_hf_config(read_config(folder))
    # the one weights file the manifest vouches for: another *.safetensors beside it (a stray copy, a user's
    # file) was read too, unverified, and its tensors replaced the artifact's own
    reader = SafetensorsReader(folder, progress, files=[folder / "model.safetensors"])
    with torch.device("meta"):
        model = LlamaModel(spec)
    try:
        for path, fmt in manifest.tensors.items():
            kind = fmt.get("format")
            if kind in LAYER_KINDS:
                prefix = f"{path}."
                parts = {k[len(prefix):]: reader.pop(k) for k in [k for k in reader if k.startswith(prefix)]}
                _replace(model, path, LAYER_KINDS[kind].from_tensors(parts, fmt))
            elif kind == "sparse":
                dense = _dense(reader.pop(f"{path}.values"), reader.pop(f"{path}.mask"), fmt["shape"])
                _assign(model, path, dense, dtype)
            elif kind != "tied_head":
                raise ModelFormatError(f"artifact {folder}: manifest.json gives {path} the format {kind!r}, which this "
                                       "kiln does not read; upgrade kiln or re-create the artifact")
        for name in list(reader):
            _assign(model, name, reader.pop(name), dtype)
    # AttributeError: a packed tensor (qweight, scales) left for a plain layer when its manifest entry was removed
    except (KeyError, RuntimeError, ValueError, AttributeError) as exc:
        raise ModelFormatError(f"artifact {folder} does not match its manifest ({exc}); re-create it") from exc
    if manifest.tensors.get("embed", {}).get("format") == "tied_head":
        assert isinstance(model.lm_head, Int8Linear | Int4Linear)
        model.embed = QuantEmbedding(model.lm_head)
    elif spec.tie_embeddings and isinstance(model.lm_head, nn.Linear):
        model.tie_weights()
    _check_loaded(model, folder)
    model._rope_table(dtype)
    return spec, model.eval(), manifest


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def _assign(model: nn.Module, name: str, tensor: Tensor, dtype: torch.dtype) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    current = getattr(module, attr)
    if current is not None and tuple(current.shape) != tuple(tensor.shape):
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}, the config implies {tuple(current.shape)}")
    value = storage_layout(tensor.to(dtype)) if tensor.is_floating_point() else tensor
    setattr(module, attr, nn.Parameter(value, requires_grad=False))


def _check_loaded(model: nn.Module, folder: Path) -> None:
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_meta:
            raise ModelFormatError(f"artifact {folder} lacks {name}; re-create it")
