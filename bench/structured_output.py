"""What holding the output to a JSON schema (`response_format`, `--json-schema`) costs in decode speed.

One process: the default model (fp32) on torch and on onnxruntime, and an int4 artifact (`--quantize int4
--group-size 32 --symmetric --quantize-embeddings`, the engine table's int4 row) on onnxruntime. Each
generates up to 128 tokens greedily after a chat prompt that asks for JSON, plain and held to SCHEMA below
(name, age, city, three hobbies, nothing else), in alternating order, `--runs` rounds; decode tokens/s
as medians [min-max], and how many held outputs parse and match the schema's keys.

    .venv/bin/python bench/structured_output.py [--runs 6] [--update]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from common import cell, update_section

KILN = str(Path(sys.executable).parent / "kiln")
PROMPT = "Describe a fictional person as JSON, with their name, age, city and three hobbies."
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "city", "hobbies"],
          "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "city": {"type": "string"},
                         "hobbies": {"type": "array", "items": {"type": "string"}, "minItems": 3, "maxItems": 3}}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--update", action="store_true")
    args = parser.parse_args()

    from kiln.benchmark.machine import describe, machine_info
    from kiln.engine.generate import Generator
    from kiln.engine.grammar import json_grammar
    from kiln.engine.onnx_runtime import runtime_model
    from kiln.engine.sampler import SamplingParams
    from kiln.model.load import load

    torch.set_num_threads(2)
    machine = describe(machine_info("onnxruntime", "llguidance"))
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        int4 = Path(scratch) / "int4"
        subprocess.run([KILN, "compress", "--quantize", "int4", "--group-size", "32", "--symmetric",
                        "--quantize-embeddings", "-o", str(int4)], check=True, capture_output=True)
        cases = [("fp32", "default", "torch"), ("fp32", "default", "onnxruntime"),
                 ("int4 g32", str(int4), "onnxruntime")]
        for name, source, runtime in cases:
            loaded = load(source, progress=False)
            tok = loaded.tokenizer
            generator = Generator(runtime_model(loaded, runtime), tok)
            prompt = tok.encode_chat([{"role": "user", "content": PROMPT}])
            grammar = json_grammar(SCHEMA)
            speeds: dict[bool, list[float]] = {False: [], True: []}
            parses = 0
            generator.generate([prompt], SamplingParams(max_tokens=8, temperature=0))  # warm up
            for run in range(args.runs):
                for held in ((False, True) if run % 2 == 0 else (True, False)):
                    params = SamplingParams(max_tokens=128, temperature=0, grammar=grammar if held else None)
                    out = generator.generate([prompt], params)[0]
                    speeds[held].append(out.decode_tokens_per_s)
                    if held:
                        with contextlib.suppress(json.JSONDecodeError):
                            parses += set(json.loads(out.text)) == set(SCHEMA["required"])
            ratio = statistics.median(speeds[True]) / statistics.median(speeds[False])
            rows.append(f"| {name} | {runtime} | {cell(speeds[False])} | {cell(speeds[True])} | {ratio:.2f}x | "
                        f"{parses}/{args.runs} |")
            print(rows[-1], file=sys.stderr)
    header = ("| model | runtime | plain decode tok/s | held to the schema, tok/s | ratio | held outputs that parse |\n"
              "|---|---|---|---|---|---|")
    footer = (f"\nBatch 1, up to 128 new tokens, greedy; {args.runs} rounds, alternating. Machine: {machine}.")
    table = "\n".join([header, *rows]) + "\n" + footer
    print(table)
    if args.update:
        update_section("bench/structured_output.py", table)


if __name__ == "__main__":
    main()
