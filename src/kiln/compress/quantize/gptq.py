"""GPTQ (arXiv 2210.17323): quantize a weight matrix column by column, pushing each column's rounding
error onto the columns not yet quantized, weighted by the inverse Hessian of the layer's inputs.

Hand-written because it is one of kiln's compression algorithms (the core of the product); it follows
the paper's lazy-batch form with a Cholesky factor of H^-1. Columns go in order of decreasing Hessian
diagonal ("act order": the inputs with the largest activations first, while most columns are still free
to absorb their error); int4 group parameters are then fixed up front from the original weights
("static groups"), so groups stay contiguous and the artifact needs no column permutation.

Two additions, both on by default in recipes (measured on the default model in BENCHMARKS.md):
- the target: with `target = "model"` the pipeline hands this function a weight already corrected for
  the drift of its inputs away from the uncompressed model's (kiln.compress.blocks), so the pass
  minimises the error against the original model instead of against the layer's drifted inputs;
- refitting: with the integers chosen, each row's group scales and offsets are solved for in closed
  form against the same Hessian-weighted error (`refit_int4`), and the pass runs again on those grids.
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
         damp: float = 0.01, act_order: bool = True, refit_rounds: int = 0, *,
         integer_zero: bool = False) -> tuple[Tensor, tuple[Tensor, Tensor] | grid.Int4Weight]:
    """Returns (dequantized weight, packed form): (q int8, scales) for 8 bits, an Int4Weight for 4.

    `refit_rounds` (int4): after a pass, refit every group's scale and offset to the chosen integers
    (`refit_int4`), then run the pass again on the refitted grids, this many times. `integer_zero`
    (int4, asymmetric): offsets -z * scale with z an integer per group, kept through the refits."""
    w = weight.float().clone()
    in_features = w.shape[1]
    h = hessian.clone()
    dead = torch.diag(h) == 0  # inputs that were always zero: their weights do not matter
    h[dead, dead] = 1
    w[:, dead] = 0

    int8_scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-10)
    # static groups, from the original weights
    scales, offsets = grid.int4_params_mse(w, group_size, symmetric, integer_zero=integer_zero)
    order = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(in_features)
    hinv = _inverse_hessian_factor(h[order][:, order], damp)
    deq, q_all = _pass(w, hinv, order, bits, int8_scales, scales, offsets, group_size)
    for round_ in range(refit_rounds if bits == 4 else 0):
        scales, offsets = refit_int4(w, h, q_all, scales, offsets, group_size, symmetric, integer_zero=integer_zero)
        if round_ + 1 < refit_rounds:  # the integers again, on the refitted grids
            deq, q_all = _pass(w, hinv, order, bits, int8_scales, scales, offsets, group_size)
        else:
            deq = _packed(q_all, scales, offsets, group_size).dequantize()
    if bits == 8:
        return deq, (q_all.to(torch.int8), int8_scales)
    return deq, _packed(q_all, scales, offsets, group_size)


def _packed(q: Tensor, scales: Tensor, offsets: Tensor, group_size: int) -> grid.Int4Weight:
    padding = scales.shape[1] * group_size - q.shape[1]
    q_padded = torch.nn.functional.pad(q, (0, padding)).to(torch.uint8)
    return grid.Int4Weight(q_padded, scales, offsets, group_size, q.shape[1])


def _pass(weight: Tensor, hinv: Tensor, order: Tensor, bits: int, int8_scales: Tensor, scales: Tensor,
          offsets: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """One GPTQ pass over the columns in `order` on fixed grids: (dequantized weight, integers), both in
    the original column order.

    Works on the transpose, a row per input column, so each step touches contiguous memory, and looks up
    every column's grid before the loop: the loop runs once per input column in Python, and its few
    small tensor operations are most of the pass's time."""
    w = weight[:, order].T.contiguous()  # [in, out], in processing order
    if bits == 8:
        step = int8_scales.expand(w.shape)
        zero = torch.zeros_like(w)
        low, high = -127.0, 127.0
    else:
        group_of = order // group_size  # group of each column, in processing order
        step = scales.T[group_of].contiguous()
        zero = offsets.T[group_of].contiguous()
        low, high = 0.0, 15.0
    q_all = torch.empty_like(w)
    deq = torch.empty_like(w)
    in_features = w.shape[0]
    for b0 in range(0, in_features, BLOCK):
        b1 = min(b0 + BLOCK, in_features)
        w_block = w[b0:b1]  # a view: the block's rows are updated in place
        err_block = torch.empty_like(w_block)
        hinv_block = hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            row = w_block[i]
            q = torch.round((row - zero[col]) / step[col]).clamp_(low, high)
            d = q * step[col] + zero[col]
            q_all[col] = q
            deq[col] = d
            err = (row - d) / hinv_block[i, i]
            w_block[i:] -= torch.outer(hinv_block[i, i:], err)
            err_block[i] = err
        w[b1:] -= hinv[b0:b1, b1:].T @ err_block

    inverse = torch.argsort(order)
    return deq[inverse].T.contiguous(), q_all[inverse].T.contiguous()


def fixed_zero_points(scales: Tensor, offsets: Tensor, symmetric: bool, integer_zero: bool) -> Tensor | None:
    """The groups' integer zero points z [out, G] (offset = -z * scale) that a refit keeps, or None where the
    offsets are free floats to solve for: 8 throughout when symmetric, each group's own with integer_zero."""
    if symmetric:
        return torch.full_like(scales, 8.0)
    if integer_zero:
        return torch.round(-offsets / scales)
    return None


def refit_int4(weight: Tensor, hessian: Tensor, q: Tensor, scales: Tensor, offsets: Tensor, group_size: int,
               symmetric: bool, *, integer_zero: bool = False) -> tuple[Tensor, Tensor]:
    """Per row, the group scales and offsets that minimise the layer's output error for fixed integers q.

    With q fixed, a row's dequantized weights are linear in its groups' (scale, offset) pairs, so the
    error GPTQ minimises, (w - A θ)ᵀ H (w - A θ), has a closed-form minimum: (Aᵀ H A) θ = Aᵀ H w, a
    2G x 2G system per row. With integer zero points (z = 8 when symmetric; each group's own z with
    `integer_zero`) the offset is -z x scale, so z stays fixed and only the scales are solved for, a
    G x G system in q - z. The min-max grids GPTQ starts from are fitted to the weights alone; this
    fits them to what the layer's inputs see.
    A row keeps its old grid where the solve does not lower its error (an ill-conditioned system).
    """
    w = weight.double()
    h = hessian.double()
    in_features = w.shape[1]
    groups = scales.shape[1]
    zeros = fixed_zero_points(scales, offsets, symmetric, integer_zero)
    free_offsets = zeros is None
    qd = q[:, :in_features].double()
    if zeros is not None:  # w = (q - z) * scale
        qd = qd - zeros.double().repeat_interleave(group_size, 1)[:, :in_features]
    cols = [slice(g * group_size, min((g + 1) * group_size, in_features)) for g in range(groups)]
    # H A, column by column: a group's integers touch only its own inputs
    hq = torch.stack([qd[:, c] @ h[c, :] for c in cols])  # [G, out, in]: H times group g's integers
    h1 = torch.stack([h[c, :].sum(0) for c in cols])  # [G, in]: H times group g's ones
    qq = torch.stack([(hq[:, :, c] * qd[None, :, c]).sum(-1) for c in cols], -1)  # [G, out, G]
    blocks = [[qq.permute(1, 0, 2)]]  # [out, G, G]
    rhs = [(hq * w).sum(-1).T]  # Aᵀ H w, the scales' part [out, G]
    if free_offsets:
        q1 = torch.stack([hq[:, :, c].sum(-1) for c in cols], -1).permute(1, 0, 2)  # [out, G(q), G(ones)]
        ones = torch.stack([h1[:, c].sum(-1) for c in cols], -1).expand(w.shape[0], groups, groups)
        blocks = [[blocks[0][0], q1], [q1.transpose(1, 2), ones]]
        rhs.append(w @ h1.T)
    lhs = torch.cat([torch.cat(row, 2) for row in blocks], 1)
    rhs_all = torch.cat(rhs, 1)
    size = lhs.shape[1]
    lhs = lhs + 1e-9 * lhs.diagonal(dim1=1, dim2=2).mean(-1).clamp(min=1e-30)[:, None, None] * torch.eye(size)
    theta, info = torch.linalg.solve_ex(lhs, rhs_all)
    old = torch.cat([scales.double(), offsets.double()], 1) if free_offsets else scales.double()

    def error(t: Tensor) -> Tensor:
        deq = qd * t[:, :groups].repeat_interleave(group_size, 1)[:, :in_features]
        if free_offsets:
            deq = deq + t[:, groups:].repeat_interleave(group_size, 1)[:, :in_features]
        d = w - deq
        return ((d @ h) * d).sum(1)

    better = (info == 0) & torch.isfinite(theta).all(1) & (error(theta) < error(old))
    theta = torch.where(better[:, None], theta, old)
    new_scales = theta[:, :groups].float()
    new_offsets = theta[:, groups:].float() if zeros is None else -zeros * new_scales
    return new_scales, new_offsets
