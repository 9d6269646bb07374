"""kiln artifacts exported to GGUF, run by llama.cpp: same greedy tokens as kiln, perplexity within 1%.

For each artifact recipe: `kiln compress`, `kiln export --format gguf`, then
- greedy generation of 32 tokens on 5 MT-bench prompts (chat template) in kiln and in llama-cpp-python,
  and in llama-cpp-python again with each prompt fed one token at a time (its decode kernels instead of
  its batched ones: how far llama.cpp's greedy tokens agree with themselves);
- wikitext2 perplexity (ctx 512, first N chunks) with `kiln eval` on the artifact and `llama-perplexity`
  on the GGUF.
llama.cpp is built by bench/peers/llamacpp.py outside the repository.

    .venv/bin/python bench/gguf_roundtrip.py [--chunks 40] [--update]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from common import update_section
from kiln import settings
from kiln.engine.generate import Generator
from kiln.engine.onnx_runtime import runtime_model
from kiln.engine.sampler import SamplingParams
from kiln.model.load import load
from peers import llamacpp

KILN = str(Path(sys.executable).parent / "kiln")
RECIPES: dict[str, list[str] | None] = {
    "fp32 (uncompressed)": None,  # the default model as F32: no rounding on either side, so tokens must agree
    "int8": ["--quantize", "int8"],
    "int4-g32 asym": ["--quantize", "int4", "--group-size", "32"],
    "int4-g128 sym gptq": ["--quantize", "int4", "--group-size", "128", "--symmetric", "--method", "gptq"],
}
NEW_TOKENS = 32


def prompts(count: int = 5) -> list[str]:
    path = settings.data_dir() / "prompts" / "mt_bench_question.jsonl"
    return [json.loads(line)["turns"][0] for line in path.read_text().splitlines()[:count]]


def kiln_tokens(folder: str, texts: list[str], runtime: str = "torch") -> tuple[list[list[int]], list[list[int]]]:
    """Prompt ids and kiln's greedy tokens on `runtime` (onnxruntime: the artifact's ONNX export, whose
    int8 / symmetric int4 kernels round activations to 8 bits, as llama.cpp's do)."""
    loaded = load(folder, progress=False)
    ids = [loaded.tokenizer.encode_chat([{"role": "user", "content": t}]) for t in texts]
    gen = Generator(runtime_model(loaded, runtime), loaded.tokenizer)
    outs = gen.generate(ids, SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True))
    torch.set_num_threads(2)  # the onnxruntime runtime leaves torch one thread
    return ids, [o.token_ids for o in outs]


def forced_agreement(folder: str, prompt_ids: list[list[int]], theirs: list[list[int]]) -> tuple[int, int]:
    """Positions where kiln's argmax is llama.cpp's token given llama.cpp's own sequence so far (so one
    near-tie does not make the rest of a sequence differ): (agreeing, total)."""
    loaded = load(folder, progress=False)
    agree = total = 0
    with torch.inference_mode():
        for ids, tokens in zip(prompt_ids, theirs, strict=True):
            logits = loaded.model(torch.tensor([ids + tokens[:-1]]), logits="all")[0, len(ids) - 1 :]
            agree += sum(int(a == b) for a, b in zip(logits.argmax(-1).tolist(), tokens, strict=True))
            total += len(tokens)
    return agree, total


def llama_tokens(gguf: Path, prompt_ids: list[list[int]], batch: int = 512) -> list[list[int]]:
    """llama.cpp's greedy tokens; `batch` = 1 feeds each prompt one token at a time."""
    sys.path.insert(0, str(llamacpp.ensure_python_binding()))
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=1024, n_batch=batch, n_ubatch=batch, n_threads=2,
                          verbose=False, logits_all=False)
    out = []
    for ids in prompt_ids:
        llm.reset()
        tokens = []
        for tok in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            tokens.append(int(tok))
            if len(tokens) == NEW_TOKENS:
                break
        out.append(tokens)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", type=int, default=40)
    parser.add_argument("--rows", default=",".join(RECIPES), help="comma-separated rows of the table to run")
    parser.add_argument("--update", action="store_true")
    args = parser.parse_args()
    rows = args.rows.split(",")
    if unknown := [r for r in rows if r not in RECIPES]:
        parser.error(f"unknown rows {unknown}; choose from {list(RECIPES)}")
    tools = llamacpp.ensure_tools()
    text = settings.data_dir() / "wikitext-2-raw" / "wiki.test.raw"
    lines = ["| artifact | GGUF types | same greedy tokens (5 prompts x 32): kiln torch / kiln onnxruntime "
             "| llama.cpp against itself, prompt fed token by token | kiln's argmax on llama.cpp's tokens "
             "| kiln ppl | llama.cpp ppl | diff |", "|---" * 8 + "|"]
    with tempfile.TemporaryDirectory() as scratch:
        for name in rows:
            flags = RECIPES[name]
            gguf = Path(scratch) / (name.split()[0] + ".gguf")
            folder = "default" if flags is None else str(gguf.with_suffix(""))
            if flags is not None:
                subprocess.run([KILN, "compress", *flags, "-o", folder], check=True, capture_output=True)
            subprocess.run([KILN, "export", "-m", folder, "-o", str(gguf)], check=True, capture_output=True)
            info = json.loads(subprocess.run([KILN, "info", "-m", str(gguf), "--json"], check=True,
                                             capture_output=True, text=True).stdout)
            ids, ours = kiln_tokens(folder, prompts())
            theirs = llama_tokens(gguf, ids)
            same = sum(a == b for a, b in zip(ours, theirs, strict=True))
            itself = sum(a == b for a, b in zip(llama_tokens(gguf, ids, batch=1), theirs, strict=True))
            _, ort = kiln_tokens(folder, prompts(), "onnxruntime")
            same_ort = sum(a == b for a, b in zip(ort, theirs, strict=True))
            agree, total = forced_agreement(folder, ids, theirs)
            kiln_ppl = json.loads(subprocess.run(
                [KILN, "eval", "-m", folder, "--task", "wikitext2", "--limit-tokens", str(512 * args.chunks),
                 "--json"], check=True, capture_output=True, text=True).stdout)["ppl"]
            llama_ppl = llamacpp.run_perplexity(tools, gguf, text, chunks=args.chunks).ppl
            types = ", ".join(f"{k} x{v}" for k, v in sorted(info["dtypes"].items()))
            lines.append(f"| {name} | {types} | {same}/5 / {same_ort}/5 | {itself}/5 | {agree}/{total} "
                         f"| {kiln_ppl:.4f} | {llama_ppl:.4f} | {100 * (llama_ppl / kiln_ppl - 1):+.2f}% |")
            print(lines[-1], file=sys.stderr)
    table = "\n".join(lines) + (
        f"\n\nllama.cpp {tools.commit} (llama-cpp-python {tools.version}); ppl on the first {args.chunks} chunks "
        "of wiki.test.raw at ctx 512; greedy tokens compared prompt by prompt (whole 32-token sequences); "
        "the argmax column runs kiln's torch graph on each prompt followed by llama.cpp's tokens."
    )
    print(table)
    if args.update:
        update_section("bench/gguf_roundtrip.py", table)


if __name__ == "__main__":
    main()
