"""The engine: scheduler, paged KV cache, sampler and the runtimes it drives."""

# auto: onnxruntime for fp32 models and int8 / int4 weight-only artifacts, torch for the rest
# (engine/onnx_runtime.py, pick_runtime); torch: kiln's graph; torch-compiled: the same with compiled
# int8 / int4 decode kernels (engine/compiled.py); onnxruntime: an ONNX export of the model
RUNTIMES = ("auto", "torch", "torch-compiled", "onnxruntime")
RUNTIME_HELP = ("auto (default): onnxruntime where it takes the model (fp32, int8 / int4 weight-only), torch "
                "otherwise (bf16, --kv-cache int8, W8A8, low-rank); onnxruntime: run an ONNX "
                "export of the model (built once and cached); torch: kiln's own graph; torch-compiled: kiln's graph "
                "with compiled int8 / int4 decode kernels (compiled once, cached on disk)")
