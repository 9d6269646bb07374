"""GPTQ (arXiv 2210.17323): quantize a weight matrix column by column, pushing each column's rounding
error onto the columns not yet quantized, weighted by the inverse Hessian of the layer's inputs.

Hand-written because it is one of kiln's compression algorithms (the core of the product); it follows
the paper's lazy-batch form with a Cholesky factor of H^-1, and computes int4 group parameters when a
group is reached (on the already-updated weights), as the reference implementation does.
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
         damp: float = 0.01) -> tuple[Tensor, tuple[Tensor, Tensor] | grid.Int4Weight]:
    """Returns (dequantized weight, packed form): (q int8, scales) for 8 bits, an Int4Weight for 4."""
    w = weight.float().clone()
    out_features, in_features = w.shape
    h = hessian.clone()
    dead = torch.diag(h) == 0  # inputs that were always zero: their weights do not matter
    h[dead, dead] = 1
    w[:, dead] = 0
    hinv = _inverse_hessian_factor(h, damp)

    if bits == 8:
        int8_scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-10)
    n_groups = grid.groups_of(in_features, group_size)
    scales = torch.zeros(out_features, n_groups)
    offsets = torch.zeros(out_features, n_groups)
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
                g = col // group_size
                if col % group_size == 0:  # entering a group: its grid comes from the updated weights
                    # (groups never straddle a lazy batch: BLOCK is a multiple of every group size)
                    g1 = min(col + group_size, in_features)
                    s, m = grid.int4_params(w_block[:, i : g1 - b0], group_size, symmetric)
                    scales[:, g], offsets[:, g] = s[:, 0], m[:, 0]
                q = torch.round((column - offsets[:, g]) / scales[:, g]).clamp(0, 15)
                d = q * scales[:, g] + offsets[:, g]
            q_all[:, col] = q
            deq[:, col] = d
            err = (column - d) / hinv_block[i, i]
            w_block[:, i:] -= err.unsqueeze(1) * hinv_block[i, i:].unsqueeze(0)
            err_block[:, i] = err
        w[:, b1:] -= err_block @ hinv[b0:b1, b1:]

    if bits == 8:
        return deq, (q_all.to(torch.int8), int8_scales)
    q_padded = torch.nn.functional.pad(q_all, (0, n_groups * group_size - in_features)).to(torch.uint8)
    return deq, grid.Int4Weight(q_padded, scales, offsets, group_size, in_features)
