"""Unstructured pruning: magnitude, Wanda (arXiv 2306.11695), and 2:4 semi-structured sparsity.

Magnitude removes the smallest |W| of each matrix. Wanda scores |W_ij| * ||X_j|| (the weight times the
norm of its input channel over the calibration tokens) and removes the lowest scores of each output row.
2:4 keeps the 2 highest-scoring weights of every 4 consecutive inputs. The zeros stay in dense tensors
at run time; the artifact stores such matrices as values + bit mask. Embeddings and lm_head are kept.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def magnitude_mask(weight: Tensor, sparsity: float) -> Tensor:
    """True where a weight is kept: all but the `sparsity` fraction of smallest magnitudes in the matrix."""
    count = int(weight.numel() * sparsity)
    if count == 0:
        return torch.ones_like(weight, dtype=torch.bool)
    threshold = weight.abs().flatten().kthvalue(count).values
    return weight.abs() > threshold


def wanda_mask(weight: Tensor, input_norm: Tensor, sparsity: float) -> Tensor:
    """True where kept: per output row, all but the `sparsity` fraction of lowest |W| * ||X||."""
    score = weight.abs() * input_norm.unsqueeze(0)
    count = int(weight.shape[1] * sparsity)
    mask = torch.ones_like(weight, dtype=torch.bool)
    if count:
        drop = score.topk(count, dim=1, largest=False).indices
        mask.scatter_(1, drop, False)
    return mask


def two_four_mask(score: Tensor) -> Tensor:
    """True for the 2 highest scores of every 4 consecutive inputs of each row (inputs padded to x4)."""
    rows, cols = score.shape
    padded = torch.nn.functional.pad(score, (0, (-cols) % 4), value=float("-inf"))
    groups = padded.view(rows, -1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, groups.topk(2, dim=2).indices, True)
    return keep.view(rows, -1)[:, :cols]


@torch.no_grad()
def apply(layer: nn.Linear, mask: Tensor) -> None:
    layer.weight.data = layer.weight.data * mask.to(layer.weight.dtype)


def sparsity_of(layers: list[nn.Linear]) -> float:
    zeros = sum(int((layer.weight == 0).sum()) for layer in layers)
    total = sum(layer.weight.numel() for layer in layers)
    return zeros / total if total else 0.0
