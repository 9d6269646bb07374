"""The onnxruntime part of the machine profile: its timing graphs compute what kiln's exports compute."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.plan import onnx_profile

ort = pytest.importorskip("onnxruntime")


def run_graph(precision: str, x: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    import onnx
    from onnx import numpy_helper

    from kiln.engine.onnx_runtime import session_options

    graph, nbytes = onnx_profile._stream_graph(precision, [(64, 256)])
    model = onnx.load_from_string(graph)
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    # kiln's options: once any session of the process used the shared thread pool, every one must
    session = ort.InferenceSession(graph, session_options(), providers=["CPUExecutionProvider"])
    assert nbytes == sum(w.nbytes for w in weights.values())
    return session.run(None, {"x256": x})[0], weights


@pytest.mark.parametrize("precision", ["fp32", "int8", "int4"])
def test_timing_graphs_multiply_by_their_weights(precision: str) -> None:
    x = np.random.default_rng(1).standard_normal((3, 256)).astype(np.float32)
    y, weights = run_graph(precision, x)
    if precision == "fp32":
        dense = weights["w0"]
    else:  # MatMulNBits without zero points: codes centred on 8 (4 bits) or 128 (8 bits), one scale per block
        codes, scales = weights["w0"], weights["s0"]
        if precision == "int4":
            codes = np.stack([codes & 0x0F, codes >> 4], axis=-1).reshape(64, -1)
            block, zero = onnx_profile.INT4_GROUP, 8
        else:
            codes, block, zero = codes.reshape(64, -1), onnx_profile.INT8_BLOCK, 128
        dense = ((codes.astype(np.float32) - zero) * np.repeat(scales, block, axis=1)).T
    expected = x @ dense
    # int8 / int4 round the activations to int8 first (accuracy level 4, as the exports run)
    assert np.abs(y - expected).max() <= 0.02 * np.abs(expected).max()
