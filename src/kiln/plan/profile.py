"""A small machine profile for planning: measured once (`kiln plan --calibrate`) and cached.

It holds what a roofline needs and what kiln's own runtime adds on top of it: memory read bandwidth,
the seconds per weight byte of a batched matrix-vector product (weights streamed from memory) at a
few batch sizes, matmul throughput at prefill shape, the fixed cost of one decoder layer's small ops
per decode step, and the resident memory of the runtime itself.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from kiln import settings
from kiln.benchmark.machine import cpu_name, read_bandwidth_gbs

BATCHES = (1, 4, 16)
PROFILE_VERSION = 1


@dataclass
class MachineProfile:
    cpu: str
    threads: int
    read_bandwidth_gbs: float  # summing a 512 MiB array
    seconds_per_weight_byte: dict[str, dict[str, float]]  # dtype -> batch -> s/B of a streamed matmul
    prefill_gflops: dict[str, float]  # dtype -> GFLOP/s of a [512, K] x [K, N] matmul
    layer_overhead_s: dict[str, float]  # batch -> seconds of small ops per decoder layer per decode step
    runtime_bytes: int  # resident memory of torch + tokenizer stack before any model
    version: int = PROFILE_VERSION

    def per_byte(self, dtype: str, batch: int) -> float:
        return _interpolate({int(k): v for k, v in self.seconds_per_weight_byte[dtype].items()}, batch)

    def overhead(self, batch: int) -> float:
        return _interpolate({int(k): v for k, v in self.layer_overhead_s.items()}, batch)


def _interpolate(points: dict[int, float], x: int) -> float:
    """Linear in log(batch) between measured batch sizes; flat beyond the ends."""
    xs = sorted(points)
    if x <= xs[0]:
        return points[xs[0]]
    for a, b in zip(xs, xs[1:], strict=False):
        if x <= b:
            t = (math.log(x) - math.log(a)) / (math.log(b) - math.log(a))
            return points[a] + t * (points[b] - points[a])
    # beyond the largest batch the matmul turns compute-bound: time per byte grows with the batch
    return points[xs[-1]] * x / xs[-1]


def profile_path() -> Path:
    return settings.cache_dir() / "machine-profile.json"


def load_cached() -> MachineProfile | None:
    try:
        data = json.loads(profile_path().read_text())
        profile = MachineProfile(**data)
    except (OSError, ValueError, TypeError):
        return None
    if profile.version != PROFILE_VERSION or profile.cpu != cpu_name() or profile.threads != torch.get_num_threads():
        return None
    return profile


def _best_time(fn: Any, repeats: int) -> float:
    fn()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _streamed_matmul(dtype: torch.dtype) -> dict[str, float]:
    """Seconds per weight byte of F.linear over ~300 MB of small-model matrices (more than any cache)."""
    shapes = [(3072, 1024), (1024, 1024), (5632, 1024), (1024, 2816)] * 16 + [(32000, 1024)]
    weights = [torch.randn(o, i).to(dtype).t().contiguous().t() for o, i in shapes]  # kiln's storage layout
    total = sum(w.numel() * w.element_size() for w in weights)
    out = {}
    for batch in BATCHES:
        xs = {i: torch.randn(batch, i).to(dtype) for _, i in shapes}
        seconds = _best_time(lambda xs=xs: [torch.nn.functional.linear(xs[w.shape[1]], w) for w in weights], 3)
        out[str(batch)] = seconds / total
    return out


def _prefill_gflops(dtype: torch.dtype) -> float:
    a = torch.randn(512, 1024).to(dtype)
    b = torch.randn(2816, 1024).to(dtype).t().contiguous().t()
    seconds = _best_time(lambda: torch.nn.functional.linear(a, b), 5)
    return 2 * 512 * 1024 * 2816 / seconds / 1e9


def _layer_overhead() -> dict[str, float]:
    """Decode-step time per layer of a tiny random model: the small ops, not the weights."""
    from kiln.model.llama import LlamaModel
    from kiln.model.spec import ModelSpec

    spec = ModelSpec(architecture="LlamaForCausalLM", vocab_size=256, hidden_size=64, intermediate_size=128,
                     num_layers=16, num_heads=4, num_kv_heads=2, head_dim=16, max_position=512)
    model = LlamaModel(spec).eval()
    out = {}
    with torch.inference_mode():
        for batch in BATCHES:
            cache = model.new_cache(batch, 300)
            model(torch.zeros(batch, 128, dtype=torch.long), cache)
            token = torch.zeros(batch, 1, dtype=torch.long)
            seconds = _best_time(lambda token=token, cache=cache: [model(token, cache) for _ in range(20)], 3) / 20
            out[str(batch)] = seconds / spec.num_layers
    return out


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def calibrate() -> MachineProfile:
    """Measure this machine (about half a minute) and cache the profile."""
    from transformers import AutoTokenizer  # noqa: F401  (part of the runtime's resident memory)

    runtime = _rss_bytes()
    profile = MachineProfile(
        cpu=cpu_name(),
        threads=torch.get_num_threads(),
        read_bandwidth_gbs=read_bandwidth_gbs(),
        seconds_per_weight_byte={name: _streamed_matmul(dt) for name, dt in
                                 (("fp32", torch.float32), ("bf16", torch.bfloat16))},
        prefill_gflops={name: _prefill_gflops(dt) for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))},
        layer_overhead_s=_layer_overhead(),
        runtime_bytes=runtime,
    )
    path = profile_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(profile), indent=2))
    return profile
