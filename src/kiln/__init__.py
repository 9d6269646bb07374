"""kiln: plan, compress, evaluate and serve language models on the hardware you have."""

__version__ = "0.1.0"
