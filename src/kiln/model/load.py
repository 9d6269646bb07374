"""Load a model (default, GGUF or Hugging Face folder) into kiln's graph with its tokenizer.

A GGUF goes through kiln.model.gguf's cache first; from then on every source is a Hugging Face folder.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from kiln.errors import ModelFormatError
from kiln.model import gguf
from kiln.model.llama import LlamaModel, build_model
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


def hf_folder(source: ModelSource) -> Path:
    """The Hugging Face layout folder behind a source, dequantizing a GGUF once if needed."""
    if source.kind == "gguf":
        return gguf.ensure_converted(source.path, source.sha256)
    return source.path


def read_config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelFormatError(f"{folder / 'config.json'} cannot be read ({exc}); fix or re-export it") from exc
    if not isinstance(config, dict):
        raise ModelFormatError(f"{folder / 'config.json'} is not a JSON object; fix or re-export it")
    return config


def read_weights(folder: Path, progress: bool = True) -> dict[str, torch.Tensor]:
    """All tensors of the folder's *.safetensors files (memory-mapped), with a progress bar."""
    from safetensors import SafetensorError, safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelFormatError(f"folder {folder} has no *.safetensors weights")
    tensors: dict[str, torch.Tensor] = {}
    try:
        handles = [safe_open(str(f), framework="pt") for f in files]
        names = [(h, k) for h in handles for k in h.keys()]  # noqa: SIM118 (safe_open has no __iter__)
        for handle, name in tqdm(names, desc="loading weights", unit="tensor", disable=None if progress else True,
                                 leave=False):
            tensors[name] = handle.get_tensor(name)
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise ModelFormatError(
            f"weights in {folder} cannot be read ({exc}); the files are truncated or corrupt"
        ) from exc
    return tensors


def load(name: str = "default", precision: Precision = "fp32", progress: bool = True) -> LoadedModel:
    """Resolve, (once) dequantize, and load a model with its tokenizer."""
    start = time.perf_counter()
    source = resolve(name)
    folder = hf_folder(source)
    spec = ModelSpec.from_hf_config(read_config(folder))
    tokenizer = Tokenizer(folder, spec)
    model = build_model(spec, read_weights(folder, progress), TORCH_DTYPES[precision])
    return LoadedModel(
        spec=spec,
        model=model,
        tokenizer=tokenizer,
        source=source,
        folder=folder,
        sha256=source.sha256,
        load_seconds=time.perf_counter() - start,
    )
