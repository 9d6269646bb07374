"""Resident memory of kiln's engine under a steady load, without the HTTP server around it.

Keeps `--concurrency` requests in flight (AlpacaEval instructions from the shared data, greedy, up to
128 new tokens each) for `--seconds`, and every 10 s prints the requests started, the process's RSS
the number of live Python objects and glibc's malloc statistics (bytes in use and free in its heaps):
RSS that grows while the object count stays flat is native memory, not requests or results kept alive;
malloc's "in use" growing with it means live native allocations (kernel caches), "free" growing means
fragmentation.

    .venv/bin/python bench/engine_rss.py [--dtype bf16] [--seconds 60] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import time

from kiln import settings
from kiln.engine.engine import Engine, EngineConfig
from kiln.engine.request import Request
from kiln.engine.sampler import SamplingParams
from kiln.model.load import load


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def malloc_mb() -> str:
    """glibc's bytes in use / free in its heaps (mmap'd blocks counted as in use), or n/a elsewhere."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return "n/a"
    info = libc.mallinfo2()
    return f"{(info.uordblks + info.hblkhd) / 1e6:.0f} / {info.fordblks / 1e6:.0f}"


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()

    loaded = load("default", args.dtype, progress=False)
    rows = json.loads((settings.data_dir() / "prompts" / "alpaca_eval_example_outputs.json").read_text())
    prompts = [loaded.tokenizer.encode(row["instruction"]) for row in rows]
    engine = Engine(loaded.model, loaded.tokenizer, EngineConfig(kv_budget_bytes=1 << 30))
    params = SamplingParams(temperature=0.0, max_tokens=128)
    started = 0
    live: list[Request] = []
    begin = time.monotonic()
    last = begin - 10  # a line after the first step too
    print(f"{'s':>5} | requests | RSS MB | Python objects | malloc in use / free MB")
    while time.monotonic() - begin < args.seconds:
        live = [r for r in live if not r.status.finished]
        while len(live) < args.concurrency:
            live.append(engine.add_request(prompts[started % len(prompts)], params))
            started += 1
        engine.step()
        if time.monotonic() - last >= 10:
            last = time.monotonic()
            print(f"{last - begin:5.0f} | {started:8d} | {rss_mb():6.0f} | {len(gc.get_objects())} | {malloc_mb()}",
                  flush=True)


if __name__ == "__main__":
    main()
