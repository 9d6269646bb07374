"""`kiln plan`: memory and speed of a model before it is loaded, as a roofline with measured efficiency.

Decode is memory-bound: each step streams every weight once, so a step costs weight bytes times the
measured seconds per byte of a streamed matmul at that batch size, plus the engine's measured cost
per byte of cached keys and values attended to, per layer, and per step. Prefill is compute-bound:
FLOPs per token over the measured matmul rate, times the share of that rate a whole prefill reached
on a probe model. Every cost is the runtime's that would run the model (`--runtime auto` picks as the
other commands do) and its weight format's. Other hardware classes use their nominal bandwidth and
FLOP rate with this machine's measured efficiency.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from kiln.errors import InvalidParameterError
from kiln.model.spec import ModelSpec, int8_block
from kiln.plan import memory
from kiln.plan.memory import PRECISIONS, Layout, PlanPrecision
from kiln.plan.profile import MachineProfile, attended_bytes_per_token, engine_key

PREFILL_TOKENS = 512


@dataclass(frozen=True)
class HardwareClass:
    name: str
    bandwidth_gbs: float  # nominal memory bandwidth
    memory_gib: float
    gflops: dict[str, float]  # nominal dense matmul rate per compute dtype
    layer_overhead_s: float  # assumed fixed cost per layer per decode step


# Nominal figures of common classes; a plan for them is an estimate, not a measurement.
HARDWARE_CLASSES = (
    HardwareClass("laptop CPU, dual-channel DDR5", 80, 16, {"fp32": 500, "bf16": 1000}, 5e-5),
    HardwareClass("server CPU, 12-channel DDR5", 400, 384, {"fp32": 4000, "bf16": 8000}, 5e-5),
    HardwareClass("consumer GPU, 24 GB GDDR6X", 1000, 24, {"fp32": 80_000, "bf16": 160_000}, 1e-5),
    HardwareClass("datacenter GPU, 80 GB HBM3", 3300, 80, {"fp32": 60_000, "bf16": 900_000}, 1e-5),
)


@dataclass
class Plan:
    precision: PlanPrecision
    runtime: str
    context: int
    concurrency: int
    weights_bytes: int
    kv_cache_bytes: int
    activations_bytes: int
    runtime_bytes: int
    total_bytes: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float  # per sequence
    total_decode_tokens_per_s: float
    explanation: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _compute_dtype(precision: PlanPrecision) -> str:
    """The nominal FLOP rate a hardware class offers this precision: int8 / int4 weights compute at fp32."""
    return "bf16" if precision == "bf16" else "fp32"


def _int8_blocks_fit(spec: ModelSpec) -> bool:
    """Whether the int8 ONNX export can be made (its MatMulNBits blocks need sizes in multiples of 16);
    where it cannot, `--runtime auto` falls back to torch (pick_runtime), and so does the plan."""
    try:
        int8_block(spec)
    except InvalidParameterError:
        return False
    return True


def resolve_runtime(spec: ModelSpec, precision: PlanPrecision, runtime: str, profile: MachineProfile) -> str:
    """The runtime whose costs price the plan: `--runtime auto` as generate, bench and serve resolve it
    (engine/onnx_runtime.why_not_onnx: onnxruntime for fp32, int8 and int4 weights where its attention
    takes the head size and it is installed; torch for bf16), or the one asked for."""
    onnx = engine_key("onnxruntime", precision)
    if runtime == "auto":
        takes = profile.has(onnx) and precision != "bf16" and spec.head_dim % 16 == 0 and (
            precision != "int8" or _int8_blocks_fit(spec))
        return "onnxruntime" if takes else "torch"
    if runtime == "onnxruntime":
        if precision == "bf16":
            raise InvalidParameterError("--runtime onnxruntime runs fp32, int8 and int4 weights; use --runtime torch "
                                        "for bf16")
        if not profile.has(onnx):
            raise InvalidParameterError("the machine profile has no onnxruntime costs; install "
                                        "`pip install 'lmkiln[onnx]'` and run `kiln plan --calibrate`")
    elif runtime != "torch":
        raise InvalidParameterError(f"--runtime {runtime!r} is not one of auto, torch, onnxruntime")
    return runtime


def estimate(spec: ModelSpec, precision: PlanPrecision, context: int, concurrency: int,
             profile: MachineProfile, runtime: str = "auto", layout: Layout | None = None) -> Plan:
    """The plan at `precision`, or for an artifact's own `layout` (whose layers' format is `precision`)."""
    layout = layout or Layout.uniform(precision)
    runtime = resolve_runtime(spec, precision, runtime, profile)
    key = engine_key(runtime, precision)
    weights = memory.streamed_bytes(spec, layout)  # what a decode step reads
    resident = memory.resident_bytes(spec, layout)  # what memory holds
    session = memory.onnx_session_bytes(spec, layout) if runtime == "onnxruntime" else 0
    kv = (memory.onnx_kv_cache_bytes(spec, context, concurrency) if runtime == "onnxruntime"
          else memory.kv_cache_bytes(spec, precision, context, concurrency))
    activations = memory.activations_bytes(spec, precision, context, concurrency)

    prompt = min(PREFILL_TOKENS, context)
    prefill_rate = profile.prefill_gflops[key] * profile.prefill_efficiency[key]
    prefill_s = prompt * spec.matmul_flops_per_token(prompt // 2) / (prefill_rate * 1e9)

    # decode speed at a full context (the slowest step a sequence of this length takes)
    kv_per_token = spec.kv_bytes_per_token(memory.kv_bytes_per_element(precision))
    kv_read = concurrency * context * attended_bytes_per_token(spec, memory.kv_bytes_per_element(precision), runtime)
    per_byte = profile.per_byte(key, concurrency)
    by_group = profile.int4_per_byte(layout.group, concurrency) if runtime == "onnxruntime" else None
    if precision == "int4" and by_group is not None:  # MatMulNBits' rate depends on the group size
        per_byte = by_group
    weight_s = weights * per_byte
    head_key = engine_key(runtime, layout.head)
    if layout.mixed and layout.head_bytes and profile.has(head_key):  # an fp32 or int8 head beside int4 / int8 layers
        weight_s += layout.head_bytes * (profile.per_byte(head_key, concurrency) - per_byte)
    split_s, (matrices, offsets) = 0.0, memory.split_offsets(spec, layout)
    if runtime == "onnxruntime" and matrices and profile.offset_matrix_s:  # Q4_1-style float offsets
        per_matrix, per_offset_byte = profile.split_offsets(concurrency)
        split_s = matrices * per_matrix + offsets * per_offset_byte
    kv_s = kv_read * profile.kv_per_byte(key, concurrency)
    layers_s = spec.num_layers * profile.overhead(key, concurrency)
    fixed_s = profile.step_overhead(key, concurrency)
    step_s = weight_s + split_s + kv_s + layers_s + fixed_s
    effective = weights / weight_s / 1e9
    kernel = {"fp32": "fp32 matmul", "bf16": "bf16 matmul",
              "int8": "int8 weights widened to fp32 in every call" if runtime == "torch" else "MatMulNBits, 8 bits",
              "int4": "int4 weights widened to fp32 in every call" if runtime == "torch"
              else f"MatMulNBits, 4 bits in groups of {layout.group}"}
    explanation = [
        f"runtime: {runtime} ({'what --runtime auto runs' if runtime == _auto(spec, precision, profile) else 'asked'}"
        f" for {precision} weights here); speeds and costs below are measured on its engine",
        _weights_line(spec, precision, layout, weights, resident)
        + (f"; on onnxruntime the session holds its own copy, {session / 1e6:.0f} MB, and kiln lets its own go "
           "before the session loads (the peak counts whichever is larger: kiln's copy while loading, or the "
           "session's with the cache and activations)" if session else ""),
        f"KV cache: {concurrency} x {context} tokens x {kv_per_token:,} B/token ({spec.num_layers} layers x "
        f"{spec.num_kv_heads} KV heads x {spec.head_dim} x 2 (K and V) x {memory.kv_bytes_per_element(precision)} B)"
        + (f"; onnxruntime holds {kv / 1e6:.0f} MB: each sequence's keys and values once, fp32, in buffers with "
           "room for up to a quarter more tokens" if runtime == "onnxruntime" else ""),
        f"activations: one {memory.ENGINE_CHUNK}-token prefill chunk, one layer's attention over every sequence, "
        "the logits",
        f"runtime memory: kiln, torch and a tokenizer, {profile.runtime_bytes / 1e6:.0f} MB measured",
        f"decode step at batch {concurrency}, {context} tokens of context: {weights / 1e6:.0f} MB of weights "
        f"streamed at {effective:.1f} GB/s effective ({100 * effective / profile.read_bandwidth_gbs:.0f}% of the "
        f"{profile.read_bandwidth_gbs:.1f} GB/s read bandwidth, {kernel[precision]}"
        + (f"; the {layout.head} head's {layout.head_bytes / 1e6:.0f} MB at its own kernel's rate"
           if layout.mixed and layout.head_bytes and profile.has(head_key) else "")
        + f") = {1000 * weight_s:.1f} ms, "
        + (f"+ float int4 offsets split off {matrices} matrices ({offsets / 1e6:.0f} MB, a small matmul and an add "
           f"each, measured) {1000 * split_s:.1f} ms, " if split_s else "")
        + f"+ attention reading {kv_read / 1e6:.0f} MB of cached keys and values"
        + (" (once per query head on onnxruntime)" if runtime == "onnxruntime" else "") + f" {1000 * kv_s:.1f} ms, "
        f"+ {spec.num_layers} layers x {1e3 * profile.overhead(key, concurrency):.3f} ms and "
        f"{1e3 * fixed_s:.1f} ms per step of engine work (measured on probe models) = {1000 * step_s:.1f} ms",
        f"prefill of {prompt} tokens: {spec.matmul_flops_per_token(prompt // 2) / 1e9:.3f} GFLOP/token at "
        f"{profile.prefill_gflops[key]:.0f} GFLOP/s ({kernel[precision]}, measured) x "
        f"{profile.prefill_efficiency[key]:.2f} (the share a whole prefill reached on a probe model)",
    ]
    held = session + kv + activations if session else resident + kv + activations
    return Plan(
        precision=precision, runtime=runtime, context=context, concurrency=concurrency,
        weights_bytes=session or resident, kv_cache_bytes=kv, activations_bytes=activations,
        runtime_bytes=profile.runtime_bytes, total_bytes=max(resident, held) + profile.runtime_bytes,
        prefill_tokens_per_s=prompt / prefill_s, decode_tokens_per_s=1 / step_s,
        total_decode_tokens_per_s=concurrency / step_s, explanation=explanation,
    )


def _weights_line(spec: ModelSpec, precision: PlanPrecision, layout: Layout, weights: int, resident: int) -> str:
    if layout.stored_bytes:
        return (f"weights: the artifact's tensors as loaded, {resident / 1e6:.0f} MB: layers {layout.layers}"
                + (f" in groups of {layout.group}" if layout.layers == "int4" else "")
                + f", lm_head {layout.head}"
                + (f"; the untied embedding table ({layout.lookup_bytes / 1e6:.0f} MB) is read a row per token"
                   if layout.lookup_bytes else ""))
    return (f"weights: {spec.num_parameters / 1e6:.1f}M parameters x {memory.bytes_per_weight(precision):g} B"
            + (" + one fp32 scale per output row" if precision == "int8" else "")
            + (f" + {resident - weights:,} B for the tied head's packed copy" if resident > weights else ""))


def _auto(spec: ModelSpec, precision: PlanPrecision, profile: MachineProfile) -> str:
    return resolve_runtime(spec, precision, "auto", profile)


def for_class(spec: ModelSpec, precision: PlanPrecision, context: int, concurrency: int,
              hw: HardwareClass, profile: MachineProfile) -> tuple[float, bool]:
    """(total decode tok/s, fits in memory) on a nominal hardware class, with this machine's efficiency
    (of the runtime `--runtime auto` would pick here)."""
    dtype = _compute_dtype(precision)
    key = engine_key(_auto(spec, precision, profile), precision)
    efficiency = 1 / (profile.per_byte(key, concurrency) * profile.read_bandwidth_gbs * 1e9)
    weights = memory.weights_bytes(spec, precision)
    weight_s = weights / (hw.bandwidth_gbs * 1e9 * efficiency)
    compute_s = concurrency * spec.matmul_flops_per_token(context // 2) / (hw.gflops[dtype] * 1e9)
    step_s = max(weight_s, compute_s) + spec.num_layers * hw.layer_overhead_s
    total = (weights + memory.packed_head_bytes(spec, precision)
             + memory.kv_cache_bytes(spec, precision, context, concurrency) + profile.runtime_bytes)
    return concurrency / step_s, total <= hw.memory_gib * 2**30


def recommend(spec: ModelSpec, context: int, concurrency: int, target: float,
              profile: MachineProfile) -> list[str]:
    """For this machine (with `--runtime auto`) and each hardware class, the highest precision that meets
    `target` tok/s in total."""
    plans = [estimate(spec, p, context, concurrency, profile) for p in PRECISIONS]
    ok = [pl for pl in plans if pl.total_decode_tokens_per_s >= target]
    best = max(plans, key=lambda pl: pl.total_decode_tokens_per_s)
    lines = [f"this machine: {ok[0].precision} on {ok[0].runtime} (~{ok[0].total_decode_tokens_per_s:.0f} tok/s)"
             if ok else f"this machine: does not meet it (best: {best.precision} on {best.runtime}, "
                        f"~{best.total_decode_tokens_per_s:.0f} tok/s)"]
    for hw in HARDWARE_CLASSES:
        meets = [(p, speed) for p in PRECISIONS
                 for speed, fits in [for_class(spec, p, context, concurrency, hw, profile)] if fits and speed >= target]
        lines.append(f"{hw.name}: " + (f"{meets[0][0]} (~{meets[0][1]:.0f} tok/s, nominal)" if meets
                                       else "does not meet it"))
    return lines
