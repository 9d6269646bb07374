"""`kiln plan`'s predictions beside `kiln bench`'s measurements on this machine, per precision and runtime.

For each case (fp32 and bf16 on the torch runtime; fp32, an int8 artifact and an int4 artifact on
onnxruntime, which `--runtime auto` picks for them): the plan for a 640-token context (512-token prompt
+ 128 new tokens) at concurrency 1, 4 and 16, with the same `--runtime`, then `kiln bench` in a fresh
process with the same shape, so its peak resident memory belongs to that case alone. The artifacts
are the ones `kiln plan --precision int8|int4` describes, every matrix at those bits, the head included
(int8 per output row; int4 in symmetric groups of 128), made by `kiln compress` into a scratch folder.
Three more artifacts are planned by their own tensors (`kiln plan -m ARTIFACT`, no --precision), as
`kiln compress` makes them by default and as `make demo` does: int8 layers beside an fp32 head; int4 in
groups of 32 on Q4_1's grid (float offsets, which onnxruntime runs split off each matrix) beside an int8
head; and the same with integer zero points.
Prints predicted / measured for decode speed (per sequence), prefill and peak memory; --update writes
the table into BENCHMARKS.md.

    .venv/bin/python bench/plan_vs_bench.py [--runs 3] [--recalibrate] [--runtimes torch,onnxruntime]
        [--cases fp32,int8,...] [--update]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import update_section

KILN = str(Path(sys.executable).parent / "kiln")
BATCHES = (1, 4, 16)
# (case, precision the plan is asked for or None for the artifact's own tensors, runtime, the compress flags of
# its artifact or None for the model itself)
CASES = (("fp32", "fp32", "torch", None), ("bf16", "bf16", "torch", None), ("fp32", "fp32", "onnxruntime", None),
         ("int8", "int8", "onnxruntime", ["--quantize", "int8", "--quantize-embeddings"]),
         ("int4", "int4", "onnxruntime",
          ["--quantize", "int4", "--group-size", "128", "--symmetric", "--quantize-embeddings"]),
         ("int8 fp32-head", None, "onnxruntime", ["--quantize", "int8"]),
         ("int4-g32-q4_1 int8-head", None, "onnxruntime",
          ["--quantize", "int4", "--group-size", "32", "--quantize-embeddings", "int8"]),
         ("int4-g32-zero-points int8-head", None, "onnxruntime",
          ["--quantize", "int4", "--group-size", "32", "--zero-point", "integer", "--quantize-embeddings", "int8"]))


def kiln(*args: str) -> dict:
    out = subprocess.run([KILN, *args, "--json"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def row(case: str, runtime: str, plan: dict, bench: dict) -> str:
    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}"

    low, high = bench["decode_tokens_per_s_range"]
    return (f"| {case} | {runtime} | {bench['batch_size']} | {plan['decode_tokens_per_s']:.1f} "
            f"| {bench['decode_tokens_per_s']:.1f} [{low:.1f}-{high:.1f}] "
            f"| {ratio(plan['decode_tokens_per_s'], bench['decode_tokens_per_s'])} "
            f"| {plan['prefill_tokens_per_s']:.0f} | {bench['prefill_tokens_per_s']:.0f} "
            f"| {ratio(plan['prefill_tokens_per_s'], bench['prefill_tokens_per_s'])} "
            f"| {plan['total_bytes'] / 1e6:.0f} | {bench['peak_rss_bytes'] / 1e6:.0f} "
            f"| {ratio(plan['total_bytes'], bench['peak_rss_bytes'])} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--recalibrate", action="store_true", help="measure the machine profile again first")
    parser.add_argument("--runtimes", default="torch,onnxruntime", help="the cases of these runtimes only")
    parser.add_argument("--cases", default=",".join(c[0] for c in CASES), help="these cases only (comma-separated)")
    parser.add_argument("--update", action="store_true")
    args = parser.parse_args()
    if args.recalibrate:
        subprocess.run([KILN, "plan", "--calibrate"], check=True, capture_output=True)
    lines = ["| case | runtime | batch | plan decode tok/s/seq | bench decode tok/s/seq | ratio "
             "| plan prefill tok/s | bench prefill tok/s | ratio | plan peak MB | bench peak RSS MB | ratio |",
             "|---" * 12 + "|"]
    with tempfile.TemporaryDirectory(prefix="kiln-plan-vs-bench-") as scratch:
        for n, (case, precision, runtime, flags) in enumerate(CASES):
            if runtime not in args.runtimes.split(",") or case not in args.cases.split(","):
                continue
            model = "default"
            if flags:
                model = str(Path(scratch) / str(n))
                subprocess.run([KILN, "compress", *flags, "-o", model], check=True, capture_output=True)
            dtype = ["--dtype", precision] if precision in ("fp32", "bf16") else []
            priced = ["--precision", precision] if precision else ["-m", model]
            bench = kiln("bench", "-m", model, *dtype, "--runtime", runtime,
                         "--batch-sizes", ",".join(map(str, BATCHES)), "--prompt-tokens", "512", "--new-tokens", "128",
                         "--runs", str(args.runs))
            for result in bench["results"]:
                plan = kiln("plan", *priced, "--runtime", runtime, "--context", "640",
                            "--concurrency", str(result["batch_size"]))
                lines.append(row(case, runtime, plan, result))
                print(lines[-1], file=sys.stderr)
    table = "\n".join(lines) + (
        f"\n\nbench: median [min-max] of {args.runs} runs, 512-token prompts + 128 new tokens (prefill: the batch's "
        "prompts over the time to the last one's first token); plan: `--context 640` and the same `--runtime`, "
        "its prefill one 512-token prompt. Peak RSS is the process's high-water mark up to that batch size."
    )
    print(table)
    if args.update:
        update_section("bench/plan_vs_bench.py", table)


if __name__ == "__main__":
    main()
