"""Load a model (default, GGUF or Hugging Face folder) into kiln's graph with its tokenizer.

A GGUF goes through kiln.model.gguf's cache first; from then on every source is a Hugging Face folder.
"""

from __future__ import annotations

import json
import math
import struct
import time
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from kiln.errors import ModelFormatError
from kiln.model import gguf
from kiln.model.llama import LlamaModel, build_model
from kiln.model.packed import pack_linears, return_freed_memory
from kiln.model.source import ModelSource, resolve
from kiln.model.spec import ModelSpec
from kiln.model.tokenizer import Tokenizer
from kiln.types import TORCH_DTYPES, Precision


@dataclass
class LoadedModel:
    """A model ready to run: graph, tokenizer, and where it came from."""

    spec: ModelSpec
    model: LlamaModel
    tokenizer: Tokenizer
    source: ModelSource
    folder: Path  # Hugging Face layout folder the weights were read from (the cache, for a GGUF)
    sha256: str
    load_seconds: float

    @property
    def context_length(self) -> int:
        return self.spec.max_position

    def release_weights(self) -> None:
        """Drop kiln's own copy of the weights, for a caller whose runtime holds its own; the graph's
        tensors become meta tensors, so any later use of it fails loudly instead of reading garbage."""
        self.model.to_empty(device="meta")
        return_freed_memory()  # glibc keeps the freed weights otherwise: 0.1 GB of 0.5 GB went back without

    @property
    def weights_released(self) -> bool:
        """Whether release_weights has dropped kiln's copy (its graph can no longer run)."""
        return any(t.is_meta for t in (*self.model.parameters(), *self.model.buffers()))


def hf_folder(source: ModelSource) -> Path:
    """The Hugging Face layout folder behind a source, dequantizing a GGUF once if needed."""
    if source.kind == "gguf":
        return gguf.ensure_converted(source.path, source.sha256)
    return source.path


def read_config(folder: Path, name: str = "config.json") -> dict[str, Any]:
    path = folder / name
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelFormatError(f"{path} cannot be read ({exc}); fix or re-export it") from exc
    if not isinstance(config, dict):
        raise ModelFormatError(f"{path} is not a JSON object; fix or re-export it")
    return config


# safetensors dtype names -> torch dtypes (the format's own spelling)
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorEntry:
    path: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def read_safetensors_header(path: Path) -> dict[str, TensorEntry]:
    """The tensor index of one .safetensors file, checked against the file's size."""
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            header_len = struct.unpack("<Q", f.read(8))[0]
            if header_len > size - 8:
                raise ValueError(f"header length {header_len} exceeds the file")
            header = json.loads(f.read(header_len))
        entries = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = (8 + header_len + int(o) for o in info["data_offsets"])
            shape = tuple(int(d) for d in info["shape"])
            itemsize = torch.empty(0, dtype=SAFETENSORS_DTYPES[info["dtype"]]).element_size()
            if end > size or end - begin != itemsize * math.prod(shape):
                raise ValueError(f"tensor {name} lies outside the file or has the wrong length")
            entries[name] = TensorEntry(path, info["dtype"], shape, begin, end)
    except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
        raise ModelFormatError(f"{path} is truncated or corrupt ({exc}); re-download or re-export it") from exc
    return entries


class SafetensorsReader(MutableMapping[str, torch.Tensor]):
    """Tensors of a folder's *.safetensors files, each read from disk when it is taken (`pop`).

    Written here rather than using safetensors' safe_open because safe_open memory-maps the whole
    file: every tensor read stays resident while the converted copy is built, so a load held the
    checkpoint twice. Reading tensor by tensor keeps peak memory near one copy of the weights.
    """

    def __init__(self, folder: Path, progress: bool = True, files: list[Path] | None = None) -> None:
        files = sorted(folder.glob("*.safetensors")) if files is None else files
        if not files:
            raise ModelFormatError(f"folder {folder} has no *.safetensors weights")
        self._entries: dict[str, TensorEntry] = {}
        for f in files:
            self._entries.update(read_safetensors_header(f))
        self._bar = tqdm(total=len(self._entries), desc="loading weights", unit="tensor", leave=False,
                         disable=None if progress else True)

    def __getitem__(self, name: str) -> torch.Tensor:
        entry = self._entries[name]
        raw = torch.empty(entry.end - entry.start, dtype=torch.uint8)
        with entry.path.open("rb") as f:
            f.seek(entry.start)
            if f.readinto(raw.numpy().data) != raw.numel():
                raise ModelFormatError(f"{entry.path} is truncated; re-download or re-export it")
        self._bar.update(1)
        return raw.view(SAFETENSORS_DTYPES[entry.dtype]).reshape(entry.shape)

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        raise TypeError("SafetensorsReader is read-only")

    def __delitem__(self, name: str) -> None:
        del self._entries[name]
        if not self._entries:
            self._bar.close()

    def __contains__(self, name: object) -> bool:  # without reading the tensor
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def load(name: str = "default", precision: Precision = "fp32", progress: bool = True) -> LoadedModel:
    """Resolve, (once) dequantize, and load a model with its tokenizer."""
    start = time.perf_counter()
    source = resolve(name)
    folder = hf_folder(source)
    if source.kind == "artifact":
        from kiln.artifact.io import load_graph

        spec, model, _ = load_graph(folder, TORCH_DTYPES[precision], progress)
        tokenizer = Tokenizer(folder, spec)
    else:
        spec = ModelSpec.from_hf_config(read_config(folder))
        tokenizer = Tokenizer(folder, spec)
        model = build_model(spec, SafetensorsReader(folder, progress), TORCH_DTYPES[precision])
    if precision == "bf16":
        pack_linears(model)  # loads are for inference; compression and training load fp32
    return LoadedModel(
        spec=spec,
        model=model,
        tokenizer=tokenizer,
        source=source,
        folder=folder,
        sha256=source.sha256,
        load_seconds=time.perf_counter() - start,
    )


def load_tokenizer(name: str = "default") -> tuple[ModelSpec, Tokenizer, ModelSource]:
    """A model's config and tokenizer without its weights, for a caller whose model runs elsewhere (kiln eval
    --api: a server holds the weights, kiln makes the token ids)."""
    source = resolve(name)
    folder = hf_folder(source)  # a GGUF's tokenizer files come with its (cached) conversion
    spec = ModelSpec.from_hf_config(read_config(folder))
    return spec, Tokenizer(folder, spec), source
