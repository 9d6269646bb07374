"""ONNX Runtime GenAI as a peer: its model builder on the same fp32 weights, its own generator loop.

The builder quantizes with its defaults for the CPU (int4: blocks of 32, symmetric RTN, int8 activations
in MatMulNBits; int8: blocks of 32; embeddings and lm_head quantized too), which is what ORT GenAI users
get. Timings: prefill = append_tokens of the whole prompt; decode = generate_next_token after a prompt,
tokens after the first over their time, as kiln and llama-bench report it.

`GenAIProcess` runs the models in a process of their own, as a GenAI user would: sharing kiln's
process let GenAI's weights land in heap memory kiln had already moved to huge pages
(kiln.engine.hugepages), which sped GenAI's int4 decode up by about 4% over a GenAI-only process.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import time
from multiprocessing.connection import Connection
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


def _serve(conn: Connection, threads: int) -> None:
    """The child's loop: ("load", key, folder) | ("decode", key, prompt, new) | ("prefill", key, prompt)."""
    models: dict[str, OrtGenAI] = {}
    while True:
        message = conn.recv()
        if message is None:
            return
        op, key, *args = message
        try:
            if op == "load":
                models[key] = OrtGenAI(Path(args[0]), threads)
                conn.send(("ok", None))
            else:
                conn.send(("ok", getattr(models[key], op)(*args)))
        except Exception as exc:  # noqa: BLE001 - handed back to the parent, which raises it
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


class GenAIProcess:
    """ORT GenAI models held by one child process; `model(key, folder)` gives a handle that times them
    there (decode / prefill, as OrtGenAI). The child waits on a pipe while others run, so its threads
    are idle then."""

    def __init__(self, threads: int = 2) -> None:
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: nothing of kiln's is in it
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child, threads), daemon=True)
        self._process.start()

    def call(self, *message: object) -> object:
        self._conn.send(message)
        status, value = self._conn.recv()
        if status != "ok":
            raise RuntimeError(f"ORT GenAI's process: {value}")
        return value

    def model(self, key: str, folder: Path) -> GenAIHandle:
        self.call("load", key, str(folder))
        return GenAIHandle(self, key)

    def close(self) -> None:
        self._conn.send(None)
        self._process.join(timeout=30)


class GenAIHandle:
    """One model in a GenAIProcess."""

    def __init__(self, owner: GenAIProcess, key: str) -> None:
        self.owner, self.key = owner, key

    def prefill(self, prompt: list[int]) -> float:
        return float(self.owner.call("prefill", self.key, prompt))  # type: ignore[arg-type]

    def decode(self, prompt: list[int], new: int = 128) -> float:
        return float(self.owner.call("decode", self.key, prompt, new))  # type: ignore[arg-type]
