"""Quantization grids: int8 per output channel (symmetric), int4 per group of inputs (symmetric or not).

int8: s = max|w| / 127 per output row, q = round(w / s) in [-127, 127].
int4: per row and per group of g inputs, w ~ s q + m with q in [0, 15]: asymmetric s = (max - min) / 15,
m = min (llama.cpp's Q4_1 grid); symmetric s = max|w| / 7, m = -8 s (Q4_0's). A float offset m keeps
the grid where the weights are instead of forcing it through zero. With integer zero points the
asymmetric offset is m = -z s, z = round(-min / s) in [0, 15]: w = (q - z) s, the grid of GPTQ / AWQ
checkpoints and of ONNX Runtime's MatMulNBits zero points. Rows whose length is not a multiple of g
are padded with zeros (SmolLM's 576 inputs give a last group of 64 at g = 128).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Int4Weight:
    q: Tensor  # [out, in_padded] uint8 values 0..15 (unpacked)
    scales: Tensor  # [out, groups] fp32
    offsets: Tensor  # [out, groups] fp32: w = q * scale + offset
    group_size: int
    in_features: int

    def dequantize(self) -> Tensor:
        out = self.q.shape[0]
        groups = self.scales.shape[1]
        q = self.q.view(out, groups, self.group_size).float()
        w = q * self.scales.unsqueeze(-1) + self.offsets.unsqueeze(-1)
        return w.reshape(out, -1)[:, : self.in_features]

    @property
    def symmetric(self) -> bool:
        return bool(torch.allclose(self.offsets, -8 * self.scales))


def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """(q int8 [out, in], scales fp32 [out]) with w ~ q * scales[:, None]."""
    w = w.float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-10)
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def dequantize_int8(q: Tensor, scales: Tensor) -> Tensor:
    return q.float() * scales[:, None]


def pad_inputs(w: Tensor, group_size: int) -> Tensor:
    pad = (-w.shape[1]) % group_size
    return torch.nn.functional.pad(w, (0, pad)) if pad else w


def _asymmetric(low: Tensor, high: Tensor, integer_zero: bool) -> tuple[Tensor, Tensor]:
    """Scales and offsets of grids from `low` to `high` per group: offset = low, or -z * scale with z integer."""
    if not integer_zero:
        return ((high - low) / 15).clamp(min=1e-10), low
    # the range must hold 0 for z = round(-low / s) to lie in 0..15: a group of positive weights would
    # otherwise get z = 0 and lose its top values to the clamp (GPTQ's reference code widens it the same way)
    low, high = low.clamp(max=0), high.clamp(min=0)
    scales = ((high - low) / 15).clamp(min=1e-10)
    zeros = torch.round(-low / scales).clamp(0, 15)
    # fp32 -z * s divided by s rounds back to z: a reader (the ONNX export) recovers the zero points exactly
    return scales, -zeros * scales


def int4_params(w: Tensor, group_size: int, symmetric: bool, *, integer_zero: bool = False) -> tuple[Tensor, Tensor]:
    """Scales and offsets [out, groups] for weights [out, in] (padded inside); `integer_zero` makes each
    asymmetric offset -z * scale with z an integer in 0..15 (a symmetric grid's is -8 * scale already)."""
    g = pad_inputs(w.float(), group_size).view(w.shape[0], -1, group_size)
    if symmetric:
        scales = (g.abs().amax(dim=-1) / 7).clamp(min=1e-10)
        return scales, -8 * scales
    return _asymmetric(g.amin(dim=-1), g.amax(dim=-1), integer_zero)


def int4_params_mse(w: Tensor, group_size: int, symmetric: bool,
                    ratios: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7), *,
                    integer_zero: bool = False) -> tuple[Tensor, Tensor]:
    """Scales and offsets whose grid, shrunk by the best of `ratios` per group, gives the least squared error.

    Clipping the largest weights of a group buys a finer step for all the others; GPTQ's reference code
    searches the same way for its group grids.
    """
    g = pad_inputs(w.float(), group_size).view(w.shape[0], -1, group_size)
    best_err = torch.full(g.shape[:2], float("inf"))
    best_s = torch.zeros(g.shape[:2])
    best_m = torch.zeros(g.shape[:2])
    for ratio in ratios:
        if symmetric:
            s = (g.abs().amax(dim=-1) * ratio / 7).clamp(min=1e-10)
            m = -8 * s
        else:
            s, m = _asymmetric(g.amin(dim=-1) * ratio, g.amax(dim=-1) * ratio, integer_zero)
        q = torch.round((g - m.unsqueeze(-1)) / s.unsqueeze(-1)).clamp(0, 15)
        err = (q * s.unsqueeze(-1) + m.unsqueeze(-1) - g).pow(2).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s, best_m = torch.where(better, s, best_s), torch.where(better, m, best_m)
    return best_s, best_m


def quantize_int4_with(w: Tensor, scales: Tensor, offsets: Tensor, group_size: int) -> Tensor:
    """q [out, in_padded] in 0..15 for given per-group scales and offsets."""
    g = pad_inputs(w.float(), group_size).view(w.shape[0], -1, group_size)
    q = torch.round((g - offsets.unsqueeze(-1)) / scales.unsqueeze(-1)).clamp(0, 15)
    return q.reshape(w.shape[0], -1).to(torch.uint8)


def quantize_int4(w: Tensor, group_size: int, symmetric: bool, *, integer_zero: bool = False) -> Int4Weight:
    scales, offsets = int4_params(w, group_size, symmetric, integer_zero=integer_zero)
    q = quantize_int4_with(w, scales, offsets, group_size)
    return Int4Weight(q, scales, offsets, group_size, w.shape[1])


def fake_quantize(w: Tensor, bits: int, group_size: int, symmetric: bool, *, integer_zero: bool = False) -> Tensor:
    """Quantize then dequantize: the weights the quantized model will compute with."""
    if bits == 8:
        return dequantize_int8(*quantize_int8(w))
    return quantize_int4(w, group_size, symmetric, integer_zero=integer_zero).dequantize()


def pack_int4(q: Tensor) -> Tensor:
    """Two 4-bit values per byte, even column in the low nibble: [out, in] -> [out, in / 2]."""
    return (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: Tensor) -> Tensor:
    out = torch.empty(packed.shape[0], packed.shape[1] * 2, dtype=torch.uint8)
    out[:, 0::2] = packed & 0x0F
    out[:, 1::2] = packed >> 4
    return out


def groups_of(in_features: int, group_size: int) -> int:
    return math.ceil(in_features / group_size)
