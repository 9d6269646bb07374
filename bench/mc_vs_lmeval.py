"""kiln's multiple-choice evaluation beside lm-evaluation-harness (`hf` backend) on the same items.

Both score the first N items of HellaSwag, ARC-Easy, ARC-Challenge and PIQA from the shared data with
the harness's prompt formats, in fp32 (and bf16 with --precisions), the same weights (kiln's dequantized
cache folder), 2 threads.
Tasks alternate between the two systems so machine drift hits both. Times are evaluation time only
(kiln: the whole `run` call after loading, tokenization included; lm-eval: its scoring loop, read from its
progress bar, so its loading, data building and tokenization are excluded). lm-eval's own total is shown too.

    .venv/bin/python bench/mc_vs_lmeval.py [--limit 500] [--batch-size 16] [--precisions fp32,bf16] [--update]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import update_section  # noqa: E402
from kiln.benchmark.machine import describe, machine_info  # noqa: E402
from kiln.evaluate.runner import EvalOptions, run  # noqa: E402
from kiln.model.load import load  # noqa: E402
from peers import lmeval  # noqa: E402

TASKS = {"hellaswag": "kiln_hellaswag", "arc_easy": "kiln_arc_easy", "arc_challenge": "kiln_arc_challenge",
         "piqa": "kiln_piqa"}


def scoring_seconds(samples_jsonl: str | None) -> float:
    """Seconds of lm-eval's scoring loop ('Running loglikelihood requests'), read from its progress bar in
    lm_eval.log: model loading, data building and tokenization are excluded."""
    if not samples_jsonl:
        return float("nan")
    log = Path(samples_jsonl).parents[1] / "lm_eval.log"
    bars = [line for line in log.read_text().replace("\r", "\n").splitlines() if "Running loglikelihood" in line]
    match = re.search(r"\[(?:(\d+):)?(\d+):(\d+)<", bars[-1]) if bars else None
    if not match:
        return float("nan")
    hours, minutes, seconds = (int(g) if g else 0 for g in match.groups())
    return 3600 * hours + 60 * minutes + seconds


def agreement(kiln_records: list[dict[str, Any]], samples_jsonl: str | None) -> str:
    """How many items the two systems predict differently (acc and acc_norm), from lm-eval's sample log."""
    if not samples_jsonl:
        return "n/a"
    theirs = {}
    for line in Path(samples_jsonl).read_text().splitlines():
        s = json.loads(line)
        lls = [float(r[0]) for r in s["filtered_resps"]]
        theirs[int(s["doc_id"])] = lls
    differ = differ_norm = 0
    for r in kiln_records:
        lls = theirs.get(r["index"])
        if lls is None:
            continue
        norm = [ll / len(c) for ll, c in zip(lls, r["choices"], strict=True)]
        differ += max(range(len(lls)), key=lambda i: (lls[i], -i)) != r["prediction"]
        differ_norm += max(range(len(norm)), key=lambda i: (norm[i], -i)) != r["prediction_norm"]
    return f"{differ} / {differ_norm}"


LMEVAL_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


@dataclass
class Row:
    task: str
    precision: str
    outcome: Any  # kiln's EvalOutcome
    kiln_s: float
    theirs: dict[str, Any]  # lm-eval's metrics, loop_s and samples_jsonl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--limit", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=16, help="lm-eval's --batch_size")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--precisions", default="fp32", help="comma list of fp32,bf16: both systems at each")
    parser.add_argument("--update", action="store_true", help="write the table into BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(2)

    precisions = args.precisions.split(",")
    models = {p: load("default", p, progress=False) for p in precisions}
    rows = []
    for task in args.tasks.split(","):
        for precision in precisions:
            loaded = models[precision]
            start = time.perf_counter()
            outcome = run(loaded, EvalOptions(task=task, limit=args.limit), progress=False)
            kiln_s = time.perf_counter() - start
            theirs = lmeval.run(loaded.folder, [TASKS[task]], args.limit, batch_size=args.batch_size,
                                dtype=LMEVAL_DTYPES[precision])["tasks"][TASKS[task]]
            theirs["loop_s"] = scoring_seconds(theirs.get("samples_jsonl"))
            rows.append(Row(task, precision, outcome, kiln_s, theirs))
            print(f"{task} {precision}: kiln {outcome.metrics} {kiln_s:.1f}s | lm-eval {theirs}", file=sys.stderr)
    table = render(rows, args.limit, args.batch_size)
    print(table)
    if args.update:
        update_section("bench/mc_vs_lmeval.py", table)


def render(rows: list[Row], limit: int, batch_size: int) -> str:
    lines = ["| task | precision | kiln acc | lm-eval acc | kiln acc_norm | lm-eval acc_norm | items predicted "
             "differently (acc / acc_norm) | kiln s | lm-eval scoring s | lm-eval total s | speed-up |",
             "|---" * 11 + "|"]
    totals: dict[str, list[float]] = {}
    for r in rows:
        m, theirs = r.outcome.metrics, r.theirs
        lines.append(
            f"| {r.task} | {r.precision} | {100 * m['acc']:.1f} ± {100 * m['acc_stderr']:.1f} "
            f"| {100 * theirs['acc']:.1f} | {100 * m['acc_norm']:.1f} ± {100 * m['acc_norm_stderr']:.1f} "
            f"| {100 * theirs['acc_norm']:.1f} | {agreement(r.outcome.records, theirs.get('samples_jsonl'))} "
            f"| {r.kiln_s:.1f} | {theirs['loop_s']:.0f} | {theirs['eval_s']:.1f} | {theirs['loop_s'] / r.kiln_s:.1f}x |"
        )
        kiln_s, their_s = totals.setdefault(r.precision, [0.0, 0.0])
        totals[r.precision] = [kiln_s + r.kiln_s, their_s + theirs["loop_s"]]
    for precision, (kiln_s, their_s) in totals.items():
        lines.append(f"| all | {precision} | | | | | | {kiln_s:.1f} | {their_s:.0f} | | {their_s / kiln_s:.1f}x |")
    notes = []
    if {"fp32", "bf16"} <= set(totals):
        notes.append(cross_precision(rows, totals))
    info = describe(machine_info("transformers"))
    versions = lmeval.venv_versions(lmeval.ensure_lmeval())
    notes.append(f"First {limit} items of each task, 2 threads; lm-eval {versions.get('lm_eval', '?')} `hf` backend "
                 f"(dtype float32 or bfloat16 as the row says), batch size {batch_size}. Machine: {info}.")
    return "\n".join(lines) + "\n\n" + "\n\n".join(notes)


def cross_precision(rows: list[Row], totals: dict[str, list[float]]) -> str:
    """kiln in bf16 against lm-eval in fp32 (the reference setting): accuracy moved and time saved."""
    by = {(r.task, r.precision): r for r in rows}
    parts = []
    for task in dict.fromkeys(r.task for r in rows):
        ours, ref = by[(task, "bf16")], by[(task, "fp32")]
        m, theirs = ours.outcome.metrics, ref.theirs
        parts.append(f"{task} acc {100 * (m['acc'] - theirs['acc']):+.1f} / acc_norm "
                     f"{100 * (m['acc_norm'] - theirs['acc_norm']):+.1f} points, "
                     f"{agreement(ours.outcome.records, theirs.get('samples_jsonl'))} items predicted differently")
    speed = totals["fp32"][1] / totals["bf16"][0]
    return (f"kiln bf16 against lm-eval fp32 (the accuracy reference): {speed:.1f}x faster in all; "
            + "; ".join(parts) + ".")


if __name__ == "__main__":
    main()
