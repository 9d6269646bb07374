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
PREFILL_CHUNK = 512  # kiln prefills long prompts in chunks of this many tokens


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


def kv_cache_bytes(spec: ModelSpec, precision: PlanPrecision, context: int, concurrency: int) -> int:
    return spec.kv_bytes_per_token(kv_bytes_per_element(precision)) * context * concurrency


def activations_bytes(spec: ModelSpec, precision: PlanPrecision, context: int, concurrency: int) -> int:
    """Peak transient memory of one prefill chunk per sequence, plus the decode logits.

    Per token of a chunk: the residual stream and norm outputs (4 x hidden), q/k/v (all heads), the
    MLP's fused gate/up and product (3 x intermediate); the boolean attention mask over the context
    (the attention kernel works in blocks, so scores are never whole); fp32 logits of the last token.
    """
    elem = 2 if precision == "bf16" else 4
    tokens = min(PREFILL_CHUNK, context)
    qkv = spec.head_dim * (spec.num_heads + 2 * spec.num_kv_heads)
    per_token = (4 * spec.hidden_size + qkv + 3 * spec.intermediate_size) * elem
    mask = tokens * context
    logits = spec.vocab_size * 4
    return int(concurrency * (tokens * per_token + mask + logits))
