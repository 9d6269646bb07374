"""Memory a model needs to serve: weights at a precision, KV cache, activations (no weights loaded).

Bytes per weight follow kiln's formats: fp32 4, bf16 2, int8 1 plus one fp32 scale per output row,
int4 0.5 plus an fp32 scale and zero per group of 128 inputs. The KV cache is kept in the compute
dtype: bf16 for bf16, fp32 otherwise.
"""

from __future__ import annotations

from typing import Literal

from kiln.model.spec import ModelSpec

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
    engine/onnx_runtime.pick_runtime's keep_weights). An int8 export keeps the embedding lookup as an fp32 table
    (a tied head's int8 copy serves the matmul); fp32 exports share one table, int4 exports read the
    lookup from the head's int4 blocks."""
    lookup = spec.vocab_size * spec.hidden_size
    extra = 0.0
    if precision == "int8":
        extra = lookup * (4.0 if spec.tie_embeddings else 4.0 - bytes_per_weight(precision))
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
