"""Every KILN_* environment variable is read here, and only here.

Read at call time (not import time) so tests and long-lived processes see changes.
"""

import os
from pathlib import Path

# the user's choice, read as kiln is imported: importing torch._dynamo (loading a model does) sets this
# variable to inductor's default folder, so read later it always looked chosen, and the compiled decode
# kernels went to /tmp/torchinductor_$USER instead of $KILN_CACHE/inductor
_USER_INDUCTOR_CACHE = os.environ.get("TORCHINDUCTOR_CACHE_DIR")


def cache_dir() -> Path:
    """KILN_CACHE: derived files that can be rebuilt (dequantized GGUF models, file hashes)."""
    return Path(os.environ.get("KILN_CACHE") or Path.home() / ".cache" / "kiln")


def inductor_cache_dir() -> Path:
    """Where torch.compile keeps the compiled decode kernels: TORCHINDUCTOR_CACHE_DIR as the user set it, else
    $KILN_CACHE/inductor."""
    return Path(_USER_INDUCTOR_CACHE) if _USER_INDUCTOR_CACHE else cache_dir() / "inductor"


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


def api_key() -> str | None:
    """KILN_API_KEY: the key `kiln eval --api` sends to the server when --api-key is not given."""
    return os.environ.get("KILN_API_KEY") or None


def _flag(name: str) -> bool:
    """An on/off KILN_* switch that is on unless set to 0."""
    return os.environ.get(name, "1") != "0"


def ort_spin() -> bool:
    """KILN_ORT_SPIN: ONNX Runtime's pool threads spin between ops (0 for hosts whose cores are shared)."""
    return _flag("KILN_ORT_SPIN")


def huge_pages() -> bool:
    """KILN_HUGEPAGES: move an ONNX Runtime session's weights to 2 MiB pages once it is built."""
    return _flag("KILN_HUGEPAGES")


def ort_prefill_graph() -> bool:
    """KILN_ORT_PREFILL: run int4 exports' prompts on their prefill graph (0 saves its copy of the weights)."""
    return _flag("KILN_ORT_PREFILL")


def threads() -> int:
    """KILN_THREADS: the threads a torch model gets (0, the default: the cores torch sees)."""
    return int(os.environ.get("KILN_THREADS", "0"))
