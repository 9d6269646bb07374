"""kiln's engine beside llama.cpp (llama-bench) on the same weights and threads, in one run.

Same weights: kiln's fp32 export of the default model is quantized by llama.cpp's own llama-quantize to
Q8_0 and Q4_0; kiln's int8 / int4-g32-symmetric artifacts are made from the same fp32 weights. Rounds
alternate between the systems (machine drift hits both); every cell is median [min-max].

Measured: batch-1 decode (128 new tokens after a 128-token prompt; llama-bench -d 128 -n 128), prefill
of a 512-token prompt, kiln's aggregate decode at 16 concurrent sequences, the memory roofline (read
bandwidth measured in the same run, bytes of weights per token), prefix-cache time to first token with
a shared 400-token prefix, and speculative decoding with --draft.

    .venv/bin/python bench/engine.py [--runs 5] [--draft ARTIFACT] [--update]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import update_section
from kiln import settings
from kiln.benchmark.latency import model_bytes
from kiln.benchmark.machine import describe, machine_info, read_bandwidth_gbs
from kiln.engine.engine import Engine, EngineConfig
from kiln.engine.generate import Generator
from kiln.engine.sampler import SamplingParams
from kiln.engine.speculative import SpeculativeDecoder
from kiln.model.load import LoadedModel, load
from peers import llamacpp

KILN = str(Path(sys.executable).parent / "kiln")
PAIRS = {"fp32": ("F32", None), "int8": ("Q8_0", ["--quantize", "int8"]),
         "int4": ("Q4_0", ["--quantize", "int4", "--group-size", "32", "--symmetric"])}


def cell(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} [{min(values):.1f}-{max(values):.1f}]"


def kiln_decode(loaded: LoadedModel, prompt: list[int], new: int = 128) -> float:
    out = Generator(loaded.model, loaded.tokenizer).generate(
        [prompt], SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True))[0]
    return out.decode_tokens_per_s


def kiln_prefill(loaded: LoadedModel, prompt: list[int]) -> float:
    engine = Engine(loaded.model, loaded.tokenizer, EngineConfig(kv_budget_bytes=256 << 20, max_batch_tokens=512,
                                                                 prefix_caching=False))
    start = time.perf_counter()
    request = engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=1))
    engine.run()
    assert request.first_token_at is not None
    return len(prompt) / (request.first_token_at - start)


def kiln_concurrent(loaded: LoadedModel, prompts: list[list[int]], new: int = 128) -> float:
    outs = Generator(loaded.model, loaded.tokenizer).generate(
        prompts, SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True))
    first = min(o.token_times[0] for o in outs)
    last = max(o.token_times[-1] for o in outs)
    return sum(o.completion_tokens - 1 for o in outs) / (last - first)


def prefix_ttft(loaded: LoadedModel, prefix: list[int], tails: list[list[int]]) -> tuple[float, float]:
    """(cold, warm) seconds to first token for prefix + tail, the warm one after another tail shared it."""
    engine = Engine(loaded.model, loaded.tokenizer, EngineConfig(kv_budget_bytes=256 << 20, max_batch_tokens=512))
    times = []
    for tail in tails[:2]:
        start = time.perf_counter()
        request = engine.add_request(prefix + tail, SamplingParams(temperature=0.0, max_tokens=1))
        engine.run()
        assert request.first_token_at is not None
        times.append(request.first_token_at - start)
    return times[0], times[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--draft", default=None, help="draft model for speculative decoding (e.g. a distilled student)")
    parser.add_argument("--speculate", type=int, default=4)
    parser.add_argument("--update", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    tools = llamacpp.ensure_tools()
    base = load("default", progress=False)
    wiki = settings.data_dir() / "wikitext-2-raw" / "wiki.test.raw"
    ids = base.tokenizer.encode(wiki.read_text()[:100_000], add_special_tokens=False)
    prompt128, prompt512 = ids[:128], ids[1000:1512]
    concurrent = [ids[2000 + 128 * i : 2128 + 128 * i] for i in range(16)]

    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        f32 = work / "f32.gguf"
        subprocess.run([KILN, "export", "-m", "default", "-o", str(f32)], check=True, capture_output=True)
        ggufs = {"fp32": f32}
        models: dict[str, LoadedModel] = {"fp32": base}
        for name, (qtype, flags) in PAIRS.items():
            if flags is None:
                continue
            ggufs[name] = work / f"{qtype}.gguf"
            subprocess.run([str(tools.quantize), str(f32), str(ggufs[name]), qtype], check=True, capture_output=True)
            subprocess.run([KILN, "compress", *flags, "-o", str(work / name)], check=True, capture_output=True)
            models[name] = load(str(work / name), progress=False)

        results: dict[str, dict[str, list[float]]] = {n: {k: [] for k in ("kd", "kp", "ld", "lp")} for n in PAIRS}
        bandwidth = []
        for run in range(args.runs):
            bandwidth.append(read_bandwidth_gbs())
            for name in PAIRS:
                results[name]["kd"].append(kiln_decode(models[name], prompt128))
                results[name]["kp"].append(kiln_prefill(models[name], prompt512))
                rows = llamacpp.run_bench(tools, ggufs[name], prompt_tokens=512, gen_tokens=0, repetitions=1)
                results[name]["lp"].append(float(rows[0]["avg_ts"]))
                rows = _llama_decode(tools, ggufs[name])
                results[name]["ld"].append(rows)
            print(f"run {run + 1}: {({n: {k: v[-1] for k, v in r.items()} for n, r in results.items()})}",
                  file=sys.stderr)
        batch1 = results["fp32"]["kd"]
        total16 = [kiln_concurrent(base, concurrent) for _ in range(max(1, args.runs // 2))]
        cold, warm = zip(*[prefix_ttft(base, ids[5000:5400], [ids[6000:6020], ids[7000:7020]])
                           for _ in range(args.runs)], strict=True)

    lines = ["| weights | kiln decode b1 tok/s | llama.cpp decode b1 | ratio | kiln prefill 512 tok/s "
             "| llama.cpp prefill | ratio | kiln GB/s achieved |", "|---" * 8 + "|"]
    for name, (qtype, _) in PAIRS.items():
        r = results[name]
        weight_bytes = model_bytes(models[name])
        achieved = statistics.median(r["kd"]) * weight_bytes / 1e9
        lines.append(
            f"| kiln {name} / llama.cpp {qtype} | {cell(r['kd'])} | {cell(r['ld'])} "
            f"| {statistics.median(r['kd']) / statistics.median(r['ld']):.2f}x | {cell(r['kp'])} | {cell(r['lp'])} "
            f"| {statistics.median(r['kp']) / statistics.median(r['lp']):.2f}x | {achieved:.1f} |"
        )
    bw = statistics.median(bandwidth)
    fp32_bytes = model_bytes(base)
    lines += [
        "",
        f"- Memory read bandwidth in this run: {cell(bandwidth)} GB/s; kiln fp32 batch-1 decode reads "
        f"{fp32_bytes / 1e6:.0f} MB per token, so its roofline is {bw * 1e9 / fp32_bytes:.0f} tok/s and kiln "
        f"reaches {100 * statistics.median(batch1) * fp32_bytes / (bw * 1e9):.0f}% of it.",
        f"- kiln fp32, 16 concurrent sequences (128-token prompts, 128 new tokens each): {cell(total16)} tok/s in "
        f"total, {statistics.median(total16) / statistics.median(batch1):.1f}x batch 1.",
        "- Prefix caching, 400-token shared prefix + 20 new tokens: time to first token cold "
        f"{cell([1e3 * c for c in cold])} ms, warm {cell([1e3 * w for w in warm])} ms "
        f"({100 * statistics.median(warm) / statistics.median(cold):.0f}% of cold).",
    ]
    if args.draft:
        lines.append(_speculative_line(base, load(args.draft, progress=False), prompt128, args.speculate, args.runs))
    table = "\n".join(lines) + f"\n\nllama.cpp {tools.commit}; {args.runs} rounds; machine: {describe(machine_info())}."
    print(table)
    if args.update:
        update_section("bench/engine.py", table)


def _llama_decode(tools: llamacpp.LlamaTools, gguf: Path) -> float:
    cmd = [str(tools.bench), "-m", str(gguf), "-p", "0", "-n", "128", "-d", "128", "-t", "2", "-r", "1", "-o", "json"]
    rows = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    return float(rows[0]["avg_ts"])


def _speculative_line(base: LoadedModel, draft: LoadedModel, prompt: list[int], k: int, runs: int) -> str:
    params = SamplingParams(temperature=0.0, max_tokens=128)
    plain, fast, rates, same = [], [], [], True
    gen = Generator(base.model, base.tokenizer)
    decoder = SpeculativeDecoder(base.model, draft.model, k)
    for _ in range(runs):
        start = time.perf_counter()
        reference = gen.generate([prompt], params)[0].token_ids
        plain.append(len(reference) / (time.perf_counter() - start))
        result = decoder.generate(prompt, params, base.tokenizer.eos_token_ids)
        fast.append(len(result.tokens) / result.seconds)
        rates.append(result.acceptance_rate)
        same = same and result.tokens == reference
    return (f"- Speculative decoding (draft {draft.source.name}, k={k}): {cell(fast)} tok/s against {cell(plain)} "
            f"plain ({statistics.median(fast) / statistics.median(plain):.2f}x), acceptance "
            f"{100 * statistics.median(rates):.0f}%, greedy output identical: {same}.")


if __name__ == "__main__":
    main()
