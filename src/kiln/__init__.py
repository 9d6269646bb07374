"""kiln: plan, compress, evaluate and serve language models on the hardware you have."""

__version__ = "0.1.0"

from kiln import settings  # noqa: E402,F401  (first: it reads TORCHINDUCTOR_CACHE_DIR before torch sets it)
