"""The onnxruntime runtime's part of the machine profile (kiln.plan.profile), when ONNX Runtime is installed.

Streamed weights: one ONNX graph per weight format, holding the same small-model matrices as the torch
measurement, timed at each batch size and at prefill shape. The formats are the nodes kiln's exports
use: MatMul over fp32 weights, MatMulNBits over int8 codes in blocks of 64 and int4 codes in groups
of 128, all at accuracy level 4 (activations rounded to int8, as the exports run them); at prefill shape int4 is
timed as int8 blocks, the form the prefill graph of an int4 export widens its layers to. Their codes
are random bytes: a kernel's speed does not depend on the values.

The engine's costs on top of that come from the two probe models (kiln.plan.profile.PROBE) exported as
symmetric int4 with an int4 head, kiln's default compressed form and the one whose weights stream
fastest, so the fitted per-layer, per-step and KV costs are least blurred by the weights' share. The
same graph runs every format on the runtime, so its costs serve fp32 and int8 plans too.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kiln.plan.memory import INT4_GROUP
from kiln.plan.profile import (
    BATCHES,
    PROBE_LAYERS,
    PROBE_PROMPTS,
    ProbeRun,
    best_time,
    engine_key,
    engine_step_s,
    fit_probe,
    prefill_efficiency,
    prefill_seconds,
    probe_attended_bytes,
    probe_model,
    stream_shapes,
)

FORMATS = ("fp32", "int8", "int4")
INT4_GROUPS = (32, 64, 128)  # the group sizes `kiln compress` makes
INT8_BLOCK = 64  # the int8 timing graphs' block: what int8_block picks where the sizes divide by it
PREFILL_ROWS = 512


def available() -> bool:
    try:
        import onnxruntime  # noqa: F401
        import onnxruntime_genai  # noqa: F401  (the exporter's builder)
    except ImportError:
        return False
    return True


def _stream_graph(precision: str, shapes: list[tuple[int, int]], accuracy_level: int = 4,
                  group: int = INT4_GROUP, split_offsets: bool = False) -> tuple[bytes, int]:
    """(a serialized graph of one matmul per [out, in] shape over `precision` weights, the weights' bytes).

    int4 comes in groups of `group`; with `split_offsets` each matrix has float offsets split off as the
    export does for Q4_1-style artifacts (artifact/onnx_export.group_offset_nodes), and the bytes count the
    offsets too."""
    from onnx import TensorProto, helper, numpy_helper

    from kiln.artifact.onnx_export import group_offset_nodes

    rng = np.random.default_rng(0)
    # inputs are [1, rows, K], as the exports' [batch, positions, K], which the group sums reshape
    inputs = {cols: helper.make_tensor_value_info(f"x{cols}", TensorProto.FLOAT, [1, "rows", cols])
              for _, cols in shapes}
    nodes, weights, outputs, total = [], [], [], 0
    for i, (rows, cols) in enumerate(shapes):
        tensors: list[np.ndarray]
        if precision == "fp32":
            tensors = [rng.standard_normal((cols, rows), dtype=np.float32)]
            nodes.append(helper.make_node("MatMul", [f"x{cols}", f"w{i}"], [f"y{i}"]))
        else:
            bits, block = (8, INT8_BLOCK) if precision == "int8" else (4, group)
            blocks = cols // block
            tensors = [rng.integers(0, 256, (rows, blocks, block * bits // 8), dtype=np.uint8),
                       rng.uniform(0.005, 0.015, (rows, blocks)).astype(np.float32)]
            main = f"m{i}" if split_offsets else f"y{i}"
            nodes.append(helper.make_node("MatMulNBits", [f"x{cols}", f"w{i}", f"s{i}"], [main],
                                          domain="com.microsoft", K=cols, N=rows, bits=bits, block_size=block,
                                          accuracy_level=accuracy_level))
            if split_offsets:
                split, small = group_offset_nodes(f"x{cols}", main, f"y{i}", f"o{i}", cols, block, blocks)
                offsets = rng.uniform(-0.1, 0.1, (blocks, rows)).astype(np.float32)
                nodes += split
                weights += [numpy_helper.from_array(offsets, f"o{i}/kiln_offsets")]
                weights += [numpy_helper.from_array(array, name) for name, array in small.items()]
                total += offsets.nbytes
        weights += [numpy_helper.from_array(t, f"{name}{i}") for t, name in zip(tensors, "ws", strict=False)]
        total += sum(t.nbytes for t in tensors)
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, "rows", rows]))
    graph = helper.make_graph(nodes, "streamed", list(inputs.values()), outputs, weights)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    return model.SerializeToString(), total


def _streamed(precision: str, group: int = INT4_GROUP, prefill: bool = True) -> tuple[dict[str, float], float]:
    """(seconds per weight byte by batch, GFLOP/s at prefill shape, or 0 without `prefill`) of `precision`
    matmuls on ONNX Runtime, int4 in groups of `group`."""
    def session(shapes: list[tuple[int, int]], precision: str = precision) -> tuple[Any, int]:
        graph, total = _stream_graph(precision, shapes, 4, group)
        return _session(graph), total

    # half the torch measurement's matrices: 0.5 GB at fp32 is already far beyond any cache
    shapes = stream_shapes(8)
    streamed, total = session(shapes)
    per_byte = {str(batch): _timed(streamed, shapes, batch) / total for batch in BATCHES}
    del streamed
    if not prefill:
        return per_byte, 0.0
    # a prompt is compute-bound: two layers' matrices, without the head (the engine runs it on one row)
    shapes = stream_shapes(2)[:-1]
    flops = 2 * PREFILL_ROWS * sum(rows * cols for rows, cols in shapes)
    # int4 prompts run on the prefill graph's 8-bit blocks (artifact/onnx_export.write_prefill_graph)
    prompt = session(shapes, "int8" if precision == "int4" else precision)[0]
    return per_byte, flops / _timed(prompt, shapes, PREFILL_ROWS) / 1e9


def _session(graph: bytes) -> Any:
    """An ONNX Runtime session over a timing graph, its weights on huge pages as the runtime's sessions have
    them (engine/hugepages.py)."""
    import onnxruntime as ort

    from kiln.engine.hugepages import with_huge_pages
    from kiln.engine.onnx_runtime import session_options

    return with_huge_pages(lambda: ort.InferenceSession(graph, session_options(),
                                                        providers=["CPUExecutionProvider"]))[0]


def _timed(run: Any, shapes: list[tuple[int, int]], rows: int) -> float:
    feeds = {f"x{cols}": np.random.default_rng(rows).standard_normal((1, rows, cols), dtype=np.float32)
             for _, cols in shapes}
    return best_time(lambda: run.run(None, feeds), 3)


def _split_offsets() -> tuple[dict[str, float], dict[str, float]]:
    """(seconds per matrix, seconds per byte of offsets) by batch that float offsets split off int4 matrices
    add to a decode step (artifact/onnx_export.py: Q4_1-style artifacts run so on onnxruntime).

    Timed as the same int4 matrices with and without their split offsets, in groups of 32 and of 128: the
    offsets' bytes differ fourfold between the two while the nodes stay the same, which separates a cost
    per node group (the sums, the offset term, the add: some microseconds each whatever their size) from
    a cost per byte of offsets read. Noise can push either below zero; it is clipped there."""
    shapes = stream_shapes(4)[:-1]  # the layers' matrices: a head is one matrix of many
    extra: dict[int, dict[int, tuple[float, int]]] = {}  # group -> batch -> (seconds added, offsets' bytes)
    for group in (32, 128):
        runs = {}
        for offsets in (0, group):
            graph, total = _stream_graph("int4", shapes, 4, group, split_offsets=bool(offsets))
            runs[offsets] = (_session(graph), total)
        extra[group] = {}
        for batch in BATCHES:
            # the two graphs' timings alternate, so a slow spell of the machine lands on both
            times = [[_timed(runs[offsets][0], shapes, batch) for offsets in (group, 0)] for _ in range(2)]
            split, plain = (min(pair) for pair in zip(*times, strict=True))
            extra[group][batch] = (split - plain, runs[group][1] - runs[0][1])
    per_matrix, per_byte = {}, {}
    for batch in BATCHES:
        (fine_s, fine_b), (coarse_s, coarse_b) = extra[32][batch], extra[128][batch]
        byte_s = max(0.0, (fine_s - coarse_s) / (fine_b - coarse_b))
        per_byte[str(batch)] = byte_s
        per_matrix[str(batch)] = max(0.0, (coarse_s - coarse_b * byte_s) / len(shapes))
    return per_matrix, per_byte


def _probe_export(layers: int, tokenizer: Any, scratch: Path) -> tuple[Any, int]:
    """(an OnnxModel of the int4 probe with `layers` layers, the bytes of weights a decode step reads)."""
    from kiln.artifact.onnx_export import BuildPlan, export
    from kiln.engine.onnx_runtime import OnnxModel
    from kiln.model.load import LoadedModel, hf_folder, resolve
    from kiln.model.source import ModelSource

    model = probe_model(layers, torch.float32)
    folder = hf_folder(resolve("default"))  # its tokenizer files go into the export; the weights are the probe's
    loaded = LoadedModel(model.spec, model, tokenizer, ModelSource("probe", "hf", folder), folder, "0" * 64, 0.0)
    plan = BuildPlan("int4", INT4_GROUP, symmetric=True, quantize_head=True, tied=model.spec.tie_embeddings)
    out = export(loaded, scratch / f"probe-{layers}", "int4", check=False, plan=plan)
    # the head's int4 blocks serve the embedding lookup too, so every weight in the file streams per step
    return OnnxModel(out, model.spec), sum(f.stat().st_size for f in out.glob("*.onnx.data"))


def measure(tokenizer: Any) -> dict[str, dict[str, Any]]:
    """The profile's fields for the onnxruntime runtime's engine keys (about a minute)."""
    from kiln.engine.threads import use_threads_for

    fields: dict[str, dict[str, Any]] = {name: {} for name in (
        "seconds_per_weight_byte", "prefill_gflops", "prefill_efficiency", "layer_overhead_s", "step_overhead_s",
        "kv_seconds_per_byte", "offset_matrix_s", "offset_seconds_per_byte", "int4_group_seconds_per_byte")}
    for precision in FORMATS:
        key = engine_key("onnxruntime", precision)
        fields["seconds_per_weight_byte"][key], fields["prefill_gflops"][key] = _streamed(precision)
    fields["offset_matrix_s"], fields["offset_seconds_per_byte"] = _split_offsets()
    # MatMulNBits streams int4 in groups of 32 about a fifth slower per byte than in groups of 128 (more
    # scales and block sums per weight): an artifact is priced at its own group's rate
    groups = {str(g): _streamed("int4", g, prefill=False)[0] for g in INT4_GROUPS if g != INT4_GROUP}
    fields["int4_group_seconds_per_byte"] = {**groups, str(INT4_GROUP): fields["seconds_per_weight_byte"][
        engine_key("onnxruntime", "int4")]}
    int4 = engine_key("onnxruntime", "int4")
    with tempfile.TemporaryDirectory(prefix="kiln-plan-") as scratch:
        probes = {layers: _probe_export(layers, tokenizer, Path(scratch)) for layers in PROBE_LAYERS}

        def run(batch: int, layers: int, prompt: int) -> ProbeRun:
            model, weights = probes[layers]
            per_byte = fields["seconds_per_weight_byte"][int4]
            attended = probe_attended_bytes(model.spec, batch, prompt, 4, "onnxruntime")
            stream_s = weights * per_byte[str(batch)]
            return ProbeRun(engine_step_s(model, tokenizer, batch, prompt), stream_s, attended, layers)

        deep = probes[PROBE_LAYERS[0]][0]
        use_threads_for(deep)  # torch samples on one thread beside the session, as the runtime sets it
        try:
            fitted = fit_probe(run)
            seconds = prefill_seconds(deep, tokenizer, PROBE_PROMPTS[1])
        finally:
            use_threads_for(None)
    efficiency = prefill_efficiency(deep.spec, PROBE_PROMPTS[1], seconds, fields["prefill_gflops"][int4])
    for precision in FORMATS:  # one graph and engine for every format: the probe's costs are theirs
        key = engine_key("onnxruntime", precision)
        fields["layer_overhead_s"][key], fields["step_overhead_s"][key], fields["kv_seconds_per_byte"][key] = fitted
        fields["prefill_efficiency"][key] = efficiency
    return fields
