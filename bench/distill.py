"""Distillation gate: a 15-layer student from the 30-layer default model, trained within a time budget.

Runs `kiln distill --student-layers 15 --time-budget S` into a scratch folder (or --keep DIR), then scores
three models on the first --chunks 512-token chunks of wiki.test.raw with llama.cpp's protocol: the teacher,
the undistilled 15-layer cut (the same layers, before training) and the student. Reports cross-entropy
(nats/token) and the share of the cut's gap to the teacher that training recovered.

    .venv/bin/python bench/distill.py [--time-budget 2400] [--chunks 100] [--keep DIR] [--update]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

from common import update_section
from kiln.artifact.manifest import Manifest
from kiln.compress import distill
from kiln.evaluate.runner import EvalOptions, run
from kiln.model.load import LoadedModel, load

KILN = str(Path(sys.executable).parent / "kiln")


def cross_entropy(loaded: LoadedModel, chunks: int) -> tuple[float, float]:
    """(mean nll per token, ppl) on the first `chunks` chunks of wikitext2 test."""
    out = run(loaded, EvalOptions(task="wikitext2", limit_tokens=512 * chunks), progress=True)
    return math.log(out.metrics["ppl"]), out.metrics["ppl"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=15)
    parser.add_argument("--time-budget", type=float, default=2400.0, help="training seconds (the gate allows 3600)")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--chunks", type=int, default=100)
    parser.add_argument("--keep", type=Path, default=None, help="write the student here instead of a scratch folder")
    parser.add_argument("--update", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        out = args.keep or Path(scratch) / "student"
        command = [KILN, "distill", "--student-layers", str(args.layers), "--time-budget", str(args.time_budget),
                   "--steps", "1000000", "--lr", str(args.lr), "--batch-size", str(args.batch_size),
                   "--seq-len", str(args.seq_len), "-o", str(out)]
        subprocess.run(command, check=True)
        info = Manifest.read(out).history["distillation"]

        teacher = load("default", precision="fp32")
        cut = dataclasses.replace(teacher, model=distill.make_student(teacher.model, info["teacher_layers"]))
        ce_teacher, ppl_teacher = cross_entropy(teacher, args.chunks)
        ce_cut, ppl_cut = cross_entropy(cut, args.chunks)
        ce_student, ppl_student = cross_entropy(load(str(out), precision="fp32"), args.chunks)

    recovered = (ce_cut - ce_student) / (ce_cut - ce_teacher)
    curve = info["loss_curve"]
    lines = [
        "| model | layers | wikitext2 ppl | cross-entropy (nats/token) |", "|---|---|---|---|",
        f"| teacher (default, fp32) | 30 | {ppl_teacher:.2f} | {ce_teacher:.4f} |",
        f"| 15-layer cut, undistilled | {args.layers} | {ppl_cut:.2f} | {ce_cut:.4f} |",
        f"| distilled student | {args.layers} | {ppl_student:.2f} | {ce_student:.4f} |",
        "",
        f"Recovered {100 * recovered:.1f}% of the cut's cross-entropy gap to the teacher "
        f"(gate: at least 50%). Training: {info['steps']} steps, {info['tokens']:,} tokens in "
        f"{info['seconds']:.0f} s (budget {args.time_budget:.0f} s), lr {args.lr}, batch {args.batch_size} x "
        f"{args.seq_len}, bf16 autocast, data wiki.valid.raw; teacher layers kept: {info['teacher_layers']}. "
        f"Distillation loss (KL, T=2) from {curve[0][1]:.3f} at step {curve[0][0]} to {curve[-1][1]:.3f} at "
        f"step {curve[-1][0]}. Perplexity on the first {args.chunks} chunks of wiki.test.raw, ctx 512.",
    ]
    table = "\n".join(lines)
    print(table)
    print(json.dumps({"teacher": ce_teacher, "cut": ce_cut, "student": ce_student, "recovered": recovered}))
    if args.update:
        update_section("bench/distill.py", table)


if __name__ == "__main__":
    main()
