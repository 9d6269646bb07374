"""kiln's graph vs transformers `generate`, both fp32 on the default model, interleaved in one run.

Prefill tokens/s on a 512-token prompt, and decode tokens/s for 128 new tokens after a 128-token prompt
at batch 1 and 8, both timed the same way from outside: decode rate = (128 - 1) / (t(128 new) - t(1 new)).
Prompts are real WikiText-2 test text. Prints a markdown table; --update writes it into BENCHMARKS.md.

    .venv/bin/python bench/decode.py [--runs 3] [--update]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch

from common import cell, update_section
from kiln import settings
from kiln.benchmark.machine import describe, machine_info, read_bandwidth_gbs
from kiln.engine.generate import Generator
from kiln.engine.sampler import SamplingParams
from kiln.model.load import load

PROMPT_TOKENS, DECODE_PROMPT_TOKENS, NEW_TOKENS = 512, 128, 128
Runner = Callable[[list[list[int]], int], None]


def wikitext_prompts(tokenizer, count: int, length: int) -> list[list[int]]:
    path = settings.data_dir() / "wikitext-2-raw" / "wiki.test.raw"
    if not path.is_file():
        sys.exit(f"bench/decode.py: WikiText-2 not found at {path}; set KILN_DATA_DIR to the shared data folder")
    ids = tokenizer.encode(path.read_text()[:200_000])
    return [ids[i * length : (i + 1) * length] for i in range(count)]


def kiln_runner(gen: Generator) -> Runner:
    def run(prompts: list[list[int]], new_tokens: int) -> None:
        gen.generate(prompts, SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True))

    return run


def hf_runner(model) -> Runner:
    @torch.inference_mode()
    def run(prompts: list[list[int]], new_tokens: int) -> None:
        ids = torch.tensor(prompts)
        model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, pad_token_id=0)

    return run


def timed(run: Runner, prompts: list[list[int]], new_tokens: int) -> float:
    start = time.perf_counter()
    run(prompts, new_tokens)
    return time.perf_counter() - start


def measure(run: Runner, long_prompt: list[int], decode_prompts: list[list[int]]) -> dict[str, float]:
    out = {"prefill": PROMPT_TOKENS / timed(run, [long_prompt], 1)}
    for batch in (1, 8):
        prompts = decode_prompts[:batch]
        first = timed(run, prompts, 1)
        full = timed(run, prompts, NEW_TOKENS)
        out[f"decode_b{batch}"] = batch * (NEW_TOKENS - 1) / (full - first)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--update", action="store_true", help="write the table into BENCHMARKS.md")
    args = parser.parse_args()

    from transformers import LlamaForCausalLM

    loaded = load("default", progress=False)
    hf = LlamaForCausalLM.from_pretrained(loaded.folder, dtype=torch.float32).eval()
    long_prompt = wikitext_prompts(loaded.tokenizer, 1, PROMPT_TOKENS)[0]
    decode_prompts = wikitext_prompts(loaded.tokenizer, 8, DECODE_PROMPT_TOKENS)
    # no prefix caching: the timed runs repeat their prompts, and transformers computes them every time
    kiln = Generator(loaded.model, loaded.tokenizer, prefix_caching=False)
    systems = {"kiln fp32": kiln_runner(kiln), "transformers fp32": hf_runner(hf)}
    for run in systems.values():  # warm-up: first calls allocate and pick kernels
        run(decode_prompts[:8], 4)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in systems}
    for i in range(args.runs):
        for name, run in systems.items():  # interleaved, so drift of the machine hits both alike
            results[name].append(measure(run, long_prompt, decode_prompts))
            print(f"run {i + 1}/{args.runs} {name}: {results[name][-1]}", file=sys.stderr)
    weight_bytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    table = render(results, args.runs) + roofline(weight_bytes)
    print(table)
    if args.update:
        update_section("bench/decode.py", table)


def render(results: dict[str, list[dict[str, float]]], runs: int) -> str:
    keys = [("prefill", "prefill tok/s (512)"), ("decode_b1", "decode tok/s b1"),
            ("decode_b8", "decode tok/s b8 (total)")]
    lines = ["| system | " + " | ".join(label for _, label in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, rows in results.items():
        lines.append(f"| {name} | " + " | ".join(cell([r[k] for r in rows]) for k, _ in keys) + " |")
    base, ref = results["kiln fp32"], results["transformers fp32"]
    ratios = [statistics.median(r[k] for r in base) / statistics.median(r[k] for r in ref) for k, _ in keys]
    lines.append("| kiln / transformers | " + " | ".join(f"{x:.2f}x" for x in ratios) + " |")
    info = describe(machine_info("transformers"))
    return "\n".join(lines) + f"\n\nMedian [min-max] of {runs} interleaved runs. Machine: {info}."


def roofline(weight_bytes: int) -> str:
    bandwidth = read_bandwidth_gbs()
    return (f"\n\nMemory roofline, measured after the runs: read bandwidth {bandwidth:.1f} GB/s; fp32 weights "
            f"{weight_bytes / 1e6:.0f} MB read per decode step, so batch-1 decode cannot exceed "
            f"{bandwidth * 1e9 / weight_bytes:.0f} tok/s.")


if __name__ == "__main__":
    main()
