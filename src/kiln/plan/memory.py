"""Memory a model needs to serve: weights at a precision, KV cache, activations (no weights loaded).

Bytes per weight follow kiln's formats: fp32 4, bf16 2, int8 1 plus one fp32 scale per output row,
int4 0.5 plus an fp32 scale and zero per group of 128 inputs. The KV cache is kept in the compute
dtype: bf16 for bf16, fp32 otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass(frozen=True)
class Layout:
    """What each part of the weights is stored as. A plan for a precision stores all of them at it; an
    artifact is priced by its own tensors: `kiln compress` keeps an fp32 lm_head beside int8 or int4
    layers unless told otherwise (keep_embeddings), and its int4 groups need not be of 128."""

    layers: PlanPrecision  # the decoder layers' matrices; the machine profile's costs are this format's
    head: PlanPrecision  # lm_head (the embedding's matrix too where the model ties them)
    group: int = INT4_GROUP  # int4 group size
    shared_lookup: bool = True  # onnxruntime's lookup reads a quantized tied head's codes, not an fp32 table
    stored_bytes: int = 0  # an artifact's tensors as the torch runtime holds them (sparse ones dense); 0: none
    lookup_bytes: int = 0  # of those, an untied embedding table: a lookup reads a row, a decode step not all
    head_bytes: int = 0  # of those, lm_head's (or the tied embedding's), which a decode step reads at its own rate
    float_offsets: bool = False  # int4 groups with Q4_1's float offsets, which onnxruntime runs split off

    @classmethod
    def uniform(cls, precision: PlanPrecision) -> Layout:
        return cls(precision, precision, shared_lookup=precision == "int4")

    @property
    def mixed(self) -> bool:
        return self.head != self.layers


def streamed_bytes(spec: ModelSpec, layout: Layout) -> int:
    """Weight bytes one decode step reads: every matrix (and the tied head), not the lookup table."""
    if layout.stored_bytes:
        return layout.stored_bytes - layout.lookup_bytes
    return weights_bytes(spec, layout.layers)


def resident_bytes(spec: ModelSpec, layout: Layout) -> int:
    """Weight bytes the torch runtime holds."""
    if layout.stored_bytes:
        return layout.stored_bytes
    return weights_bytes(spec, layout.layers) + packed_head_bytes(spec, layout.layers)


def split_offsets(spec: ModelSpec, layout: Layout) -> tuple[int, int]:
    """(int4 matrices, bytes of their fp32 offsets) that the onnxruntime export splits float offsets off
    (artifact/onnx_export.py): five a layer (q/k/v, o, gate, up, down) and an int4 head, one offset per
    group of each row."""
    if not layout.float_offsets:
        return 0, 0
    table = spec.vocab_size * spec.hidden_size
    params = spec.num_parameters - table * (1 if spec.tie_embeddings else 2)
    head = layout.head == "int4"
    return 5 * spec.num_layers + head, int(4 * (params + (table if head else 0)) / layout.group)


def _onnx_matrix_bytes(spec: ModelSpec, precision: PlanPrecision, params: int, group: int) -> float:
    """A matrix in the onnxruntime session: fp32 as is; MatMulNBits blocks with one fp32 scale and one fp32
    sum per block (the sum, for its int8-activation kernels, takes the place of an int4 zero point)."""
    if precision == "int8":
        return params * (1.0 + 8.0 / int8_block(spec))
    if precision == "int4":
        return params * (0.5 + 8.0 / group)
    return params * 4.0


def onnx_session_bytes(spec: ModelSpec, layout: Layout | PlanPrecision) -> int:
    """The onnxruntime session's own copy of the weights (kiln drops its own before the session loads:
    engine/onnx_runtime.pick_runtime's keep_weights), as ONNX Runtime holds it once built: the layers' and
    the head's matrices at their formats (artifact/onnx_export.plan_for), and the embedding lookup.

    The lookup of a tied model: an fp32 head is read through a Transpose, which the session folds into
    a second fp32 table; an int8 head in an int8 export leaves the lookup an fp32 table of its own; a
    shared int4 (or int8) head's codes are read through a reshape, which the session also folds into a
    copy. An untied embedding stays an fp32 table. Measured on the default model's exports (session's
    anonymous memory with and without prepacking): fp32 626 MiB for 515 MiB of weights on disk, int4
    in groups of 32 115 MiB for 83.
    """
    if isinstance(layout, str):
        layout = Layout.uniform(layout)
    table = spec.vocab_size * spec.hidden_size
    layer_params = spec.num_parameters - table * (1 if spec.tie_embeddings else 2)
    layers = _onnx_matrix_bytes(spec, layout.layers, layer_params, layout.group)
    matrices = layers + _onnx_matrix_bytes(spec, layout.head, table, layout.group)
    if spec.tie_embeddings and layout.shared_lookup and layout.head in ("int4", "int8"):
        lookup = table * (0.5 if layout.head == "int4" else 1.0)
    else:
        lookup = table * 4.0
    matrices += split_offsets(spec, layout)[1]  # float offsets, split off as an fp32 matrix per int4 matrix
    if layout.layers == "int4" and settings.ort_prefill_graph():
        # the prefill graph's session holds the weights again, its layers widened to 8-bit blocks of the same
        # group size (artifact/onnx_export.write_prefill_graph), its head and offsets as they are
        matrices += matrices - layers + layer_params * (1.0 + 8.0 / layout.group)
    return int(matrices + lookup)


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
