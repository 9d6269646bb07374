"""A small machine profile for planning: measured once (`kiln plan --calibrate`) and cached.

It holds what a roofline needs, for each runtime and weight format kiln runs (an "engine key" such as
`torch:bf16` or `onnxruntime:int4`): memory read bandwidth, the seconds per weight byte of a batched
matrix-vector product (weights streamed from memory) at a few batch sizes, and the matmul rate at
prefill shape, each measured on the kernels that runtime calls for that format. What the engine adds
on top of the roofline is measured on the real engine, on two random-weight probe models of a shape
unlike any shipped model (so the profile is not fitted to the model being planned): per decode step,
a cost per layer, a cost per step independent of depth, and a cost per byte of keys and values
attention reads; for a prompt, the share of the matmul rate a whole prefill reaches; and in memory,
the runtime's own resident bytes. The onnxruntime costs are in src/kiln/plan/onnx_profile.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from kiln import settings
from kiln.benchmark.machine import cpu_name, read_bandwidth_gbs
from kiln.files import write_text
from kiln.model.packed import PackedLinear, can_pack, pack_linears, packed_nbytes
from kiln.model.spec import ModelSpec
from kiln.plan.memory import INT4_GROUP

BATCHES = (1, 4, 16)
# 7: onnxruntime int4 prompts on 8-bit blocks (the prefill graph widens them);
# 6: the cost of float offsets split off onnxruntime's int4 matrices, and its int4 rate per group size;
# 5: onnxruntime int4 prompts at fp32 activations (the prefill graph); 4: costs per runtime and weight
# format, prefill efficiency; 3: KV cost per cached byte (2: per query-head byte)
PROFILE_VERSION = 7
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# torch int8 / int4 layers widen their integers to fp32 inside every call (kiln.compress.quantize.qlinear)
TORCH_FORMATS = ("int8", "int4")
# The probes: the same width, two depths (to split per-layer from per-step costs), two prompt lengths
# (to measure the cost of attending to cached keys and values). A shallow probe with a wider MLP, so
# that both stream the same bytes, was tried: on torch the wider matrices stream faster, and that
# difference landed in the per-layer cost (fp32 decode planned at 0.53-0.72x of measured).
PROBE = dict(architecture="LlamaForCausalLM", vocab_size=32000, hidden_size=640, intermediate_size=1792,
             num_heads=10, num_kv_heads=2, head_dim=64, max_position=1024, tie_embeddings=True)
PROBE_LAYERS = (16, 8)
PROBE_PROMPTS = (32, 480)
PROBE_NEW_TOKENS = 32
PROBE_ROUNDS = 3  # per probe and batch size; the median counts


@dataclass
class MachineProfile:
    cpu: str
    threads: int
    read_bandwidth_gbs: float  # summing a 512 MiB array
    # each dict below is keyed by engine key (`engine_key`)
    seconds_per_weight_byte: dict[str, dict[str, float]]  # -> batch -> s/B of a streamed matmul
    prefill_gflops: dict[str, float]  # -> GFLOP/s of the weights' matmul at [512, K] x [K, N]
    prefill_efficiency: dict[str, float]  # -> a whole prefill's rate over that matmul rate, on a probe model
    layer_overhead_s: dict[str, dict[str, float]]  # -> batch -> engine seconds per layer per step
    step_overhead_s: dict[str, dict[str, float]]  # -> batch -> engine seconds per step, any depth
    kv_seconds_per_byte: dict[str, dict[str, float]]  # -> batch -> engine s per attended KV byte
    runtime_bytes: int  # resident memory of kiln's CLI, torch and a loaded tokenizer, before any model
    # onnxruntime only (empty without it), by batch: what float int4 offsets split off a matrix add to a
    # decode step (artifact/onnx_export.py), per matrix and per byte of offsets (plan/onnx_profile.py)
    offset_matrix_s: dict[str, float] = dataclasses.field(default_factory=dict)
    offset_seconds_per_byte: dict[str, float] = dataclasses.field(default_factory=dict)
    # onnxruntime only: int4 group size -> batch -> s/B of its MatMulNBits (the engine key's is at INT4_GROUP)
    int4_group_seconds_per_byte: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    version: int = PROFILE_VERSION

    def has(self, key: str) -> bool:
        return key in self.seconds_per_weight_byte

    def per_byte(self, key: str, batch: int) -> float:
        return _interpolate(_keyed(self.seconds_per_weight_byte[key]), batch)

    def overhead(self, key: str, batch: int) -> float:
        return _interpolate(_keyed(self.layer_overhead_s[key]), batch)

    def step_overhead(self, key: str, batch: int) -> float:
        return _interpolate(_keyed(self.step_overhead_s[key]), batch)

    def split_offsets(self, batch: int) -> tuple[float, float]:
        """(seconds per int4 matrix, seconds per byte of offsets) that float offsets add on onnxruntime."""
        return (_interpolate(_keyed(self.offset_matrix_s), batch),
                _interpolate(_keyed(self.offset_seconds_per_byte), batch))

    def int4_per_byte(self, group: int, batch: int) -> float | None:
        """Seconds per weight byte of onnxruntime's int4 matmuls in groups of `group`; None if not measured."""
        points = self.int4_group_seconds_per_byte.get(str(group))
        return _interpolate(_keyed(points), batch) if points else None

    def kv_per_byte(self, key: str, batch: int) -> float:
        # time per byte attended stays flat beyond the largest batch (the bytes already grow with it)
        return _interpolate(_keyed(self.kv_seconds_per_byte[key]), min(batch, max(BATCHES)))


def engine_key(runtime: str, precision: str) -> str:
    """The profile's key for `precision` weights on `runtime` ("torch" or "onnxruntime")."""
    return f"{runtime}:{precision}"


def attended_bytes_per_token(spec: ModelSpec, element_bytes: int, runtime: str = "torch") -> int:
    """Keys and values one cached token presents to attention per step, as the runtime reads them.

    kiln's torch engine gathers every sequence's cached keys and values from the paged pool and
    attention reads them once per KV head (grouped query heads share them, never expanded), so its KV
    term is priced per cached byte. Priced per query head instead (profile version 2), the plan
    overestimated decode at batch 16 by 1.26x (fp32) and 1.34x (bf16) for the default model (9 query /
    3 KV heads), whose probe models have 10 / 2: the same fitted cost, repriced per cached byte, gave
    1.08x and 1.11x. ONNX Runtime's CPU GroupQueryAttention scores each query head against its KV
    head's cache on its own, so there the cache is read once per query head: the int4 probe's fitted
    cost was 4.8e-10 s per cached byte (10 / 2 heads), the default model's measured one 2.1e-10 (9 / 3;
    `kiln bench -m demo/int4`, 32- against 512-token prompts); per query-head byte, 1.0e-10 and 0.7e-10.
    """
    group = spec.num_heads // spec.num_kv_heads if runtime == "onnxruntime" else 1
    return spec.kv_bytes_per_token(element_bytes) * group


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
    if not _well_formed(profile):  # an edited or damaged file ended the plan in a TypeError or KeyError
        return None
    if profile.version != PROFILE_VERSION or profile.cpu != cpu_name() or profile.threads != torch.get_num_threads():
        return None
    return profile


def _is_cost(value: object, positive: bool = False) -> bool:
    """A finite number of seconds, bytes or a rate (bool is an int to Python, not a cost)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return False
    return value > 0 if positive else value >= 0


def _well_formed(profile: MachineProfile) -> bool:
    """Every field the plan reads, of the shape calibrate() writes: the torch engine keys, each key's
    costs at every probed batch size, finite and not negative."""
    keys = profile.seconds_per_weight_byte
    if not isinstance(keys, dict) or any(engine_key("torch", p) not in keys for p in (*DTYPES, *TORCH_FORMATS)):
        return False
    per_batch = (keys, profile.layer_overhead_s, profile.step_overhead_s, profile.kv_seconds_per_byte)
    per_key = (profile.prefill_gflops, profile.prefill_efficiency)
    for field in (*per_batch, *per_key):
        if not isinstance(field, dict) or any(key not in field for key in keys):
            return False
    batches = {str(b) for b in BATCHES}
    groups = profile.int4_group_seconds_per_byte
    onnx = (profile.offset_matrix_s, profile.offset_seconds_per_byte,
            *(groups.get(str(g)) for g in (32, 64, 128) if isinstance(groups, dict)))
    if any(key.startswith("onnxruntime:") for key in keys) and not (isinstance(groups, dict) and all(
            isinstance(f, dict) and set(f) == batches and all(map(_is_cost, f.values())) for f in onnx)):
        return False
    return (all(isinstance(f[k], dict) and set(f[k]) == batches and all(map(_is_cost, f[k].values()))
                for f in per_batch for k in keys)
            and all(_is_cost(f[k], positive=True) for f in per_key for k in keys)
            and _is_cost(profile.read_bandwidth_gbs, positive=True)
            and isinstance(profile.runtime_bytes, int) and _is_cost(profile.runtime_bytes))


def best_time(fn: Any, repeats: int) -> float:
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


def _torch_layer(precision: str, rows: int, cols: int) -> tuple[Any, int]:
    """A [rows, cols] layer as kiln's torch runtime holds `precision` weights, and the bytes one call reads."""
    if precision in DTYPES:  # in kiln's storage layout (transposed, contiguous), as loaded models hold them
        weight = torch.randn(rows, cols).to(DTYPES[precision]).t().contiguous().t()
        return _runtime_linear(weight), weight.numel() * weight.element_size()
    from kiln.compress.quantize.qlinear import Int4Linear, Int8Linear

    dense = torch.nn.Linear(cols, rows, bias=False)
    layer = Int8Linear.from_float(dense) if precision == "int8" else Int4Linear.from_float(dense, INT4_GROUP, True)
    return layer, sum(t.numel() * t.element_size() for t in layer.tensors().values())


def stream_shapes(repeats: int) -> list[tuple[int, int]]:
    """[out, in] matrices of a small model's layers, `repeats` times, and a vocabulary head."""
    return [(3072, 1024), (1024, 1024), (5632, 1024), (1024, 2816)] * repeats + [(32000, 1024)]


def _streamed_matmul(precision: str) -> dict[str, float]:
    """Seconds per weight byte of the runtime's linear over ~0.3-1 GB of matrices (more than any cache).

    int8 / int4 layers widen their weights on every call, which is slow: a quarter as many matrices
    time them well enough."""
    layers = [(cols, *_torch_layer(precision, rows, cols))
              for rows, cols in stream_shapes(16 if precision in DTYPES else 4)]
    total = sum(nbytes for _, _, nbytes in layers)
    x_dtype = DTYPES.get(precision, torch.float32)
    out = {}
    for batch in BATCHES:
        xs = {cols: torch.randn(batch, cols).to(x_dtype) for cols, _, _ in layers}
        seconds = best_time(lambda xs=xs: [linear(xs[cols]) for cols, linear, _ in layers], 3)
        out[str(batch)] = seconds / total
    return out


def _prefill_gflops(precision: str) -> float:
    a = torch.randn(512, 1024).to(DTYPES.get(precision, torch.float32))
    linear, _ = _torch_layer(precision, 2816, 1024)
    seconds = best_time(lambda: linear(a), 5)
    return 2 * 512 * 1024 * 2816 / seconds / 1e9


def probe_model(layers: int, dtype: torch.dtype) -> Any:
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


def engine_step_s(model: Any, tokenizer: Any, batch: int, prompt: int) -> float:
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
    return ProbeRun(engine_step_s(model, tokenizer, batch, prompt), weights * _interpolate(_keyed(per_byte), batch),
                    probe_attended_bytes(model.spec, batch, prompt, element), model.spec.num_layers)


def probe_attended_bytes(spec: ModelSpec, batch: int, prompt: int, element_bytes: int, runtime: str = "torch") -> float:
    """KV bytes an average decode step of a probe run attends: every row's prompt and half its new tokens."""
    return batch * (prompt + PROBE_NEW_TOKENS / 2) * attended_bytes_per_token(spec, element_bytes, runtime)


def prefill_seconds(model: Any, tokenizer: Any, prompt: int) -> float:
    """Seconds from a lone `prompt`-token request to its first token on kiln's engine (best of two)."""
    from kiln.engine.generate import Generator
    from kiln.engine.sampler import SamplingParams

    generator = Generator(model, tokenizer, prefix_caching=False)
    ids = [[(31 * j) % 30000 + 100 for j in range(prompt)]]
    return best_time(lambda: generator.generate(ids, SamplingParams(temperature=0.0, max_tokens=1,
                                                                     ignore_eos=True)), 2)


def prefill_efficiency(spec: ModelSpec, prompt: int, seconds: float, gflops: float) -> float:
    """The share of the bare matmul rate a whole prefill reached: attention, norms, the engine's chunks."""
    return prompt * spec.matmul_flops_per_token(prompt // 2) / (gflops * 1e9) / seconds


def fit_probe(runs: Any) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """Per batch size, the fitted (per-layer, per-step, per-KV-byte) costs; `runs(batch, layers, prompt)`
    measures one probe decode as a ProbeRun. Three runs determine the three costs exactly, so one
    disturbed run moves all of them: each probe runs PROBE_ROUNDS times and its median counts. The rounds
    go over every batch size in turn, so a probe's runs are spread over the whole stage and a slow spell
    of the machine disturbs one of them, not all. (With one run at batch 4 and 16, the plan's decode at
    batch 16 ran 1.13-1.50x of the bench in one calibration and 0.86-1.05x in the one before it.)"""
    deep, shallow = PROBE_LAYERS
    short, long = PROBE_PROMPTS
    rounds: dict[int, list[list[ProbeRun]]] = {batch: [] for batch in BATCHES}
    for _ in range(PROBE_ROUNDS):
        for batch in BATCHES:
            rounds[batch].append([runs(batch, deep, short), runs(batch, deep, long), runs(batch, shallow, short)])
    layer_s, step_s, kv_s = {}, {}, {}
    for batch in BATCHES:
        medians = [replace(probe[0], step_s=statistics.median(r.step_s for r in probe))
                   for probe in zip(*rounds[batch], strict=True)]
        layer_s[str(batch)], step_s[str(batch)], kv_s[str(batch)] = fit_step_costs(*medians)
    return layer_s, step_s, kv_s


def _engine_costs(tokenizer: Any, per_byte: dict[str, dict[str, float]],
                  gflops: dict[str, float]) -> dict[str, dict[str, Any]]:
    """The torch engine's per-layer, per-step and per-KV-byte decode costs and its prefill efficiency, by key."""
    costs: dict[str, dict[str, Any]] = {"layer_overhead_s": {}, "step_overhead_s": {}, "kv_seconds_per_byte": {},
                                        "prefill_efficiency": {}}
    for name, dtype in DTYPES.items():
        key = engine_key("torch", name)
        models = {layers: probe_model(layers, dtype) for layers in PROBE_LAYERS}
        with torch.inference_mode():
            fitted = fit_probe(lambda b, n, p, models=models, key=key:
                               _probe_run(models[n], tokenizer, b, p, per_byte[key]))
            deep = models[PROBE_LAYERS[0]]
            seconds = prefill_seconds(deep, tokenizer, PROBE_PROMPTS[1])
        for field, value in zip(("layer_overhead_s", "step_overhead_s", "kv_seconds_per_byte"), fitted, strict=True):
            costs[field][key] = value
        costs["prefill_efficiency"][key] = prefill_efficiency(deep.spec, PROBE_PROMPTS[1], seconds, gflops[key])
    for name in TORCH_FORMATS:  # the same graph at fp32 around the widened matmuls
        for field in costs:
            costs[field][engine_key("torch", name)] = costs[field][engine_key("torch", "fp32")]
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
    """Measure this machine (a few minutes) and cache the profile."""
    from tqdm import tqdm

    from kiln.plan import onnx_profile

    tokenizer = _runtime_tokenizer()
    runtime, threads = _rss_bytes(), torch.get_num_threads()  # before an ONNX session narrows torch's count
    precisions = (*DTYPES, *TORCH_FORMATS)
    onnx_too = onnx_profile.available()
    split: dict[str, Any] = {}  # onnxruntime's costs of float int4 offsets and of int4 by group size
    with tqdm(total=4 if onnx_too else 3, desc="calibrating", unit="stage", disable=None) as bar:
        bar.set_postfix_str("torch kernels")
        per_byte = {engine_key("torch", p): _streamed_matmul(p) for p in precisions}
        gflops = {engine_key("torch", p): _prefill_gflops(p) for p in precisions}
        bar.update()
        bar.set_postfix_str("torch engine on probe models")
        costs: dict[str, dict[str, Any]] = _engine_costs(tokenizer, per_byte, gflops)
        bar.update()
        if onnx_too:
            bar.set_postfix_str("onnxruntime kernels and engine")
            onnx = onnx_profile.measure(tokenizer)
            per_byte.update(onnx.pop("seconds_per_weight_byte"))
            gflops.update(onnx.pop("prefill_gflops"))
            split.update({name: onnx.pop(name) for name in ("offset_matrix_s", "offset_seconds_per_byte",
                                                             "int4_group_seconds_per_byte")})
            for field, values in onnx.items():
                costs[field].update(values)
            bar.update()
        bar.set_postfix_str("memory bandwidth")
        bandwidth = read_bandwidth_gbs()
        bar.update()
    profile = MachineProfile(
        cpu=cpu_name(),
        threads=threads,
        read_bandwidth_gbs=bandwidth,
        seconds_per_weight_byte=per_byte,
        prefill_gflops=gflops,
        runtime_bytes=runtime,
        prefill_efficiency=costs["prefill_efficiency"],
        layer_overhead_s=costs["layer_overhead_s"],
        step_overhead_s=costs["step_overhead_s"],
        kv_seconds_per_byte=costs["kv_seconds_per_byte"],
        offset_matrix_s=split.get("offset_matrix_s", {}),
        offset_seconds_per_byte=split.get("offset_seconds_per_byte", {}),
        int4_group_seconds_per_byte=split.get("int4_group_seconds_per_byte", {}),
    )
    path = profile_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(asdict(profile), indent=2))  # whole or not at all: a Ctrl-C keeps the old one
    return profile
