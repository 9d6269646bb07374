"""GPTQ (arXiv 2210.17323): quantize a weight matrix column by column, pushing each column's rounding
error onto the columns not yet quantized, weighted by the inverse Hessian of the layer's inputs.

Hand-written because it is one of kiln's compression algorithms (the core of the product); it follows
the paper's lazy-batch form with a Cholesky factor of H^-1. Columns go in order of decreasing Hessian
diagonal ("act order": the inputs with the largest activations first, while most columns are still free
to absorb their error); int4 group parameters are then fixed up front from the original weights
("static groups"), so groups stay contiguous and the artifact needs no column permutation.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kiln.compress.quantize import grid

BLOCK = 128  # columns updated together (the lazy batch)


def _inverse_hessian_factor(h: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1."""
    h = h.double().clone()
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    h += damp * torch.diag(h).mean() * eye
    for attempt in range(5):  # add more damping if the matrix is not positive definite in floating point
        factor, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            break
        h += (10**attempt) * damp * torch.diag(h).mean() * eye
    inverse = torch.cholesky_inverse(factor)
    return torch.linalg.cholesky(inverse, upper=True).float()


def gptq(weight: Tensor, hessian: Tensor, bits: int, group_size: int, symmetric: bool,
         damp: float = 0.01, act_order: bool = True) -> tuple[Tensor, tuple[Tensor, Tensor] | grid.Int4Weight]:
    """Returns (dequantized weight, packed form): (q int8, scales) for 8 bits, an Int4Weight for 4."""
    w = weight.float().clone()
    out_features, in_features = w.shape
    h = hessian.clone()
    dead = torch.diag(h) == 0  # inputs that were always zero: their weights do not matter
    h[dead, dead] = 1
    w[:, dead] = 0

    int8_scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-10)
    scales, offsets = grid.int4_params_mse(w, group_size, symmetric)  # static groups, from the original weights
    order = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(in_features)
    group_of = order // group_size  # group of each column, in processing order
    w, h = w[:, order], h[order][:, order]
    hinv = _inverse_hessian_factor(h, damp)
    q_all = torch.zeros(out_features, in_features)
    deq = torch.zeros_like(w)

    for b0 in range(0, in_features, BLOCK):
        b1 = min(b0 + BLOCK, in_features)
        w_block = w[:, b0:b1].clone()
        err_block = torch.zeros_like(w_block)
        hinv_block = hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            column = w_block[:, i]
            if bits == 8:
                q = torch.round(column / int8_scales).clamp(-127, 127)
                d = q * int8_scales
            else:
                g = int(group_of[col])
                q = torch.round((column - offsets[:, g]) / scales[:, g]).clamp(0, 15)
                d = q * scales[:, g] + offsets[:, g]
            q_all[:, col] = q
            deq[:, col] = d
            err = (column - d) / hinv_block[i, i]
            w_block[:, i:] -= err.unsqueeze(1) * hinv_block[i, i:].unsqueeze(0)
            err_block[:, i] = err
        w[:, b1:] -= err_block @ hinv[b0:b1, b1:]

    inverse = torch.argsort(order)
    deq, q_all = deq[:, inverse], q_all[:, inverse]
    if bits == 8:
        return deq, (q_all.to(torch.int8), int8_scales)
    padding = scales.shape[1] * group_size - in_features
    q_padded = torch.nn.functional.pad(q_all, (0, padding)).to(torch.uint8)
    return deq, grid.Int4Weight(q_padded, scales, offsets, group_size, in_features)
