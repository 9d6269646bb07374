"""Matmul work of kiln's multiple-choice scorer beside lm-evaluation-harness's, counted, not timed.

Both are compute-bound on a CPU, so the ratio of their matmul FLOPs bounds the speed-up kiln can get from
scoring each context once, at equal cost per FLOP. Counted from the tokenized items (kiln's tokenization,
which matches the harness's `_encode_pair`):
- the harness's `hf` backend runs every (context + continuation)[:-1] in full, lm_head at every position;
- kiln runs each context once (lm_head at its last position only) and each continuation's tokens but its
  last on top of it (lm_head at each). Padding is left out on both sides.
FLOPs per token: 2 x (the decoder's matmul weights), plus 2 x hidden x vocab where lm_head runs; attention's
own products (a few percent at these lengths) are left out.

    .venv/bin/python bench/mc_flops.py [--limit 500] [--update]
"""

from __future__ import annotations

import argparse
import itertools

from common import update_section
from kiln.evaluate.multiple_choice import requests_for
from kiln.evaluate.tasks import multiple_choice as tasks
from kiln.model.load import load

TASKS = ("hellaswag", "arc_easy", "arc_challenge", "piqa")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--limit", type=int, default=500)
    parser.add_argument("--update", action="store_true")
    args = parser.parse_args()
    loaded = load("default", progress=False)
    s = loaded.spec
    attention = s.hidden_size * s.head_dim * (2 * s.num_heads + 2 * s.num_kv_heads)  # q, o and k, v
    body = 2 * s.num_layers * (attention + 3 * s.hidden_size * s.intermediate_size)
    head = 2 * s.hidden_size * s.vocab_size
    lines = ["| task | items | kiln TFLOP | lm-eval TFLOP | ratio |", "|---|---|---|---|---|"]
    totals = [0, 0]
    for task in TASKS:
        items = list(itertools.islice(tasks.load(task), args.limit))
        kiln = harness = 0
        for item in items:
            for request, _ in requests_for(loaded.tokenizer, item):
                context = len(request.context)
                kiln += context * body + head
                for continuation in request.continuations:
                    kiln += (len(continuation) - 1) * (body + head)
                    harness += (context + len(continuation) - 1) * (body + head)
        totals[0] += kiln
        totals[1] += harness
        lines.append(f"| {task} | {len(items)} | {kiln / 1e12:.2f} | {harness / 1e12:.2f} | {harness / kiln:.2f}x |")
    lines.append(f"| all | | {totals[0] / 1e12:.2f} | {totals[1] / 1e12:.2f} | {totals[1] / totals[0]:.2f}x |")
    note = (f"First {args.limit} items of each task; default model ({s.num_layers} layers, hidden {s.hidden_size}, "
            f"vocab {s.vocab_size}); padding and attention products left out.")
    table = "\n".join(lines) + "\n\n" + note
    print(table)
    if args.update:
        update_section("bench/mc_flops.py", table)


if __name__ == "__main__":
    main()
