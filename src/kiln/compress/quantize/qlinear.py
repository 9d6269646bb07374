"""Linear layers that hold compressed weights, swapped into the graph in place of nn.Linear.

Each has two verbs (as in gpt-fast): a class method that makes the compressed weights from a float
layer, and a forward. Each also lists the tensors it stores (`tensors()`) and rebuilds from them
(`from_tensors`), which is all the artifact format needs. The forwards here widen the weights to the
activation dtype (correct everywhere); kiln.runtime swaps in packed kernels where they are faster.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kiln.benchmark.machine import available_bytes
from kiln.compress.quantize import grid


class Int8Linear(nn.Module):
    """Weight-only int8, one fp32 scale per output channel."""

    kind = "int8"
    qweight: Tensor
    scales: Tensor

    def __init__(self, qweight: Tensor, scales: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.register_buffer("qweight", qweight)  # [out, in] int8
        self.register_buffer("scales", scales)  # [out] fp32
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.in_features, self.out_features = qweight.shape[1], qweight.shape[0]
        self.wide: Tensor | None = None  # qweight widened to fp32, kept only inside `widened()`

    @classmethod
    def from_float(cls, layer: nn.Linear, weight: Tensor | None = None) -> Int8Linear:
        q, s = grid.quantize_int8(layer.weight.detach() if weight is None else weight)
        return cls(q, s, None if layer.bias is None else layer.bias.detach().float())

    def forward(self, x: Tensor) -> Tensor:
        wide = self.wide if self.wide is not None and self.wide.dtype == x.dtype else self.qweight.to(x.dtype)
        y = F.linear(x, wide) * self.scales.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def widen(self) -> Tensor:
        return self.qweight.float()

    def dequantized(self) -> Tensor:
        return grid.dequantize_int8(self.qweight, self.scales)

    def rows(self, ids: Tensor) -> Tensor:
        return self.qweight[ids].float() * self.scales[ids].unsqueeze(-1)

    def tensors(self) -> dict[str, Tensor]:
        out = {"qweight": self.qweight, "scales": self.scales}
        return out if self.bias is None else {**out, "bias": self.bias.data}

    def meta(self) -> dict[str, Any]:
        return {"format": self.kind, "shape": [self.out_features, self.in_features]}

    @classmethod
    def from_tensors(cls, t: dict[str, Tensor], meta: dict[str, Any]) -> Int8Linear:
        return cls(t["qweight"], t["scales"], t.get("bias"))


class Int4Linear(nn.Module):
    """Weight-only int4 in groups of inputs, a scale and an offset per group, packed two per byte."""

    kind = "int4"
    qweight: Tensor
    scales: Tensor
    offsets: Tensor

    def __init__(self, weight: grid.Int4Weight, bias: Tensor | None) -> None:
        super().__init__()
        self.register_buffer("qweight", grid.pack_int4(weight.q))  # [out, in_padded / 2] uint8
        self.register_buffer("scales", weight.scales.float())  # [out, groups]
        self.register_buffer("offsets", weight.offsets.float())  # [out, groups]: w = q * scale + offset
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.group_size, self.in_features, self.out_features = weight.group_size, weight.in_features, weight.q.shape[0]
        self.wide: Tensor | None = None  # the dequantized fp32 matrix, kept only inside `widened()`

    @classmethod
    def from_float(cls, layer: nn.Linear, group_size: int, symmetric: bool,
                   weight: grid.Int4Weight | None = None, *, integer_zero: bool = False) -> Int4Linear:
        w = weight or grid.quantize_int4(layer.weight.detach(), group_size, symmetric, integer_zero=integer_zero)
        return cls(w, None if layer.bias is None else layer.bias.detach().float())

    def unpacked(self) -> grid.Int4Weight:
        return grid.Int4Weight(grid.unpack_int4(self.qweight), self.scales, self.offsets, self.group_size,
                               self.in_features)

    def dequantized(self) -> Tensor:
        return self.unpacked().dequantize()

    def rows(self, ids: Tensor) -> Tensor:
        flat = ids.reshape(-1)
        picked = grid.Int4Weight(grid.unpack_int4(self.qweight[flat]), self.scales[flat], self.offsets[flat],
                                 self.group_size, self.in_features)
        return picked.dequantize().view(*ids.shape, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        wide = self.wide if self.wide is not None and self.wide.dtype == x.dtype else self.dequantized().to(x.dtype)
        y = F.linear(x, wide)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    widen = dequantized  # the matrix widened() keeps: what forward builds at fp32

    def tensors(self) -> dict[str, Tensor]:
        out = {"qweight": self.qweight, "scales": self.scales, "offsets": self.offsets}
        return out if self.bias is None else {**out, "bias": self.bias.data}

    def meta(self) -> dict[str, Any]:
        return {"format": self.kind, "shape": [self.out_features, self.in_features], "group_size": self.group_size}

    @classmethod
    def from_tensors(cls, t: dict[str, Tensor], meta: dict[str, Any]) -> Int4Linear:
        out, in_features = meta["shape"]
        weight = grid.Int4Weight(grid.unpack_int4(t["qweight"]), t["scales"], t["offsets"], int(meta["group_size"]),
                                 int(in_features))
        return cls(weight, t.get("bias"))


class W8A8Linear(nn.Module):
    """int8 weights and int8 activations quantized per token at run time; a real int8 matmul.

    An optional per-input `smooth` factor divides the activations first (SmoothQuant, arXiv 2211.10438)
    where it could not be folded into a preceding norm.
    """

    kind = "w8a8"
    qweight_t: Tensor
    scales: Tensor
    smooth: Tensor | None

    def __init__(self, qweight: Tensor, scales: Tensor, bias: Tensor | None, smooth: Tensor | None) -> None:
        super().__init__()
        self.register_buffer("qweight_t", qweight.t().contiguous())  # [in, out] int8, the layout _int_mm takes
        self.register_buffer("scales", scales)  # [out] fp32
        self.register_buffer("smooth", smooth)  # [in] fp32 or None
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.in_features, self.out_features = qweight.shape[1], qweight.shape[0]

    @classmethod
    def from_float(cls, layer: nn.Linear, weight: Tensor | None = None, smooth: Tensor | None = None) -> W8A8Linear:
        q, s = grid.quantize_int8(layer.weight.detach() if weight is None else weight)
        return cls(q, s, None if layer.bias is None else layer.bias.detach().float(), smooth)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        if self.smooth is not None:
            x2 = x2 / self.smooth
        x_scale = (x2.abs().amax(dim=1, keepdim=True) / 127).clamp(min=1e-10)  # per token
        xq = torch.round(x2 / x_scale).clamp(-127, 127).to(torch.int8)
        rows = xq.shape[0]
        if rows <= 16:  # _int_mm wants more than 16 rows on some backends: pad, then drop the padding
            xq = F.pad(xq, (0, 0, 0, 17 - rows))
        acc = torch._int_mm(xq, self.qweight_t)[:rows]  # [tokens, out] int32
        y = acc.float() * x_scale * self.scales
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def dequantized(self) -> Tensor:
        w = grid.dequantize_int8(self.qweight_t.t(), self.scales)
        return w if self.smooth is None else w / self.smooth

    def tensors(self) -> dict[str, Tensor]:
        out = {"qweight": self.qweight_t.t().contiguous(), "scales": self.scales}
        if self.smooth is not None:
            out["smooth"] = self.smooth
        return out if self.bias is None else {**out, "bias": self.bias.data}

    def meta(self) -> dict[str, Any]:
        return {"format": self.kind, "shape": [self.out_features, self.in_features]}

    @classmethod
    def from_tensors(cls, t: dict[str, Tensor], meta: dict[str, Any]) -> W8A8Linear:
        return cls(t["qweight"], t["scales"], t.get("bias"), t.get("smooth"))


class LowRankLinear(nn.Module):
    """W ~ B A with A [rank, in] and B [out, rank]: two thin matmuls instead of one wide one."""

    kind = "lowrank"

    def __init__(self, a: Tensor, b: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.a = nn.Parameter(a, requires_grad=False)
        self.b = nn.Parameter(b, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.in_features, self.out_features, self.rank = a.shape[1], b.shape[0], a.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.linear(x, self.a), self.b, self.bias)

    def dequantized(self) -> Tensor:
        return self.b.float() @ self.a.float()

    def tensors(self) -> dict[str, Tensor]:
        out = {"a": self.a.data, "b": self.b.data}
        return out if self.bias is None else {**out, "bias": self.bias.data}

    def meta(self) -> dict[str, Any]:
        return {"format": self.kind, "shape": [self.out_features, self.in_features], "rank": self.rank}

    @classmethod
    def from_tensors(cls, t: dict[str, Tensor], meta: dict[str, Any]) -> LowRankLinear:
        return cls(t["a"], t["b"], t.get("bias"))


class QuantEmbedding(nn.Module):
    """The input embedding of a tied model whose lm_head is quantized: looks up dequantized head rows."""

    def __init__(self, head: Int8Linear | Int4Linear) -> None:
        super().__init__()
        self.head = [head]  # a plain list: the head is registered once, under lm_head

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head[0].rows(tokens)


CompressedLinear = Int8Linear | Int4Linear | W8A8Linear | LowRankLinear
LAYER_KINDS: dict[str, type[CompressedLinear]] = {
    cls.kind: cls for cls in (Int8Linear, Int4Linear, W8A8Linear, LowRankLinear)
}


@contextmanager
def widened(model: nn.Module, share: float = 0.5) -> Iterator[bool]:
    """Keep each int8 / int4 weight-only layer's fp32 matrix while the block runs; yields whether it did.

    The forwards above widen their integers on every call, which costs little next to a long prompt's
    matmuls but dominates a decode step: an evaluation's generation tasks ran an int4 artifact 2.4x slower
    than the fp32 model. The kept matrix is the one each call would build, so results are identical; it
    takes fp32 memory, so nothing is kept when that exceeds `share` of the memory available now.
    """
    layers = [m for m in model.modules() if isinstance(m, (Int8Linear, Int4Linear))]
    need = sum(4 * m.in_features * m.out_features for m in layers)
    keep = bool(layers) and need <= share * available_bytes()  # 0 where unknown: nothing kept
    try:
        if keep:
            for m in layers:
                m.wide = m.widen()
        yield keep
    finally:
        for m in layers:
            m.wide = None
