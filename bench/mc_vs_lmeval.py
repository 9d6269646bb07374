"""kiln's multiple-choice evaluation beside lm-evaluation-harness (`hf` backend) on the same items.

Both score the first N items of HellaSwag, ARC-Easy, ARC-Challenge and PIQA from the shared data with
the harness's prompt formats, fp32, the same weights (kiln's dequantized cache folder), 2 threads.
Tasks alternate between the two systems so machine drift hits both. Times are evaluation time only
(kiln: the whole `run` call after loading, tokenization included; lm-eval: its scoring loop, read from its
progress bar, so its loading, data building and tokenization are excluded). lm-eval's own total is shown too.

    .venv/bin/python bench/mc_vs_lmeval.py [--limit 500] [--batch-size 16] [--update]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--limit", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=16, help="lm-eval's --batch_size")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--update", action="store_true", help="write the table into BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(2)

    loaded = load("default", progress=False)
    rows = []
    for task in args.tasks.split(","):
        start = time.perf_counter()
        outcome = run(loaded, EvalOptions(task=task, limit=args.limit), progress=False)
        kiln_s = time.perf_counter() - start
        theirs = lmeval.run(loaded.folder, [TASKS[task]], args.limit, batch_size=args.batch_size)["tasks"][TASKS[task]]
        theirs["loop_s"] = scoring_seconds(theirs.get("samples_jsonl"))
        rows.append((task, outcome, kiln_s, theirs, agreement(outcome.records, theirs.get("samples_jsonl"))))
        print(f"{task}: kiln {outcome.metrics} {kiln_s:.1f}s | lm-eval {theirs}", file=sys.stderr)
    table = render(rows, args.limit, args.batch_size)
    print(table)
    if args.update:
        update_section("bench/mc_vs_lmeval.py", table)


def render(rows: list[tuple[str, Any, float, dict[str, Any], str]], limit: int, batch_size: int) -> str:
    lines = ["| task | kiln acc | lm-eval acc | kiln acc_norm | lm-eval acc_norm | items predicted differently "
             "(acc / acc_norm) | kiln s | lm-eval scoring s | lm-eval total s | speed-up |", "|---" * 10 + "|"]
    kiln_total = lmeval_total = 0.0
    for task, outcome, kiln_s, theirs, differ in rows:
        m = outcome.metrics
        lines.append(
            f"| {task} | {100 * m['acc']:.1f} ± {100 * m['acc_stderr']:.1f} | {100 * theirs['acc']:.1f} "
            f"| {100 * m['acc_norm']:.1f} ± {100 * m['acc_norm_stderr']:.1f} | {100 * theirs['acc_norm']:.1f} "
            f"| {differ} | {kiln_s:.1f} | {theirs['loop_s']:.0f} | {theirs['eval_s']:.1f} "
            f"| {theirs['loop_s'] / kiln_s:.1f}x |"
        )
        kiln_total += kiln_s
        lmeval_total += theirs["loop_s"]
    lines.append(f"| all | | | | | | {kiln_total:.1f} | {lmeval_total:.0f} | | {lmeval_total / kiln_total:.1f}x |")
    info = describe(machine_info("transformers"))
    versions = lmeval.venv_versions(lmeval.ensure_lmeval())
    return "\n".join(lines) + (
        f"\n\nFirst {limit} items of each task, fp32, 2 threads; lm-eval {versions.get('lm_eval', '?')} `hf` backend, "
        f"batch size {batch_size}. Machine: {info}."
    )


if __name__ == "__main__":
    main()
