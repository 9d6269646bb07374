"""Describe a model from its files alone (no weights loaded): what `kiln info` prints."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

from kiln.model import gguf
from kiln.model.source import resolve
from kiln.model.spec import ModelSpec
from kiln.plan.memory import Layout, PlanPrecision


def describe(name: str) -> dict[str, Any]:
    """Architecture, sizes, dtypes, bytes on disk and sha256 of the model `name`."""
    source = resolve(name)
    if source.kind == "gguf":
        header = gguf.read_header(source.path)
        spec, dtypes, num_params = header.spec, dict(header.tensor_types), header.num_parameters
    else:
        if source.kind == "artifact":  # the files a load would refuse are not described as a model
            from kiln.artifact.manifest import Manifest, verify

            verify(source.path, Manifest.read(source.path))
        spec, dtypes, num_params = _describe_folder(source.path, source.kind == "artifact")
    return {
        "name": name,
        "path": str(source.path),
        "format": source.kind,
        "architecture": spec.architecture,
        "parameters": num_params,
        "layers": spec.num_layers,
        "heads": spec.num_heads,
        "kv_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "vocab_size": spec.vocab_size,
        "context_length": spec.max_position,
        "tie_embeddings": spec.tie_embeddings,
        "rope_theta": spec.rope_theta,
        "rope_scaling": spec.rope_scaling.kind,
        "dtypes": dtypes,
        "size_bytes": source.size_bytes,
        "sha256": source.sha256,
    }


def spec_of(name: str) -> ModelSpec:
    """The spec of a model from its config alone: a config.json file, a GGUF header, or a folder's config."""
    path = Path(name).expanduser()
    if name != "default" and path.suffix == ".json" and path.is_file():
        from kiln.model.load import read_config

        return ModelSpec.from_hf_config(read_config(path.parent, path.name))
    if name != "default" and (path / "config.json").is_file():  # a folder's config, with or without weights
        from kiln.artifact.manifest import Manifest, is_artifact, verify_file
        from kiln.model.load import read_config

        if is_artifact(path):  # a damaged artifact's config was planned as if sound; the weights stay unread
            verify_file(path, Manifest.read(path), "config.json")

        return ModelSpec.from_hf_config(read_config(path))
    source = resolve(name)
    if source.kind == "gguf":
        return gguf.read_header(source.path).spec
    from kiln.model.load import read_config

    return ModelSpec.from_hf_config(read_config(source.path))


def artifact_layout(name: str) -> Layout | None:
    """How a kiln artifact stores its weights, from its manifest and tensor index (no weights read), or None
    for anything else: what `kiln plan -m ARTIFACT` prices without --precision. The layers' format is the one
    most of them are stored in ("int4" where its layers are int4 and its head int8); the head's is the one
    the onnxruntime export gives it (artifact/onnx_export.plan_for), as the torch runtime's is stored."""
    path = Path(name).expanduser()
    if name == "default" or not path.is_dir():
        return None
    from kiln.artifact.manifest import Manifest, is_artifact
    from kiln.artifact.onnx_export import float_offsets, head_bits, plan_for_folder, quantize_step
    from kiln.model.load import read_safetensors_header

    if not is_artifact(path):
        return None
    tensors = Manifest.read(path).tensors
    formats = {meta.get("format") for meta in tensors.values()}
    layers: PlanPrecision = "int4" if "int4" in formats else "int8" if formats & {"int8", "w8a8"} else "fp32"
    spec = spec_of(name)
    plan = plan_for_folder(path, spec, "auto")
    bits = head_bits(plan)
    head: PlanPrecision = "int8" if bits == 8 else "int4" if bits == 4 else "fp32"
    # the one weights file an artifact loads from (artifact/io.load_graph); without it (a config and manifest
    # copied alone) the layers' format prices every weight, as for a config
    weights = path / "model.safetensors"
    sizes = {tensor: entry.end - entry.start
             for tensor, entry in (read_safetensors_header(weights).items() if weights.is_file() else ())}
    for key, meta in tensors.items():  # a sparse matrix is stored as values and a mask, and loaded dense (fp32)
        if meta.get("format") == "sparse":
            sizes.pop(f"{key}.values", None)
            sizes.pop(f"{key}.mask", None)
            sizes[f"{key}.weight"] = 4 * math.prod(meta["shape"])  # under its own prefix, as embed. / lm_head. count
    embedding = sum(size for tensor, size in sizes.items() if tensor.startswith("embed."))
    head_bytes = sum(size for tensor, size in sizes.items() if tensor.startswith("lm_head."))
    group = plan.block_size if layers == "int4" else 128
    split = layers == "int4" and float_offsets(quantize_step(path))
    if spec.tie_embeddings:  # the head is stored once: as lm_head's codes where quantized, else as the embedding
        return Layout(layers, head, group, plan.shared_embedding, sum(sizes.values()), 0, head_bytes or embedding,
                      split)
    return Layout(layers, head, group, plan.shared_embedding, sum(sizes.values()), embedding, head_bytes, split)


def _describe_folder(folder: Path, artifact: bool) -> tuple[ModelSpec, dict[str, int], int]:
    from kiln.model.load import read_config, read_safetensors_header

    spec = ModelSpec.from_hf_config(read_config(folder))
    dtypes: Counter[str] = Counter()
    shapes: dict[str, tuple[int, ...]] = {}
    for path in [folder / "model.safetensors"] if artifact else sorted(folder.glob("*.safetensors")):
        for name, entry in read_safetensors_header(path).items():
            dtypes[entry.dtype] += 1
            shapes[name] = tuple(entry.shape)
    return spec, dict(dtypes), _count_parameters(shapes, _packed_shapes(folder) if artifact else {})


# Tensor formats whose stored tensors are not the weight itself (packed integers with their scales and
# offsets, or a sparse tensor's values and indices): the weight's own shape counts instead. A low-rank
# layer's factors are its real parameters, so they count as stored.
PACKED_FORMATS = ("int8", "int4", "w8a8", "sparse")


def _packed_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    from kiln.artifact.manifest import Manifest

    tensors = Manifest.read(folder).tensors
    return {key: tuple(meta["shape"]) for key, meta in tensors.items() if meta.get("format") in PACKED_FORMATS}


def _count_parameters(stored: dict[str, tuple[int, ...]], packed: dict[str, tuple[int, ...]]) -> int:
    """The model's parameters: each packed weight by its logical shape (its bias as stored), every other
    stored tensor by its elements."""
    total = sum(math.prod(shape) for shape in packed.values())
    for name, shape in stored.items():
        owner, _, part = name.rpartition(".")
        if (owner in packed and part != "bias") or name in packed:
            continue
        total += math.prod(shape)
    return total


def format_text(info: dict[str, Any]) -> str:
    dtypes = ", ".join(f"{k} x{v}" for k, v in sorted(info["dtypes"].items(), key=lambda kv: -kv[1]))
    rows = [
        ("model", info["name"]),
        ("path", info["path"]),
        ("format", f"{info['format']} ({dtypes})"),
        ("architecture", info["architecture"]),
        ("parameters", f"{info['parameters'] / 1e6:.1f}M ({info['parameters']:,})"),
        ("layers", info["layers"]),
        ("heads", f"{info['heads']} (KV heads {info['kv_heads']}, head dim {info['head_dim']})"),
        ("hidden", f"{info['hidden_size']} (MLP {info['intermediate_size']})"),
        ("vocab", f"{info['vocab_size']:,}"),
        ("context", f"{info['context_length']:,} tokens"),
        ("embeddings", "tied to the output head" if info["tie_embeddings"] else "separate output head"),
        ("rope", f"theta {info['rope_theta']:g}, scaling {info['rope_scaling']}"),
        ("size on disk", f"{info['size_bytes'] / 1e6:.1f} MB ({info['size_bytes']:,} bytes)"),
        ("sha256", info["sha256"]),
    ]
    return "\n".join(f"{k:<13} {v}" for k, v in rows)


def format_json(info: dict[str, Any]) -> str:
    return json.dumps(info, indent=2)
