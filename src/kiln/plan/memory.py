"""Memory a model needs to serve: weights at a precision, KV cache, activations (no weights loaded).

Bytes per weight follow kiln's formats: fp32 4, bf16 2, int8 1 plus one fp32 scale per output row,
int4 0.5 plus an fp32 scale and zero per group of 128 inputs. The KV cache is kept in the compute
dtype: bf16 for bf16, fp32 otherwise.
"""

from __future__ import annotations

from typing import Literal

from kiln import settings
from kiln.model.spec import ModelSpec, int8_block

PlanPrecision = Literal["fp32", "bf16", "int8", "int4"]
PRECISIONS: tuple[PlanPrecision, ...] = ("fp32", "bf16", "int8", "int4")
INT4_GROUP = 128
ENGINE_CHUNK = 256  # prompt tokens the engine prefills per step, over all sequences (max_batch_tokens)


def bytes_per_weight(precision: PlanPrecision) -> float:
    return {"fp32": 4.0, "bf16": 2.0, "int8": 1.0, "int4": 0.5 + 8.0 / INT4_GROUP}[precision]


def kv_bytes_per_element(precision: PlanPrecision) -> int:
    return 2 if precision == "bf16" else 4


def weights_bytes(spec: ModelSpec, precision: PlanPrecision) -> int:
    """All weights; int8 adds one fp32 scale per output row of each matrix."""
    total = spec.num_parameters * bytes_per_weight(precision)
    if precision == "int8":
        rows = spec.num_layers * (spec.head_dim * (spec.num_heads + 2 * spec.num_kv_heads) + spec.hidden_size
                                  + 2 * spec.intermediate_size + spec.hidden_size) + spec.vocab_size
        total += 4 * rows
    return int(total)


def packed_head_bytes(spec: ModelSpec, precision: PlanPrecision) -> int:
    """A bf16 model with a head tied to its embedding holds a second, packed copy of that matrix for
    oneDNN's matmul (kiln.model.packed), since the embedding lookup still needs the plain one."""
    return spec.vocab_size * spec.hidden_size * 2 if precision == "bf16" and spec.tie_embeddings else 0


def onnx_session_bytes(spec: ModelSpec, precision: PlanPrecision) -> int:
    """The onnxruntime session's own copy of the weights (kiln drops its own before the session loads:
    engine/onnx_runtime.pick_runtime's keep_weights), as ONNX Runtime holds it once built.

    MatMulNBits repacks its blocks with one fp32 sum per block for its int8-activation kernels (4 B per
    block more; int8 exports also store a scale per block of int8_block(spec) rather than per row). The
    embedding lookup of a tied model: fp32 exports read it through a Transpose of the head's matrix,
    which the session folds into a second fp32 table; int8 exports keep it as an fp32 table of its own;
    int4 exports read the head's int4 blocks, whose reshape the session also folds into a copy. Measured
    on the default model's exports (session's anonymous memory with and without prepacking): fp32 626
    MiB for 515 MiB of weights on disk, int4 in groups of 32 115 MiB for 83.
    """
    lookup = spec.vocab_size * spec.hidden_size
    tied = spec.tie_embeddings
    extra = 0.0
    if precision == "fp32" and tied:
        extra = lookup * 4.0
    elif precision == "int8":
        extra = lookup * (4.0 if tied else 4.0 - bytes_per_weight(precision))
        extra += spec.num_parameters * 8.0 / int8_block(spec)  # block scales and block sums
    elif precision == "int4":
        # block sums take the place of the zero points weights_bytes counts (the exports are symmetric)
        extra = lookup * 0.5 if tied else 0.0
        if settings.ort_prefill_graph():
            # the prefill graph's session holds the int4 blocks again, repacked for fp32 activations
            # (artifact/onnx_export.write_prefill_graph; 82 MB resident for the default model's 86 MB export)
            extra += weights_bytes(spec, precision)
    return weights_bytes(spec, precision) + int(extra)


def kv_cache_bytes(spec: ModelSpec, precision: PlanPrecision, context: int, concurrency: int) -> int:
    return spec.kv_bytes_per_token(kv_bytes_per_element(precision)) * context * concurrency


def onnx_kv_cache_bytes(spec: ModelSpec, context: int, concurrency: int) -> int:
    """Keys and values the onnxruntime runtime holds (fp32; engine/onnx_runtime.py): each sequence's
    once, in its own buffer or in the batch buffer of the sequences decoding together, with room for up
    to a quarter more tokens than it has (kv_capacity)."""
    from kiln.engine.onnx_runtime import kv_capacity

    return spec.kv_bytes_per_token(4) * concurrency * kv_capacity(context)


def activations_bytes(spec: ModelSpec, precision: PlanPrecision, context: int, concurrency: int) -> int:
    """Peak transient memory of the engine's step: one prefill chunk, one layer's attention, the logits.

    The engine prefills at most ENGINE_CHUNK prompt tokens per step over all sequences. Per token of
    that chunk: the residual stream and norm outputs (4 x hidden), q/k/v (all heads), the MLP's fused
    gate/up and product (3 x intermediate). Attention gathers one layer's keys and values of every
    sequence from the paged cache and scores the chunk against them (fp32); fp32 logits per sequence.
    """
    elem = 2 if precision == "bf16" else 4
    tokens = min(ENGINE_CHUNK, context * concurrency)
    qkv = spec.head_dim * (spec.num_heads + 2 * spec.num_kv_heads)
    per_token = (4 * spec.hidden_size + qkv + 3 * spec.intermediate_size) * elem
    gathered = concurrency * context * spec.num_kv_heads * spec.head_dim * 2 * elem
    scores = spec.num_heads * tokens * context * 4
    logits = concurrency * spec.vocab_size * 4
    return int(tokens * per_token + gathered + scores + logits)
