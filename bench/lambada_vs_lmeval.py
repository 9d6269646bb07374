"""kiln's LAMBADA (lambada_openai) beside lm-evaluation-harness (`hf` backend) on the same items.

Both score the first N items of the shared data's LAMBADA file (llm-foundry's layout of OpenAI's test
set) with the harness's lambada_openai definitions: the passage's last word, " " + word after the rest,
acc = greedy match, perplexity = exp of the mean negative log-likelihood per item. Same weights (kiln's
dequantized cache folder), fp32, 2 threads. Times are evaluation time only (kiln: the whole `run` call
after loading; lm-eval: its scoring loop, read from its progress bar).

    .venv/bin/python bench/lambada_vs_lmeval.py [--limit 500] [--batch-size 16] [--update]
"""

from __future__ import annotations

import argparse
import json
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
from mc_vs_lmeval import scoring_seconds  # noqa: E402
from peers import lmeval  # noqa: E402

TASK = "kiln_lambada_openai"


def their_items(samples_jsonl: str | None) -> dict[int, tuple[float, bool]]:
    """doc id -> (log-likelihood, greedy) from lm-eval's per-sample log."""
    items: dict[int, tuple[float, bool]] = {}
    for line in Path(samples_jsonl).read_text().splitlines() if samples_jsonl else []:
        sample = json.loads(line)
        ll, greedy = sample["filtered_resps"][0][:2]
        items[int(sample["doc_id"])] = (float(ll), greedy in (True, "True", "true", 1))
    return items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--limit", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=16, help="lm-eval's --batch_size")
    parser.add_argument("--update", action="store_true", help="write the table into BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(2)

    loaded = load("default", "fp32", progress=False)
    start = time.perf_counter()
    outcome = run(loaded, EvalOptions(task="lambada_openai", limit=args.limit), progress=False)
    kiln_s = time.perf_counter() - start
    theirs = lmeval.run(loaded.folder, [TASK], args.limit, batch_size=args.batch_size)["tasks"][TASK]
    loop_s = scoring_seconds(theirs.get("samples_jsonl"))
    text = table(outcome, kiln_s, theirs, loop_s, args)
    print(text)
    if args.update:
        update_section("bench/lambada_vs_lmeval.py", text)


def table(outcome: Any, kiln_s: float, theirs: dict[str, Any], loop_s: float, args: argparse.Namespace) -> str:
    m = outcome.metrics
    items = their_items(theirs.get("samples_jsonl"))
    mine = {r["index"]: (r["loglikelihood"], r["greedy"]) for r in outcome.records}
    shared = sorted(set(items) & set(mine))
    greedy_differ = sum(items[i][1] != mine[i][1] for i in shared)
    ll_gap = max((abs(items[i][0] - mine[i][0]) for i in shared), default=float("nan"))
    lines = [
        "| system | items | perplexity | acc | scoring s |",
        "|---|---|---|---|---|",
        f"| kiln | {len(outcome.records)} | {m['ppl']:.3f} ± {m['ppl_stderr']:.3f} | {100 * m['acc']:.2f} ± "
        f"{100 * m['acc_stderr']:.2f} | {kiln_s:.1f} |",
        f"| lm-eval | {theirs['n']} | {theirs['perplexity']:.3f} ± {theirs['perplexity_stderr']:.3f} | "
        f"{100 * theirs['acc']:.2f} ± {100 * theirs['acc_stderr']:.2f} | {loop_s:.0f} (total {theirs['eval_s']:.1f}) |",
    ]
    versions = lmeval.venv_versions(lmeval.ensure_lmeval())
    notes = (f"Items compared one by one: {len(shared)}; greedy verdict differs on {greedy_differ}; largest "
             f"log-likelihood gap {ll_gap:.2e}. kiln is {loop_s / kiln_s:.1f}x lm-eval's scoring loop. First "
             f"{args.limit} items, fp32, 2 threads; lm-eval {versions.get('lm_eval', '?')} `hf` backend, batch size "
             f"{args.batch_size} (its perplexity error is a bootstrap, kiln's the delta method). Machine: "
             f"{describe(machine_info('transformers'))}.")
    return "\n".join(lines) + "\n\n" + notes


if __name__ == "__main__":
    main()
