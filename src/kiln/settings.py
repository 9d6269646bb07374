"""Every KILN_* environment variable is read here, and only here.

Read at call time (not import time) so tests and long-lived processes see changes.
"""

import os
from pathlib import Path


def cache_dir() -> Path:
    """KILN_CACHE: derived files that can be rebuilt (dequantized GGUF models, file hashes)."""
    return Path(os.environ.get("KILN_CACHE") or Path.home() / ".cache" / "kiln")


def home_dir() -> Path:
    """KILN_HOME: state kiln keeps (runs database, registry)."""
    return Path(os.environ.get("KILN_HOME") or Path.home() / ".kiln")


def data_dir() -> Path:
    """KILN_DATA_DIR: evaluation data; default ../shared/data beside the project root."""
    env = os.environ.get("KILN_DATA_DIR")
    if env:
        return Path(env)
    project_root = Path(__file__).resolve().parents[2]
    return project_root.parent / "shared" / "data"
