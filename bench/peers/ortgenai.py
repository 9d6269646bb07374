"""ONNX Runtime GenAI as a peer: its model builder on the same fp32 weights, its own generator loop.

The builder quantizes with its defaults for the CPU (int4: blocks of 32, symmetric RTN, int8 activations
in MatMulNBits; int8: blocks of 32; embeddings and lm_head quantized too), which is what ORT GenAI users
get. Timings: prefill = append_tokens of the whole prompt; decode = generate_next_token after a prompt,
tokens after the first over their time, as kiln and llama-bench report it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

BUILDER = [sys.executable, "-m", "onnxruntime_genai.models.builder"]


def build(hf_folder: Path, out: Path, precision: str, extra: tuple[str, ...] = ()) -> Path:
    """ORT GenAI's model for `hf_folder` at precision fp32 | int8 | int4 (reused when already built);
    `extra` are builder --extra_options such as block_size=128."""
    if (out / "genai_config.json").is_file():
        return out
    options = ["--extra_options", *extra] if extra else []
    subprocess.run([*BUILDER, "-i", str(hf_folder), "-o", str(out), "-p", precision, "-e", "cpu",
                    "-c", str(out.parent / "builder-cache"), *options], check=True, capture_output=True,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return out


class OrtGenAI:
    """One built model, timed with onnxruntime_genai's Generator."""

    def __init__(self, folder: Path, threads: int = 2) -> None:
        import onnxruntime_genai as og

        self.og = og
        config = og.Config(str(folder))
        config.clear_providers()
        config.overlay(f'{{"model": {{"decoder": {{"session_options": {{"intra_op_num_threads": {threads}}}}}}}}}')
        self.model = og.Model(config)

    def _generator(self, prompt: list[int], new: int) -> object:
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(prompt) + new, min_length=len(prompt) + new, do_sample=False)
        return self.og.Generator(self.model, params)

    def prefill(self, prompt: list[int]) -> float:
        """Prompt tokens/s."""
        gen = self._generator(prompt, 1)
        start = time.perf_counter()
        gen.append_tokens(prompt)  # type: ignore[attr-defined]
        return len(prompt) / (time.perf_counter() - start)

    def decode(self, prompt: list[int], new: int = 128) -> float:
        """Decode tokens/s after the prompt (the first token, made by the prefill, is not counted)."""
        gen = self._generator(prompt, new)
        gen.append_tokens(prompt)  # type: ignore[attr-defined]
        gen.generate_next_token()  # type: ignore[attr-defined]
        start, count = time.perf_counter(), 0
        while not gen.is_done():  # type: ignore[attr-defined]
            gen.generate_next_token()  # type: ignore[attr-defined]
            count += 1
        return count / (time.perf_counter() - start)
