"""The torch runtime's batch-1 decode with and without compiled int8 / int4 kernels (`--runtime torch-compiled`).

For each artifact, three fresh processes: eager torch; torch-compiled with an empty inductor cache (the
first generate compiles); torch-compiled again on the now-filled cache (the first generate loads the
kernels). Each times its first generate, then batch-1 decode (128 new tokens after a 128-token prompt)
`--runs` times; greedy tokens are compared with eager's.

    .venv/bin/python bench/compiled_decode.py [--runs 3] [--update]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import run_child, update_section

KILN = str(Path(sys.executable).parent / "kiln")
ARTIFACTS = {
    "int8, lm_head int8": ["--quantize", "int8", "--quantize-embeddings"],
    "int4 g32 symmetric, lm_head int4": ["--quantize", "int4", "--group-size", "32", "--symmetric",
                                         "--quantize-embeddings"],
    "int4 g128 (kiln's default), lm_head fp32": ["--quantize", "int4"],
}


def child(folder: str, runtime: str, runs: int) -> None:
    """One process's measurements, printed as JSON."""
    import torch

    from kiln.engine.generate import Generator
    from kiln.engine.onnx_runtime import runtime_model
    from kiln.engine.sampler import SamplingParams
    from kiln.model.load import load

    torch.set_num_threads(2)
    loaded = load(folder, progress=False)
    generator = Generator(runtime_model(loaded, runtime), loaded.tokenizer)  # type: ignore[arg-type]
    prompt = list(range(1000, 1128))
    params = SamplingParams(temperature=0.0, max_tokens=128, ignore_eos=True)
    start = time.perf_counter()
    first = generator.generate([prompt], params)[0]
    first_s = time.perf_counter() - start
    rates = [generator.generate([prompt], params)[0].decode_tokens_per_s for _ in range(runs)]
    print(json.dumps({"first_s": first_s, "rates": rates, "tokens": first.token_ids}))


def measure(folder: Path, runtime: str, runs: int, inductor: Path) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(inductor)}
    return run_child(__file__, [str(folder), runtime, str(runs)], env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--update", action="store_true")
    args = parser.parse_args()
    lines = ["| artifact | eager tok/s | compiled tok/s | speed-up "
             "| first generate: eager / compiling / cached kernels | same greedy tokens |", "|---" * 6 + "|"]
    with tempfile.TemporaryDirectory() as scratch:
        for name, flags in ARTIFACTS.items():
            folder = Path(scratch) / re.sub(r"[^a-z0-9]+", "-", name.split(",")[0])  # inductor's paths: no ( or '

            subprocess.run([KILN, "compress", *flags, "-o", str(folder)], check=True, capture_output=True)
            inductor = Path(scratch) / f"inductor-{folder.name}"  # empty: the first compiled process compiles
            eager = measure(folder, "torch", args.runs, inductor)
            cold = measure(folder, "torch-compiled", args.runs, inductor)
            warm = measure(folder, "torch-compiled", args.runs, inductor)
            e, c = statistics.median(eager["rates"]), statistics.median(cold["rates"] + warm["rates"])
            same = eager["tokens"] == cold["tokens"] == warm["tokens"]
            lines.append(f"| {name} | {e:.1f} | {c:.1f} | {c / e:.1f}x | {eager['first_s']:.1f} / "
                         f"{cold['first_s']:.1f} / {warm['first_s']:.1f} s | {same} |")
            print(lines[-1], file=sys.stderr)
    from kiln.benchmark.machine import describe, machine_info

    table = "\n".join(lines) + (
        f"\n\nBatch 1, 128 new tokens after a 128-token prompt, median of {args.runs} runs per process (compiled: "
        f"both compiled processes); first generate includes compiling or loading the kernels. "
        f"Machine: {describe(machine_info())}."
    )
    print(table)
    if args.update:
        update_section("bench/compiled_decode.py", table)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        main()
