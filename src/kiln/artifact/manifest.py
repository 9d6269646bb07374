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
