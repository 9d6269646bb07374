"""`kiln bench`: load time, memory, time to first token, prefill and decode speed, inter-token latency.

Each batch size runs `runs` times on real WikiText-2 prompts (random token ids if the data is missing,
which the result says); every figure is the median over runs with its [min, max].
"""

from __future__ import annotations

import random
import resource
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from kiln.benchmark.machine import available_bytes, machine_info
from kiln.engine.generate import GenerationOutput, Generator
from kiln.engine.kv_cache import PagedKVCache
from kiln.engine.sampler import SamplingParams
from kiln.errors import ContextLengthError, DataNotFoundError, InvalidParameterError
from kiln.evaluate.data import data_file
from kiln.model.load import LoadedModel
from kiln.model.packed import packed_nbytes

PROMPT_FILE = "wikitext-2-raw/wiki.test.raw"  # under the data folder
METRICS = ("prefill_tokens_per_s", "decode_tokens_per_s", "total_decode_tokens_per_s", "ttft_ms",
           "itl_ms_p50", "itl_ms_p90", "itl_ms_p99")


@dataclass(frozen=True)
class BenchOptions:
    prompt_tokens: int = 512
    new_tokens: int = 128
    batch_sizes: tuple[int, ...] = (1, 4, 16)
    runs: int = 5
    data_dir: Path | None = None
    kv_cache: str = "model"  # model | int8
    runtime: str = "torch"  # auto | torch | torch-compiled | onnxruntime

    def __post_init__(self) -> None:
        if self.prompt_tokens < 1 or self.new_tokens < 2 or self.runs < 1 or not self.batch_sizes:
            raise InvalidParameterError(
                "--prompt-tokens and --runs must be at least 1, --new-tokens at least 2, --batch-sizes non-empty"
            )
        if min(self.batch_sizes) < 1:
            raise InvalidParameterError(f"--batch-sizes {self.batch_sizes} must all be at least 1")
        twice = sorted({b for b in self.batch_sizes if self.batch_sizes.count(b) > 1})
        if twice:  # each was run and recorded again, and the report read only the first of the rows
            raise InvalidParameterError(f"--batch-sizes names {', '.join(map(str, twice))} more than once; "
                                        "name each batch size once")
        if self.data_dir is not None:  # asked for by name: a wrong folder must not fall back to random token ids
            data_file(PROMPT_FILE, self.data_dir)


def peak_rss_bytes() -> int:
    """The process's peak resident memory since it started, or since the last reset_peak_rss()."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def reset_peak_rss() -> bool:
    """Restart the peak at the current resident memory (Linux 4.0+, /proc/self/clear_refs); False where it
    cannot. Serving memory is then measured without loading's peak, when the dequantized model and an ONNX
    session briefly coexist (the demo's int8 artifact: 882 MB peak with loading)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def model_bytes(loaded: LoadedModel) -> int:
    """Bytes the weights occupy in memory (a tied embedding counted once).

    Packed int8 / int4 weights, their scales and zeros are buffers, not parameters, so both are counted;
    the rotary cos/sin tables are buffers too, but they are not weights. bf16 weights packed for oneDNN
    are counted too, a tied head's packed copy included (it is a second copy in memory).
    """
    seen: set[int] = set()
    total = 0
    tensors = [*loaded.model.named_parameters(), *loaded.model.named_buffers()]
    for name, t in tensors:
        if name.endswith(("cos_table", "sin_table")) or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total + packed_nbytes(loaded.model)


def prompts(loaded: LoadedModel, count: int, length: int, data_dir: Path | None) -> tuple[list[list[int]], str]:
    """`count` different prompts of `length` tokens, cut from WikiText-2 test text."""
    try:
        text = data_file(PROMPT_FILE, data_dir).read_text(encoding="utf-8")
    except DataNotFoundError:
        rng = random.Random(0)
        vocab = loaded.spec.vocab_size
        return [[rng.randrange(vocab) for _ in range(length)] for _ in range(count)], "random token ids"
    ids = loaded.tokenizer.encode(text[: 12 * length * count + 10_000], add_special_tokens=False)
    if len(ids) < count * length:
        ids = ids * (count * length // max(1, len(ids)) + 1)
    return [ids[i * length : (i + 1) * length] for i in range(count)], "WikiText-2 test text"


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (pos - low) * (ordered[high] - ordered[low])


def _steady_decode_rate(outputs: Sequence[GenerationOutput]) -> float:
    """Median per-sequence decode rate once every sequence of the batch is decoding.

    Before the last prompt is prefilled, the first sequences decode between prefill chunks; that
    time shows in the inter-token latency percentiles, not in the decode rate (as llama-bench's
    generation figure leaves prompt processing out).
    """
    start = max(o.token_times[0] for o in outputs if o.token_times)
    rates = []
    for o in outputs:
        after = [t for t in o.token_times if t > start]
        if after:
            rates.append(len(after) / (after[-1] - start))
    return statistics.median(rates) if rates else 0.0


def measure_once(outputs: Sequence[GenerationOutput], batch_size: int) -> dict[str, float]:
    gaps = [(b - a) * 1000 for out in outputs for a, b in zip(out.token_times, out.token_times[1:], strict=False)]
    # the batch's prompts are prefilled in chunks, so the whole prefill ends with the last first token
    all_prefilled_s = max(o.ttft_ms for o in outputs) / 1000
    per_seq = _steady_decode_rate(outputs)
    return {
        "prefill_tokens_per_s": sum(o.prompt_tokens for o in outputs) / all_prefilled_s,
        "decode_tokens_per_s": per_seq,
        "total_decode_tokens_per_s": per_seq * batch_size,
        "ttft_ms": statistics.median(o.ttft_ms for o in outputs),
        "itl_ms_p50": _percentile(gaps, 0.5),
        "itl_ms_p90": _percentile(gaps, 0.9),
        "itl_ms_p99": _percentile(gaps, 0.99),
    }


def _check_cache_fits(loaded: LoadedModel, options: BenchOptions) -> None:
    """Refuse a batch whose keys and values alone would not fit the memory available now: the engine sizes
    its cache for the whole batch at once, so --batch-sizes 100000 asked the system for terabytes."""
    available = available_bytes()
    per_token = PagedKVCache.bytes_per_token(loaded.spec, loaded.model.dtype, options.kv_cache == "int8")
    largest = max(options.batch_sizes)
    needed = largest * (options.prompt_tokens + options.new_tokens) * per_token
    if available and needed > available:
        raise InvalidParameterError(
            f"--batch-sizes {largest} needs {needed / 1e6:,.0f} MB of keys and values for "
            f"{options.prompt_tokens + options.new_tokens} tokens a sequence, more than the "
            f"{available / 1e6:,.0f} MB of memory available; pass smaller batch sizes or fewer tokens")


def run(loaded: LoadedModel, options: BenchOptions, progress: bool = True) -> dict[str, Any]:
    from kiln.engine.onnx_runtime import pick_runtime

    context = loaded.spec.max_position
    if options.prompt_tokens + options.new_tokens > context:
        # the engine stops a sequence at the context, so the figures would be for fewer tokens than reported
        raise ContextLengthError(
            f"--prompt-tokens {options.prompt_tokens} + --new-tokens {options.new_tokens} is more than the model's "
            f"context of {context} tokens; pass a sum of {context} or less")
    _check_cache_fits(loaded, options)
    weights, precision = model_bytes(loaded), str(loaded.model.dtype).removeprefix("torch.")
    # as generate, chat and serve do: under an ONNX Runtime session only the session's copy stays
    model, runtime = pick_runtime(loaded, options.runtime, options.kv_cache, keep_weights=False)
    weights += getattr(model, "prefill_bytes", 0)  # an int4 export's prefill session holds its blocks again
    # no prefix caching: every run must prefill its prompts, not find them cached by the run before
    generator = Generator(model, loaded.tokenizer, kv_cache=options.kv_cache,  # type: ignore[arg-type]
                          prefix_caching=False)
    prompt_set, prompt_source = prompts(loaded, max(options.batch_sizes), options.prompt_tokens, options.data_dir)
    params = SamplingParams(temperature=0.0, max_tokens=options.new_tokens, ignore_eos=True)
    generator.generate(prompt_set[:1], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))  # warm-up
    results = []
    total = len(options.batch_sizes) * options.runs
    peak = peak_rss_bytes()  # loading's peak: a reset below forgets it
    with tqdm(total=total, desc="bench", unit="run", disable=None if progress else True) as bar:
        for batch_size in options.batch_sizes:
            is_reset = reset_peak_rss()
            samples = []
            for _ in range(options.runs):
                outputs = generator.generate(prompt_set[:batch_size], params)
                samples.append(measure_once(outputs, batch_size))
                bar.update(1)
            row: dict[str, Any] = {"batch_size": batch_size}
            for key in METRICS:
                values = [s[key] for s in samples]
                row[key] = statistics.median(values)
                row[f"{key}_range"] = [min(values), max(values)]
            serving = peak_rss_bytes()
            peak = max(peak, serving)
            row["peak_rss_bytes"] = peak  # the process's peak so far, loading included
            # the peak while this batch size ran: what serving it takes (None where it cannot be told apart)
            row["serving_peak_rss_bytes"] = serving if is_reset else None
            results.append(row)
    return {
        "model": loaded.source.name,
        "model_sha256": loaded.sha256,
        "precision": precision,
        "kv_cache": options.kv_cache,
        "runtime": runtime,
        "load_seconds": loaded.load_seconds,
        "bytes_on_disk": loaded.source.size_bytes,
        "bytes_in_memory": weights,
        "prompt_tokens": options.prompt_tokens,
        "new_tokens": options.new_tokens,
        "runs": options.runs,
        "prompts": prompt_source,
        "machine": machine_info("transformers"),
        "results": results,
    }


def format_table(report: dict[str, Any]) -> str:
    lines = [
        f"model {report['model']} ({report['model_sha256'][:12]}), {report['precision']}, runtime "
        f"{report['runtime']}; load "
        f"{report['load_seconds']:.2f} s; {report['bytes_on_disk'] / 1e6:.1f} MB on disk, "
        f"{report['bytes_in_memory'] / 1e6:.1f} MB of weights in memory",
        f"{report['prompt_tokens']}-token prompts ({report['prompts']}), {report['new_tokens']} new tokens, "
        f"median [min-max] of {report['runs']} runs",
        "",
        "| batch | TTFT ms | prefill tok/s | decode tok/s/seq | decode tok/s total | ITL p50 ms | ITL p90 ms "
        "| ITL p99 ms | peak RSS MB | serving RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        cells = [f"{r[k]:.1f} [{r[k + '_range'][0]:.1f}-{r[k + '_range'][1]:.1f}]" for k in
                 ("ttft_ms", "prefill_tokens_per_s", "decode_tokens_per_s", "total_decode_tokens_per_s")]
        cells += [f"{r[k]:.1f}" for k in ("itl_ms_p50", "itl_ms_p90", "itl_ms_p99")]
        serving = r.get("serving_peak_rss_bytes")
        cells += [f"{r['peak_rss_bytes'] / 1e6:.0f}", "-" if serving is None else f"{serving / 1e6:.0f}"]
        lines.append(f"| {r['batch_size']} | " + " | ".join(cells) + " |")
    m = report["machine"]
    lines.append(f"\nmachine: {m['cpu']}, {m['cores']} cores, {m['threads']} threads; torch {m['torch']}")
    return "\n".join(lines)
