"""The engine: scheduler, paged KV cache, sampler and the runtimes it drives."""

# torch: kiln's graph; torch-compiled: the same with compiled int8 / int4 decode kernels (engine/compiled.py);
# onnxruntime: an ONNX export of the model (engine/onnx_runtime.py)
RUNTIMES = ("torch", "torch-compiled", "onnxruntime")
RUNTIME_HELP = ("onnxruntime: run an ONNX export of the model (built once and cached); torch-compiled: kiln's "
                "graph with compiled int8 / int4 decode kernels (compiled once, cached on disk)")
