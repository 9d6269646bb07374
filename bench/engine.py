"""kiln's engine beside llama.cpp (llama-bench) and ONNX Runtime GenAI on the same weights and threads.

Same weights: kiln's fp32 export of the default model is quantized by llama.cpp's own llama-quantize to
Q8_0 and Q4_0, and by ORT GenAI's model builder to its int8 / int4; kiln's int8 / int4-g32-symmetric
artifacts (lm_head quantized too, as llama-quantize does) are made from the same fp32 weights and run on
kiln's two runtimes: torch (kiln's graph) and onnxruntime (`kiln export --format onnx` of the artifact,
the artifact's own integers in MatMulNBits).
transformers fp32 `generate` is timed too. Rounds alternate between the systems (machine drift hits all);
each timed run starts after a second of idle time (so none begins while the previous system's threads
still spin); every cell is median [min-max]. kiln's int8 / int4 prefill is also timed with bf16 activations (the
artifact loaded with --dtype bf16: its integer weights are unchanged, and llama.cpp rounds activations
to 8 bits in its Q8_0 / Q4_0 kernels); where the CPU lacks native bf16 that column is slow, not wrong.
ORT GenAI runs in a process of its own and llama.cpp in its tools' processes, as their users run them.

Measured: batch-1 decode (128 new tokens after a 128-token prompt; llama-bench -d 128 -n 128), prefill
of a 512-token prompt, kiln's aggregate decode at 16 concurrent sequences, the memory roofline (read
bandwidth measured in the same run, bytes of weights per token), prefix-cache time to first token with
a shared 400-token prefix, speculative decoding (target: kiln fp32 on onnxruntime; draft: the int4
artifact on onnxruntime, or --draft), and int4 with groups of 128 (kiln's default) beside ORT GenAI
built with block_size=128.

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
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from common import cell, update_section
from kiln import settings
from kiln.benchmark.latency import model_bytes
from kiln.benchmark.machine import describe, machine_info, read_bandwidth_gbs
from kiln.engine.drafting import Drafter, SpeculationStats
from kiln.engine.engine import Engine, EngineConfig
from kiln.engine.generate import Generator
from kiln.engine.onnx_runtime import OnnxModel, onnx_folder
from kiln.engine.sampler import SamplingParams
from kiln.model.load import LoadedModel, load
from peers import llamacpp
from peers.ortgenai import GenAIProcess, build

KILN = str(Path(sys.executable).parent / "kiln")
# llama-quantize quantizes token_embd and output too, so kiln's artifacts quantize lm_head as well
PAIRS = {"fp32": ("F32", None), "int8": ("Q8_0", ["--quantize", "int8", "--quantize-embeddings"]),
         "int4": ("Q4_0", ["--quantize", "int4", "--group-size", "32", "--symmetric", "--quantize-embeddings"])}


T = TypeVar("T")
SETTLE_S = 1.0  # idle time before each timed run, so no system starts while the last one's threads still spin


def settled(measure: Callable[..., T], *args: object, **kwargs: object) -> T:
    """`measure(*args)` after a pause: each timed run starts on a quiet machine, whoever ran before it."""
    time.sleep(SETTLE_S)
    return measure(*args, **kwargs)


def kiln_decode(loaded: LoadedModel, prompt: list[int], new: int = 128, model: object = None) -> float:
    out = Generator(model or loaded.model, loaded.tokenizer).generate(  # type: ignore[arg-type]
        [prompt], SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True))[0]
    return out.decode_tokens_per_s


def kiln_prefill(loaded: LoadedModel, prompt: list[int], model: object = None) -> float:
    engine = Engine(model or loaded.model, loaded.tokenizer,  # type: ignore[arg-type]
                    EngineConfig(kv_budget_bytes=256 << 20, max_batch_tokens=512, prefix_caching=False))
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


def hf_decode(hf: object, prompt: list[int], new: int = 128) -> float:
    """transformers fp32 `generate`: 127 / (t(128 new) - t(1 new)), as bench/decode.py times it."""
    ids = torch.tensor([prompt])

    def timed(n: int) -> float:
        start = time.perf_counter()
        hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)  # type: ignore[attr-defined]
        return time.perf_counter() - start

    return (new - 1) / (timed(new) - timed(1))


def prefix_ttft(loaded: LoadedModel, prefix: list[int], tails: list[list[int]],
                model: object = None) -> tuple[float, float]:
    """(cold, warm) seconds to first token for prefix + tail, the warm one after another tail shared it."""
    engine = Engine(model or loaded.model, loaded.tokenizer,  # type: ignore[arg-type]
                    EngineConfig(kv_budget_bytes=256 << 20, max_batch_tokens=512))
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
        bf16 = {n: load(str(work / n), precision="bf16", progress=False) for n in PAIRS if n != "fp32"}
        subprocess.run([KILN, "compress", "--quantize", "int4", "--group-size", "128", "--symmetric",
                        "--quantize-embeddings", "-o", str(work / "int4-g128")], check=True, capture_output=True)
        g128 = load(str(work / "int4-g128"), progress=False)

        hf_folder = base.folder
        ort_models = {n: OnnxModel(onnx_folder(models[n]), base.spec, 2) for n in PAIRS}
        genai_process = GenAIProcess()  # GenAI in a process of its own (peers/ortgenai.py says why)
        genai = {n: genai_process.model(n, build(hf_folder, work / f"genai-{n}", n)) for n in PAIRS}
        ort_g128 = OnnxModel(onnx_folder(g128), base.spec, 2)
        genai_g128 = genai_process.model("int4-g128", build(hf_folder, work / "genai-int4-g128", "int4",
                                                             ("block_size=128",)))
        g128_runs: dict[str, list[float]] = {"kiln": [], "genai": []}
        from transformers import LlamaForCausalLM

        hf = LlamaForCausalLM.from_pretrained(hf_folder, dtype=torch.float32).eval()

        keys = ("kd", "kp", "bp", "od", "op", "ld", "lp", "gd", "gp")
        results: dict[str, dict[str, list[float]]] = {n: {k: [] for k in keys} for n in PAIRS}
        bandwidth, transformers_decode = [], []
        for run in range(args.runs):
            bandwidth.append(read_bandwidth_gbs())
            with torch.inference_mode():
                transformers_decode.append(hf_decode(hf, prompt128))
            for name in PAIRS:
                r = results[name]
                r["kd"].append(settled(kiln_decode, models[name], prompt128))
                r["kp"].append(settled(kiln_prefill, models[name], prompt512))
                if name in bf16:
                    r["bp"].append(settled(kiln_prefill, bf16[name], prompt512))
                torch.set_num_threads(1)  # as `--runtime onnxruntime` does: ORT's pool gets the cores
                r["od"].append(settled(kiln_decode, models[name], prompt128, model=ort_models[name]))
                r["op"].append(settled(kiln_prefill, models[name], prompt512, model=ort_models[name]))
                torch.set_num_threads(2)
                rows = settled(llamacpp.run_bench, tools, ggufs[name], prompt_tokens=512, gen_tokens=0, repetitions=1)
                r["lp"].append(float(rows[0]["avg_ts"]))
                r["ld"].append(settled(_llama_decode, tools, ggufs[name]))
                r["gd"].append(settled(genai[name].decode, prompt128))
                r["gp"].append(settled(genai[name].prefill, prompt512))
            torch.set_num_threads(1)
            g128_runs["kiln"].append(settled(kiln_decode, g128, prompt128, model=ort_g128))
            torch.set_num_threads(2)
            g128_runs["genai"].append(settled(genai_g128.decode, prompt128))
            last = {n: {k: round(v[-1], 1) for k, v in r.items() if v} for n, r in results.items()}
            print(f"run {run + 1}: {last}", file=sys.stderr)
        genai_process.close()
        batch1 = results["fp32"]["kd"]
        total16 = [kiln_concurrent(base, concurrent) for _ in range(max(1, args.runs // 2))]
        cold, warm = zip(*[prefix_ttft(base, ids[5000:5400], [ids[6000:6020], ids[7000:7020]])
                           for _ in range(args.runs)], strict=True)
        torch.set_num_threads(1)
        ort_cold, ort_warm = zip(*[prefix_ttft(models["int4"], ids[5000:5400], [ids[6000:6020], ids[7000:7020]],
                                               model=ort_models["int4"]) for _ in range(args.runs)], strict=True)
        torch.set_num_threads(2)

    def best(r: dict[str, list[float]], *keys: str) -> float:
        return max(statistics.median(r[k]) for k in keys if r[k])

    lines = ["| precision | kiln torch | kiln torch, bf16 activations | kiln onnxruntime | llama.cpp | ORT GenAI "
             "| kiln best / peer best |", "|---" * 7 + "|"]
    for kind, suffix in (("decode b1 tok/s", "d"), ("prefill 512 tok/s", "p")):
        for name, (qtype, _) in PAIRS.items():
            r = results[name]
            mine = ("k" + suffix, "o" + suffix, "bp") if suffix == "p" else ("kd", "od")
            ratio = best(r, *mine) / best(r, "l" + suffix, "g" + suffix)
            bf = cell(r["bp"]) if suffix == "p" and r["bp"] else "-"
            lines.append(f"| {name} {kind} | {cell(r['k' + suffix])} | {bf} | {cell(r['o' + suffix])} "
                         f"| {cell(r['l' + suffix])} ({qtype}) | {cell(r['g' + suffix])} | {ratio:.2f}x |")
    bw = statistics.median(bandwidth)
    lines.append("")
    for name in PAIRS:
        r = results[name]
        read = {"torch": (model_bytes(models[name]), statistics.median(r["kd"])),
                "onnxruntime": (onnx_bytes_per_token(ort_models[name].folder), statistics.median(r["od"]))}
        parts = [f"{rt} reads {size / 1e6:.0f} MB per token, {rate * size / 1e9:.1f} GB/s = "
                 f"{100 * rate * size / (bw * 1e9):.0f}% of the roofline" for rt, (size, rate) in read.items()]
        lines.append(f"- kiln {name} batch-1 decode: " + "; ".join(parts) + ".")
    hf_median = statistics.median(transformers_decode)
    fastest = max(best(r, "kd", "od") for r in results.values())
    lines.append(f"- transformers fp32 `generate`, batch 1: {cell(transformers_decode)} tok/s; kiln's fastest "
                 f"batch-1 decode in the table is {fastest / hf_median:.1f}x that, kiln int4 with groups of 128 "
                 f"(below) {statistics.median(g128_runs['kiln']) / hf_median:.1f}x, kiln fp32 "
                 f"{best(results['fp32'], 'kd', 'od') / hf_median:.1f}x.")
    fp32_bytes = model_bytes(base)
    lines += [
        f"- Memory read bandwidth in this run: {cell(bandwidth)} GB/s; kiln fp32 batch-1 decode reads "
        f"{fp32_bytes / 1e6:.0f} MB per token, so its roofline is {bw * 1e9 / fp32_bytes:.0f} tok/s and kiln "
        f"reaches {100 * statistics.median(batch1) * fp32_bytes / (bw * 1e9):.0f}% of it.",
        f"- kiln fp32, 16 concurrent sequences (128-token prompts, 128 new tokens each): {cell(total16)} tok/s in "
        f"total, {statistics.median(total16) / statistics.median(batch1):.1f}x batch 1.",
        "- Prefix caching, 400-token shared prefix + 20 new tokens: time to first token cold "
        f"{cell([1e3 * c for c in cold])} ms, warm {cell([1e3 * w for w in warm])} ms "
        f"({100 * statistics.median(warm) / statistics.median(cold):.0f}% of cold); the int4 artifact on "
        f"onnxruntime: cold {cell([1e3 * c for c in ort_cold])} ms, warm {cell([1e3 * w for w in ort_warm])} ms "
        f"({100 * statistics.median(ort_warm) / statistics.median(ort_cold):.0f}% of cold).",
    ]
    g128_kiln = statistics.median(g128_runs["kiln"])
    g128_bytes = onnx_bytes_per_token(ort_g128.folder)
    lines.append(
        f"- int4 with groups of 128 (kiln's default group size; symmetric, lm_head int4), batch-1 decode: kiln "
        f"onnxruntime {cell(g128_runs['kiln'])} tok/s, ORT GenAI built with block_size=128 "
        f"{cell(g128_runs['genai'])} ({g128_kiln / statistics.median(g128_runs['genai']):.2f}x); against ORT "
        f"GenAI's default int4 (blocks of 32) above: {g128_kiln / statistics.median(results['int4']['gd']):.2f}x; "
        f"kiln reads {g128_bytes / 1e6:.0f} MB per token, {g128_kiln * g128_bytes / 1e9:.1f} GB/s = "
        f"{100 * g128_kiln * g128_bytes / (bw * 1e9):.0f}% of the roofline.")
    draft_model = (OnnxModel(onnx_folder(load(args.draft, progress=False)), base.spec, 2) if args.draft
                   else ort_models["int4"])
    lines.append(_speculative_line(base, ort_models["fp32"], draft_model, args.draft or "the int4 artifact",
                                   prompt128, args.speculate, args.runs))
    table = "\n".join(lines) + f"\n\nllama.cpp {tools.commit}; {args.runs} rounds; machine: {describe(machine_info())}."
    print(table)
    if args.update:
        update_section("bench/engine.py", table)


def onnx_bytes_per_token(folder: Path) -> int:
    """Bytes of the ONNX graph's weights one decode step reads: every initializer but those only a
    Gather reads (the embedding table, of which a step reads one row)."""
    import onnx

    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    readers: dict[str, set[str]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.op_type)
    total = 0
    for init in graph.initializer:
        if readers.get(init.name, set()) <= {"Gather"}:
            continue
        stored = {e.key: e.value for e in init.external_data}
        total += int(stored["length"]) if "length" in stored else len(init.raw_data)
    return total


def _llama_decode(tools: llamacpp.LlamaTools, gguf: Path) -> float:
    cmd = [str(tools.bench), "-m", str(gguf), "-p", "0", "-n", "128", "-d", "128", "-t", "2", "-r", "1", "-o", "json"]
    rows = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    return float(rows[0]["avg_ts"])


def _speculative_line(base: LoadedModel, target: OnnxModel, draft: OnnxModel, draft_name: str, prompt: list[int],
                      k: int, runs: int) -> str:
    """Speculative against plain greedy decoding of the same target on the same runtime (onnxruntime fp32)."""
    params = SamplingParams(temperature=0.0, max_tokens=128)
    plain, fast, rates, same = [], [], [], True
    gen = Generator(target, base.tokenizer, prefix_caching=False)  # each run prefills, as the draft path does
    drafter = Drafter(draft, k, base.spec.vocab_size)
    drafted = Generator(target, base.tokenizer, prefix_caching=False, drafter=drafter)  # kiln generate --draft
    torch.set_num_threads(1)
    for _ in range(runs):
        start = time.perf_counter()
        reference = gen.generate([prompt], params)[0].token_ids
        plain.append(len(reference) / (time.perf_counter() - start))
        drafter.stats = SpeculationStats()  # this run's acceptance
        start = time.perf_counter()
        tokens = drafted.generate([prompt], params)[0].token_ids
        fast.append(len(tokens) / (time.perf_counter() - start))
        rates.append(drafter.stats.acceptance_rate)
        same = same and tokens == reference
    torch.set_num_threads(2)
    return (f"- Speculative decoding, target kiln fp32 on onnxruntime, draft {draft_name} on onnxruntime, k={k}: "
            f"{cell(fast)} tok/s against {cell(plain)} plain "
            f"({statistics.median(fast) / statistics.median(plain):.2f}x), acceptance "
            f"{100 * statistics.median(rates):.0f}%, greedy output identical: {same}.")


if __name__ == "__main__":
    main()
