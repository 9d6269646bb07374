"""`kiln plan`'s predictions beside `kiln bench`'s measurements on this machine, fp32 and bf16.

For each precision: the plan for a 640-token context (512-token prompt + 128 new tokens) at
concurrency 1, 4 and 16, then `kiln bench` in a fresh process with the same shape, so its peak
resident memory belongs to that precision alone, on the torch runtime whose engine the plan's profile
measures. Prints predicted / measured for decode speed (per
sequence) and peak memory; --update writes the table into BENCHMARKS.md.

    .venv/bin/python bench/plan_vs_bench.py [--runs 3] [--recalibrate] [--update]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from common import update_section

KILN = str(Path(sys.executable).parent / "kiln")
BATCHES = (1, 4, 16)


def kiln(*args: str) -> dict:
    out = subprocess.run([KILN, *args, "--json"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--recalibrate", action="store_true", help="measure the machine profile again first")
    parser.add_argument("--update", action="store_true")
    args = parser.parse_args()
    if args.recalibrate:
        subprocess.run([KILN, "plan", "--calibrate"], check=True, capture_output=True)
    lines = ["| precision | batch | plan decode tok/s/seq | bench decode tok/s/seq | ratio | plan peak MB "
             "| bench peak RSS MB | ratio |", "|---" * 8 + "|"]
    for precision in ("fp32", "bf16"):
        # the plan's profile measures kiln's torch engine; `--runtime auto` would run fp32 on onnxruntime
        bench = kiln("bench", "--dtype", precision, "--runtime", "torch", "--batch-sizes", ",".join(map(str, BATCHES)),
                     "--prompt-tokens", "512", "--new-tokens", "128", "--runs", str(args.runs))
        for row in bench["results"]:
            plan = kiln("plan", "--precision", precision, "--context", "640", "--concurrency", str(row["batch_size"]))
            speed = plan["decode_tokens_per_s"] / row["decode_tokens_per_s"]
            peak = plan["total_bytes"] / row["peak_rss_bytes"]
            lines.append(
                f"| {precision} | {row['batch_size']} | {plan['decode_tokens_per_s']:.1f} "
                f"| {row['decode_tokens_per_s']:.1f} [{row['decode_tokens_per_s_range'][0]:.1f}-"
                f"{row['decode_tokens_per_s_range'][1]:.1f}] | {speed:.2f} | {plan['total_bytes'] / 1e6:.0f} "
                f"| {row['peak_rss_bytes'] / 1e6:.0f} | {peak:.2f} |"
            )
            print(lines[-1], file=sys.stderr)
    table = "\n".join(lines) + (
        f"\n\nbench: median [min-max] of {args.runs} runs, 512-token prompts + 128 new tokens; plan: "
        "`--context 640`. Peak RSS is the process's high-water mark up to that batch size."
    )
    print(table)
    if args.update:
        update_section("bench/plan_vs_bench.py", table)


if __name__ == "__main__":
    main()
