"""The onnxruntime part of the machine profile: its timing graphs compute what kiln's exports compute."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.plan import onnx_profile

ort = pytest.importorskip("onnxruntime")


def run_graph(precision: str, x: np.ndarray, group: int = onnx_profile.INT4_GROUP,
              split_offsets: bool = False) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    import onnx
    from onnx import numpy_helper

    from kiln.engine.onnx_runtime import session_options

    graph, nbytes = onnx_profile._stream_graph(precision, [(64, 256)], group=group, split_offsets=split_offsets)
    model = onnx.load_from_string(graph)
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    # kiln's options: once any session of the process used the shared thread pool, every one must
    session = ort.InferenceSession(graph, session_options(), providers=["CPUExecutionProvider"])
    # the bytes a step streams: the matrices (and offsets), not the group sums' two shape constants
    assert nbytes == sum(w.nbytes for name, w in weights.items() if "kiln_group" not in name)
    return session.run(None, {"x256": x[None]})[0][0], weights


def int4_dense(weights: dict[str, np.ndarray], block: int) -> np.ndarray:
    codes = np.stack([weights["w0"] & 0x0F, weights["w0"] >> 4], axis=-1).reshape(64, -1)
    return ((codes.astype(np.float32) - 8) * np.repeat(weights["s0"], block, axis=1)).T


@pytest.mark.parametrize(("precision", "group"), [("fp32", 0), ("int8", 0), ("int4", 128), ("int4", 32)])
def test_timing_graphs_multiply_by_their_weights(precision: str, group: int) -> None:
    x = np.random.default_rng(1).standard_normal((3, 256)).astype(np.float32)
    y, weights = run_graph(precision, x, group or onnx_profile.INT4_GROUP)
    if precision == "fp32":
        dense = weights["w0"]
    else:  # MatMulNBits without zero points: codes centred on 8 (4 bits) or 128 (8 bits), one scale per block
        if precision == "int4":
            assert weights["s0"].shape == (64, 256 // group)
            dense = int4_dense(weights, group)
        else:
            codes, block = weights["w0"].reshape(64, -1), onnx_profile.INT8_BLOCK
            dense = ((codes.astype(np.float32) - 128) * np.repeat(weights["s0"], block, axis=1)).T
    expected = x @ dense
    # int8 / int4 round the activations to int8 first (accuracy level 4, as the exports run)
    assert np.abs(y - expected).max() <= 0.02 * np.abs(expected).max()


def test_the_split_offsets_graph_adds_each_groups_offset_times_its_sum() -> None:
    """The graph `kiln plan --calibrate` times float offsets with computes what the export's split does:
    (q - 8) * s per group plus the group's offset times the sum of its inputs."""
    x = np.random.default_rng(2).standard_normal((3, 256)).astype(np.float32)
    y, weights = run_graph("int4", x, group=32, split_offsets=True)
    offsets = weights["o0/kiln_offsets"]  # [groups, N]
    assert offsets.shape == (256 // 32, 64)
    expected = x @ int4_dense(weights, 32) + x.reshape(3, -1, 32).sum(-1) @ offsets
    assert np.abs(y - expected).max() <= 0.02 * np.abs(expected).max()
    assert np.abs(y - x @ int4_dense(weights, 32)).max() > 0.1 * np.abs(expected).max()  # the offsets count


def test_int4_prompts_are_timed_on_the_8_bit_blocks_the_prefill_graph_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    # an int4 export's prompts run on its prefill graph, whose layers are widened to 8-bit blocks
    # (artifact/onnx_export.write_prefill_graph); the profile's int4 prefill rate must be that graph's
    built: list[tuple[str, int]] = []

    def graph(precision: str, shapes: list[tuple[int, int]], accuracy_level: int = 4, group: int = 128,
              split_offsets: bool = False) -> tuple[bytes, int]:
        built.append((precision, accuracy_level))
        return b"", 1

    monkeypatch.setattr(onnx_profile, "_stream_graph", graph)
    monkeypatch.setattr(onnx_profile, "_session", lambda graph: None)
    monkeypatch.setattr(onnx_profile, "_timed", lambda run, shapes, rows: 1.0)
    for precision, prompts in (("int4", "int8"), ("int8", "int8"), ("fp32", "fp32")):
        built.clear()
        onnx_profile._streamed(precision)
        assert built == [(precision, 4), (prompts, 4)]  # streamed at batch sizes, then the prompt shape
