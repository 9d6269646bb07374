"""Batch-1 decode of artifacts made with `kiln compress`'s usual flags, on each runtime, and what
`--runtime auto` (the default of generate, bench and serve) picks for each.

For each model, one fresh process per runtime (torch: kiln's graph; onnxruntime: the artifact's ONNX
export, built first and cached): batch-1 decode of 128 new tokens after a 128-token prompt from
wikitext-2's test split, `--runs` times after one untimed generate; the greedy tokens of the two
runtimes are compared (how many of the 128 agree before the first difference: the onnxruntime
kernels round activations to int8, so near-ties can flip).

    .venv/bin/python bench/default_runtime.py [--runs 3] [--update]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import run_child, update_section

KILN = str(Path(sys.executable).parent / "kiln")
MODELS = {
    "fp32 (the default model, no artifact)": None,
    "int8 (`--quantize int8`)": ["--quantize", "int8"],
    "int4 g128 asymmetric (`--quantize int4`, the CLI's default grid)": ["--quantize", "int4"],
    "int4 g32 asymmetric (`--quantize int4 --group-size 32`, the source's Q4_1 grid)":
        ["--quantize", "int4", "--group-size", "32"],
    "int4 g32 symmetric (`... --symmetric`)": ["--quantize", "int4", "--group-size", "32", "--symmetric"],
}


def child(model: str, runtime: str, runs: int) -> None:
    """One process's measurements, printed as JSON."""
    import torch

    from kiln import settings
    from kiln.engine.generate import Generator
    from kiln.engine.onnx_runtime import pick_runtime
    from kiln.engine.sampler import SamplingParams
    from kiln.model.load import load

    torch.set_num_threads(2)
    loaded = load(model, progress=False)
    picked = pick_runtime(loaded, "auto")[1]
    generator = Generator(pick_runtime(loaded, runtime)[0], loaded.tokenizer)  # type: ignore[arg-type]
    text = (settings.data_dir() / "wikitext-2-raw" / "wiki.test.raw").read_text()[:20_000]
    prompt = loaded.tokenizer.encode(text, add_special_tokens=False)[:128]
    params = SamplingParams(temperature=0.0, max_tokens=128, ignore_eos=True)
    first = generator.generate([prompt], params)[0]
    rates = [generator.generate([prompt], params)[0].decode_tokens_per_s for _ in range(runs)]
    print(json.dumps({"auto": picked, "rates": rates, "tokens": first.token_ids}))


def measure(model: str, runtime: str, runs: int, cache: Path) -> dict:
    return run_child(__file__, [model, runtime, str(runs)], {**os.environ, "KILN_CACHE": str(cache)})


def agreeing(a: list[int], b: list[int]) -> int:
    """Greedy tokens the two runs share before their first difference."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def main() -> None:
    from kiln import settings

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--update", action="store_true")
    args = parser.parse_args()
    wiki = settings.data_dir() / "wikitext-2-raw" / "wiki.test.raw"
    if not wiki.is_file():
        sys.exit(f"no WikiText-2 test file at {wiki}: set KILN_DATA_DIR to the shared data folder")
    lines = ["| model | torch tok/s | onnxruntime tok/s | onnxruntime / torch | --runtime auto picks "
             "| same greedy tokens (of 128) |", "|---" * 6 + "|"]
    with tempfile.TemporaryDirectory() as scratch:
        cache = Path(scratch) / "cache"  # the fp32 model's dequantized copy is rebuilt here once (about 17 s)
        for name, flags in MODELS.items():
            model = "default"
            if flags is not None:
                model = str(Path(scratch) / f"artifact-{len(lines)}")
                subprocess.run([KILN, "compress", *flags, "-o", model], check=True, capture_output=True,
                               env={**os.environ, "KILN_CACHE": str(cache)})
            on_torch = measure(model, "torch", args.runs, cache)
            on_ort = measure(model, "onnxruntime", args.runs, cache)
            t, o = statistics.median(on_torch["rates"]), statistics.median(on_ort["rates"])
            lines.append(f"| {name} | {t:.1f} | {o:.1f} | {o / t:.1f}x | {on_torch['auto']} "
                         f"| {agreeing(on_torch['tokens'], on_ort['tokens'])} |")
            print(lines[-1], file=sys.stderr)
    from kiln.benchmark.machine import describe, machine_info

    table = "\n".join(lines) + (
        f"\n\nBatch 1, 128 new tokens after a 128-token WikiText-2 prompt, median of {args.runs} runs, one process "
        f"per cell; lm_head and the embedding stay fp32 in every artifact here (the flags' default). "
        f"Machine: {describe(machine_info())}."
    )
    print(table)
    if args.update:
        update_section("bench/default_runtime.py", table)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        main()
