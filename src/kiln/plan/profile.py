"""A small machine profile for planning: measured once (`kiln plan --calibrate`) and cached.

It holds what a roofline needs: memory read bandwidth, the seconds per weight byte of a batched
matrix-vector product (weights streamed from memory) at a few batch sizes, and the matmul rate at
prefill shape. What kiln's own runtime adds on top of the roofline is measured on its real engine,
on two random-weight probe models of a shape unlike any shipped model (so the profile is not fitted
to the model being planned): per decode step, a cost per layer, a cost per step independent of
depth, and a cost per byte of keys and values attention reads; and in memory, the runtime's own
resident bytes.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from kiln import settings
from kiln.benchmark.machine import cpu_name, read_bandwidth_gbs
from kiln.model.packed import PackedLinear, can_pack, pack_linears, packed_nbytes
from kiln.model.spec import ModelSpec

BATCHES = (1, 4, 16)
PROFILE_VERSION = 3  # 3: KV cost per cached byte (2: per query-head byte)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# The probes: the same width, two depths (to split per-layer from per-step costs), two prompt lengths
# (to measure the cost of attending to cached keys and values).
PROBE = dict(architecture="LlamaForCausalLM", vocab_size=32000, hidden_size=640, intermediate_size=1792,
             num_heads=10, num_kv_heads=2, head_dim=64, max_position=1024, tie_embeddings=True)
PROBE_LAYERS = (16, 8)
PROBE_PROMPTS = (32, 480)
PROBE_NEW_TOKENS = 32


@dataclass
class MachineProfile:
    cpu: str
    threads: int
    read_bandwidth_gbs: float  # summing a 512 MiB array
    seconds_per_weight_byte: dict[str, dict[str, float]]  # dtype -> batch -> s/B of a streamed matmul
    prefill_gflops: dict[str, float]  # dtype -> GFLOP/s of a [512, K] x [K, N] matmul
    layer_overhead_s: dict[str, dict[str, float]]  # dtype -> batch -> engine seconds per layer per step
    step_overhead_s: dict[str, dict[str, float]]  # dtype -> batch -> engine seconds per step, any depth
    kv_seconds_per_byte: dict[str, dict[str, float]]  # dtype -> batch -> engine s per attended KV byte
    runtime_bytes: int  # resident memory of kiln's CLI, torch and a loaded tokenizer, before any model
    version: int = PROFILE_VERSION

    def per_byte(self, dtype: str, batch: int) -> float:
        return _interpolate(_keyed(self.seconds_per_weight_byte[dtype]), batch)

    def overhead(self, dtype: str, batch: int) -> float:
        return _interpolate(_keyed(self.layer_overhead_s[dtype]), batch)

    def step_overhead(self, dtype: str, batch: int) -> float:
        return _interpolate(_keyed(self.step_overhead_s[dtype]), batch)

    def kv_per_byte(self, dtype: str, batch: int) -> float:
        # time per byte attended stays flat beyond the largest batch (the bytes already grow with it)
        return _interpolate(_keyed(self.kv_seconds_per_byte[dtype]), min(batch, max(BATCHES)))


def attended_bytes_per_token(spec: ModelSpec, element_bytes: int) -> int:
    """Keys and values one cached token presents to attention per step: its cached bytes, KV heads only.

    Each step gathers every sequence's cached keys and values from the paged pool and attention reads
    them once per KV head (grouped query heads share them, never expanded), so the KV term is priced per
    cached byte. Priced per query head instead (profile version 2), the plan overestimated decode at
    batch 16 by 1.26x (fp32) and 1.34x (bf16) for the default model (9 query / 3 KV heads), whose probe
    models have 10 / 2: the same fitted cost, repriced per cached byte, gave 1.08x and 1.11x.
    """
    return spec.kv_bytes_per_token(element_bytes)


def _keyed(points: dict[str, float]) -> dict[int, float]:
    return {int(k): v for k, v in points.items()}


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


def _runtime_linear(weight: torch.Tensor) -> Any:
    """y = x W^T as kiln's runtime computes it: packed for oneDNN in bf16 where supported, else F.linear."""
    if not can_pack(weight.dtype):
        return lambda x: torch.nn.functional.linear(x, weight)
    return PackedLinear(weight)


def _streamed_matmul(dtype: torch.dtype) -> dict[str, float]:
    """Seconds per weight byte of the runtime's linear over ~300 MB of small-model matrices (more than any cache)."""
    shapes = [(3072, 1024), (1024, 1024), (5632, 1024), (1024, 2816)] * 16 + [(32000, 1024)]
    total = sum(o * i for o, i in shapes) * torch.empty(0, dtype=dtype).element_size()
    # weights in kiln's storage layout (transposed, contiguous), as loaded models hold them
    layers = [(i, _runtime_linear(torch.randn(o, i).to(dtype).t().contiguous().t())) for o, i in shapes]
    out = {}
    for batch in BATCHES:
        xs = {i: torch.randn(batch, i).to(dtype) for _, i in shapes}
        seconds = _best_time(lambda xs=xs: [linear(xs[i]) for i, linear in layers], 3)
        out[str(batch)] = seconds / total
    return out


def _prefill_gflops(dtype: torch.dtype) -> float:
    a = torch.randn(512, 1024).to(dtype)
    linear = _runtime_linear(torch.randn(2816, 1024).to(dtype).t().contiguous().t())
    seconds = _best_time(lambda: linear(a), 5)
    return 2 * 512 * 1024 * 2816 / seconds / 1e9


def _probe_model(layers: int, dtype: torch.dtype) -> Any:
    from kiln.model.llama import LlamaModel, storage_layout

    torch.manual_seed(0)
    model = LlamaModel(ModelSpec(num_layers=layers, **PROBE))  # type: ignore[arg-type]
    for module in model.modules():  # the weights as a loaded model holds them
        for name, param in list(module.named_parameters(recurse=False)):
            setattr(module, name, torch.nn.Parameter(storage_layout(param.detach().to(dtype)), requires_grad=False))
    if model.spec.tie_embeddings:
        model.tie_weights()
    model._rope_table(dtype)
    pack_linears(model)  # as load() does for bf16
    return model.eval()


def _engine_step_s(model: Any, tokenizer: Any, batch: int, prompt: int) -> float:
    """Seconds per decode step of kiln's engine for `batch` sequences after `prompt`-token prompts."""
    from kiln.engine.generate import Generator
    from kiln.engine.sampler import SamplingParams

    prompts = [[(17 * i + 31 * j) % 30000 + 100 for j in range(prompt)] for i in range(batch)]
    generator = Generator(model, tokenizer, prefix_caching=False)
    generator.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))  # warm-up
    outputs = generator.generate(prompts, SamplingParams(temperature=0.0, max_tokens=PROBE_NEW_TOKENS,
                                                         ignore_eos=True))
    # every sequence takes a token per step once all are prefilled: the median gap is the step
    start = max(o.token_times[0] for o in outputs)
    gaps = [b - a for o in outputs for a, b in zip(o.token_times, o.token_times[1:], strict=False) if a >= start]
    return statistics.median(gaps)


@dataclass(frozen=True)
class ProbeRun:
    """One probe decode: its measured step and the parts of it the roofline already prices."""

    step_s: float  # measured seconds per decode step
    stream_s: float  # weight bytes x streamed-matmul seconds per byte
    kv_bytes: float  # bytes of keys and values attention reads per step
    layers: int


def fit_step_costs(deep_short: ProbeRun, deep_long: ProbeRun, shallow_short: ProbeRun) -> tuple[float, float, float]:
    """(seconds per layer, seconds per step, seconds per attended KV byte) that reproduce the three runs.

    step = stream_s + layers x per-layer + per-step + kv_bytes x per-KV-byte: the two prompt lengths
    of the deep probe give the KV price, the two depths split the rest. Noise can push a share below
    zero; it is clipped there.
    """
    kv = max(0.0, (deep_long.step_s - deep_short.step_s) / (deep_long.kv_bytes - deep_short.kv_bytes))
    rest = {run.layers: run.step_s - run.stream_s - kv * run.kv_bytes for run in (deep_short, shallow_short)}
    per_layer = max(0.0, (rest[deep_short.layers] - rest[shallow_short.layers])
                    / (deep_short.layers - shallow_short.layers))
    return per_layer, max(0.0, rest[deep_short.layers] - deep_short.layers * per_layer), kv


def _probe_run(model: Any, tokenizer: Any, batch: int, prompt: int, per_byte: dict[str, float]) -> ProbeRun:
    element = model.embed.weight.element_size()
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) + packed_nbytes(model)
    if isinstance(model.lm_head, PackedLinear) and model.spec.tie_embeddings:
        weights -= model.embed.weight.numel() * element  # the step reads the head's packed copy, not the table
    attended = batch * (prompt + PROBE_NEW_TOKENS / 2) * attended_bytes_per_token(model.spec, element)
    return ProbeRun(_engine_step_s(model, tokenizer, batch, prompt),
                    weights * _interpolate(_keyed(per_byte), batch), attended, model.spec.num_layers)


def _engine_costs(tokenizer: Any, per_byte: dict[str, dict[str, float]]) -> dict[str, Any]:
    """The engine's per-layer, per-step and per-KV-byte decode costs, by dtype and batch (fit_step_costs)."""
    costs: dict[str, Any] = {"layer_overhead_s": {}, "step_overhead_s": {}, "kv_seconds_per_byte": {}}
    deep, shallow = PROBE_LAYERS
    short, long = PROBE_PROMPTS
    for name, dtype in DTYPES.items():
        deep_model, shallow_model = _probe_model(deep, dtype), _probe_model(shallow, dtype)
        layer_s, step_s, kv_s = {}, {}, {}
        with torch.inference_mode():
            for batch in BATCHES:
                fitted = fit_step_costs(_probe_run(deep_model, tokenizer, batch, short, per_byte[name]),
                                        _probe_run(deep_model, tokenizer, batch, long, per_byte[name]),
                                        _probe_run(shallow_model, tokenizer, batch, short, per_byte[name]))
                layer_s[str(batch)], step_s[str(batch)], kv_s[str(batch)] = fitted
        costs["layer_overhead_s"][name], costs["step_overhead_s"][name] = layer_s, step_s
        costs["kv_seconds_per_byte"][name] = kv_s
    return costs


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _runtime_tokenizer() -> Any:
    """The shipped model's tokenizer: part of every kiln process's resident memory, and the probes' detokenizer."""
    import kiln.cli  # noqa: F401  (what a `kiln` process has imported before it loads a model)
    from kiln.model.load import hf_folder, read_config, resolve
    from kiln.model.tokenizer import Tokenizer

    folder = hf_folder(resolve("default"))
    return Tokenizer(folder, ModelSpec.from_hf_config(read_config(folder)))


def calibrate() -> MachineProfile:
    """Measure this machine (about a minute) and cache the profile."""
    tokenizer = _runtime_tokenizer()
    runtime = _rss_bytes()
    per_byte = {name: _streamed_matmul(dt) for name, dt in DTYPES.items()}
    profile = MachineProfile(
        cpu=cpu_name(),
        threads=torch.get_num_threads(),
        read_bandwidth_gbs=read_bandwidth_gbs(),
        seconds_per_weight_byte=per_byte,
        prefill_gflops={name: _prefill_gflops(dt) for name, dt in DTYPES.items()},
        runtime_bytes=runtime,
        **_engine_costs(tokenizer, per_byte),
    )
    path = profile_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(profile), indent=2))
    return profile
