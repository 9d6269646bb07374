"""wikitext2 perplexity of the default model: `kiln eval` beside llama.cpp's `llama-perplexity`, same GGUF.

Both read wiki.test.raw, add BOS, cut non-overlapping 512-token chunks and score the second half of each
(llama.cpp's protocol). kiln runs on the fp32 dequantized weights, llama.cpp on the Q4_1 file itself (it
dequantizes per block inside its kernels). Wall time and peak memory are for the whole process.

    .venv/bin/python bench/ppl_vs_llamacpp.py [--chunks N] [--update]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from common import update_section
from kiln import settings
from kiln.model.source import default_gguf_path
from peers import llamacpp

KILN = str(Path(sys.executable).parent / "kiln")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", type=int, default=None, help="only the first N chunks (default: the whole file)")
    parser.add_argument("--update", action="store_true")
    args = parser.parse_args()
    tools = llamacpp.ensure_tools()
    text = settings.data_dir() / "wikitext-2-raw" / "wiki.test.raw"

    command = [KILN, "eval", "--task", "wikitext2", "--json"]
    if args.chunks:
        command += ["--limit-tokens", str(512 * args.chunks)]
    start = time.perf_counter()
    kiln = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    kiln_s = time.perf_counter() - start
    kiln_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # GiB (ru_maxrss is KiB)

    llama = llamacpp.run_perplexity(tools, default_gguf_path(), text, ctx=512, threads=2, chunks=args.chunks)
    diff = 100 * (kiln["ppl"] / llama.ppl - 1)
    lines = [
        "| system | weights | ppl ± se | chunks | wall s |", "|---|---|---|---|---|",
        f"| kiln eval | fp32 (dequantized Q4_1) | {kiln['ppl']:.4f} ± {kiln['ppl_stderr']:.4f} | "
        f"{int(kiln['chunks'])} | {kiln_s:.0f} |",
        f"| llama-perplexity {tools.commit} | Q4_1 GGUF | {llama.ppl:.4f} ± {llama.ppl_stderr:.4f} | "
        f"{llama.num_chunks} | {llama.wall_s:.0f} |",
        "",
        f"kiln / llama.cpp ppl: {diff:+.2f}% (gate: within 1%). kiln's peak RSS {kiln_rss:.2f} GiB. "
        f"llama.cpp command: `{' '.join(Path(c).name if c.startswith('/') else c for c in llama.command)}`.",
    ]
    table = "\n".join(lines)
    print(table)
    if args.update:
        update_section("bench/ppl_vs_llamacpp.py", table)


if __name__ == "__main__":
    main()
