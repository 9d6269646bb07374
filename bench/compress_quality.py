"""What each compression costs: size, wikitext2 perplexity, Δppl and KLD against the uncompressed model.

Builds one artifact per recipe below with `kiln compress` (into a scratch folder), then evaluates each
with `kiln eval --task wikitext2 --baseline default` (llama.cpp's protocol, ctx 512). Prints a table;
--update writes it into BENCHMARKS.md.

    .venv/bin/python bench/compress_quality.py [--chunks 100] [--only int8,int4-g128-gptq] [--update]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import update_section

KILN = str(Path(sys.executable).parent / "kiln")
# the rows measured before calibration grew to 128 samples keep their 64, so their cached results stay true
OLD_CALIBRATION = ["--calibration-samples", "64"]
RECIPES: dict[str, list[str]] = {
    "int8": ["--quantize", "int8"],
    "int8 +emb": ["--quantize", "int8", "--quantize-embeddings"],
    "int4-g32 asym rtn": ["--quantize", "int4", "--group-size", "32"],
    "int4-g32 sym rtn": ["--quantize", "int4", "--group-size", "32", "--symmetric"],
    "int4-g128 rtn": ["--quantize", "int4", "--group-size", "128"],
    "int4-g128 rtn +emb int8": ["--quantize", "int4", "--group-size", "128", "--quantize-embeddings", "int8"],
    "int4-g128 gptq": ["--quantize", "int4", "--group-size", "128", "--method", "gptq"],
    "int4-g128 gptq (layer target; no refit; 64 samples)": [
        "--quantize", "int4", "--group-size", "128", "--method", "gptq", "--target", "layer",
        "--gptq-refit", "0", *OLD_CALIBRATION],
    "int4-g128 awq": ["--quantize", "int4", "--group-size", "128", "--method", "awq", *OLD_CALIBRATION],
    "int4-g128 awq (layer target; 64 samples)": ["--quantize", "int4", "--group-size", "128", "--method", "awq",
                                                 "--target", "layer", *OLD_CALIBRATION],
    "int4-g128 sym rtn": ["--quantize", "int4", "--group-size", "128", "--symmetric"],
    "int4-g128 sym gptq": ["--quantize", "int4", "--group-size", "128", "--symmetric", "--method", "gptq"],
    "int4-g32 +emb rtn": ["--quantize", "int4", "--group-size", "32", "--quantize-embeddings"],
    "int4-g128 gptq +emb int8": ["--quantize", "int4", "--group-size", "128", "--method", "gptq",
                                 "--quantize-embeddings", "int8"],
    "int4-g128 gptq +emb": ["--quantize", "int4", "--group-size", "128", "--method", "gptq",
                            "--quantize-embeddings"],
    "w8a8 smoothquant": ["--quantize", "w8a8", *OLD_CALIBRATION],
    "magnitude 50%": ["--prune", "0.5", "--prune-method", "magnitude"],
    "wanda 50%": ["--prune", "0.5", "--prune-method", "wanda", *OLD_CALIBRATION],
    "2:4 wanda": ["--prune", "0.5", "--prune-method", "2:4", *OLD_CALIBRATION],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", type=int, default=100, help="512-token chunks of wiki.test.raw to score")
    parser.add_argument("--only", default=None, help="comma-separated recipe names")
    parser.add_argument("--update", action="store_true")
    parser.add_argument("--fresh", action="store_true", help="ignore rows cached by an interrupted run")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(RECIPES)
    # each finished row is cached so an interrupted run resumes where it stopped
    cache = Path(__file__).parent / "results" / f"compress_quality_{args.chunks}.json"
    cached = json.loads(cache.read_text()) if cache.exists() and not args.fresh else {}
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for name in names:
            if name in cached:
                rows.append(tuple(cached[name]))
                continue
            out = Path(scratch) / name.replace(" ", "_").replace(":", "-").replace("%", "")
            start = time.perf_counter()
            subprocess.run([KILN, "compress", *RECIPES[name], "-o", str(out)], check=True, capture_output=True)
            seconds = time.perf_counter() - start
            proc = subprocess.run([KILN, "eval", "-m", str(out), "--task", "wikitext2", "--limit-tokens",
                                   str(512 * args.chunks), "--baseline", "default", "--json"],
                                  check=True, capture_output=True, text=True)
            m = json.loads(proc.stdout)
            size = (out / "model.safetensors").stat().st_size
            rows.append((name, size, m, seconds))
            cached[name] = rows[-1]
            cache.parent.mkdir(exist_ok=True)
            cache.write_text(json.dumps(cached))
            print(f"{name}: {size / 1e6:.1f} MB ppl {m['ppl']:.3f} Δ {m['delta_ppl_pct']:+.2f}% KLD {m['kld']:.4f}",
                  file=sys.stderr)
    base = rows[0][2]["ppl_base"] if rows else float("nan")
    lines = [f"Uncompressed (fp32 dequantized default) ppl: {base:.4f}.", "",
             "| recipe | size MB | ppl ± se | Δppl | mean KLD | same top-1 | compress s |", "|---" * 7 + "|"]
    for name, size, m, seconds in rows:
        delta_se = 100 * m["delta_ppl_stderr"] / m["ppl_base"]
        lines.append(f"| {name} | {size / 1e6:.1f} | {m['ppl']:.3f} ± {m['ppl_stderr']:.3f} "
                     f"| {m['delta_ppl_pct']:+.2f}% ± {delta_se:.2f} | {m['kld']:.4f} | "
                     f"{100 * m['same_top1']:.1f}% | {seconds:.0f} |")
    table = "\n".join(lines) + f"\n\nwikitext2 test, ctx 512, first {args.chunks} chunks; KLD against the fp32 model."
    print(table)
    if args.update:
        update_section("bench/compress_quality.py", table)


if __name__ == "__main__":
    main()
