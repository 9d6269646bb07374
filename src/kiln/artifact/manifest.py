"""manifest.json: what an artifact is, where it came from, and the sha256 of every file in it.

Loaders read the manifest (never file names) and refuse an artifact whose files do not match it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kiln import __version__
from kiln.errors import ModelFormatError

MANIFEST = "manifest.json"
FORMAT = "kiln-artifact"
FORMAT_VERSION = 1


@dataclass
class Manifest:
    source: dict[str, Any]  # {"name", "sha256", "kind"} of the model it was made from
    recipe: dict[str, Any]
    tensors: dict[str, dict[str, Any]] = field(default_factory=dict)  # per compressed tensor / layer: its format
    calibration: dict[str, Any] | None = None  # {"file", "sha256", "samples", "tokens", "seed"}
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256
    metrics: dict[str, Any] = field(default_factory=dict)  # filled in as the artifact is evaluated
    history: dict[str, Any] = field(default_factory=dict)  # e.g. distillation loss curves
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    kiln_version: str = __version__
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    def write(self, folder: Path) -> None:
        (folder / MANIFEST).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        path = folder / MANIFEST
        try:
            data = json.loads(path.read_text())
            check_shape(data)
            if data.get("format") != FORMAT:
                raise ValueError(f"format is {data.get('format')!r}, not {FORMAT!r}")
            if int(data.get("format_version", 0)) > FORMAT_VERSION:
                raise ModelFormatError(
                    f"{path} is format version {data['format_version']}; this kiln reads up to {FORMAT_VERSION}, "
                    "upgrade kiln"
                )
            return cls(**data)
        except (OSError, ValueError, TypeError) as exc:
            raise ModelFormatError(f"{path} cannot be read ({exc}); the artifact is damaged, re-create it") from exc


# the JSON type of each field, so that a hand-edited manifest fails here in one line rather than where a field is used
_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "source": dict, "recipe": dict, "tensors": dict, "calibration": (dict, type(None)), "files": dict,
    "metrics": dict, "history": dict, "format": str, "format_version": int, "kiln_version": str, "created_at": str,
}


def check_shape(data: Any) -> None:
    """Raise ValueError unless `data` is a manifest's JSON object with each field of its type, every tensor entry
    an object and every file a plain file name with a sha256 string."""
    if not isinstance(data, dict):
        raise ValueError(f"it holds a JSON {type(data).__name__}, not an object")
    for key, kind in _FIELD_TYPES.items():
        if key in data and not isinstance(data[key], kind):
            raise ValueError(f"its {key!r} is a JSON {type(data[key]).__name__}, which is the wrong type")
    if not all(isinstance(entry, dict) for entry in data.get("tensors", {}).values()):
        raise ValueError("an entry of its 'tensors' is not an object")
    for name, digest in data.get("files", {}).items():
        if Path(name).name != name or name in ("", ".", "..") or not isinstance(digest, str):
            raise ValueError(f"its 'files' entry {name!r} is not a file name with a sha256")


def is_artifact(folder: Path) -> bool:
    return (folder / MANIFEST).is_file()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify(folder: Path, manifest: Manifest) -> None:
    """Every file the manifest lists exists and has its recorded sha256."""
    if "model.safetensors" not in manifest.files:
        raise ModelFormatError(f"{folder / MANIFEST} lists no model.safetensors; the artifact is damaged")
    for name in manifest.files:
        verify_file(folder, manifest, name)


def verify_file(folder: Path, manifest: Manifest, name: str) -> None:
    """One file the manifest lists exists and has its recorded sha256 (kiln plan checks config.json alone)."""
    path = folder / name
    if not path.is_file():
        raise ModelFormatError(f"artifact {folder}: {name} is missing; copy the whole folder or re-create it")
    if name in manifest.files and file_sha256(path) != manifest.files[name]:
        raise ModelFormatError(
            f"artifact {folder}: {name} does not match its sha256 in manifest.json (modified, truncated or "
            "corrupt); re-create the artifact with kiln compress"
        )
