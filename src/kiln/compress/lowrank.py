"""Low-rank factorisation: W [out, in] ~ B [out, r] A [r, in] from a truncated SVD.

The rank is given, or the smallest that keeps a fraction of the squared singular values ("energy").
A layer is factorised only when the two factors are smaller than the matrix.
"""

from __future__ import annotations

import torch
from torch import nn

from kiln.compress.quantize.qlinear import LowRankLinear
from kiln.model.llama import Block, LlamaModel

TARGETS = {"attn": ("attn.qkv_proj", "attn.o_proj"), "mlp": ("mlp.gate_up_proj", "mlp.down_proj")}


def choose_rank(singular: torch.Tensor, rank: int | None, energy: float | None) -> int:
    if rank is not None:
        return min(rank, singular.numel())
    assert energy is not None
    cumulative = (singular**2).cumsum(0) / (singular**2).sum()
    return int((cumulative < energy).sum()) + 1


@torch.no_grad()
def factorise(layer: nn.Linear, rank: int | None, energy: float | None) -> LowRankLinear | None:
    w = layer.weight.detach().float()
    if rank is not None and min(rank, *w.shape) * (w.shape[0] + w.shape[1]) >= w.numel():
        return None  # the shapes alone say no saving: a rank too large for every layer ran all the SVDs to say so
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    r = choose_rank(s, rank, energy)
    if r * (w.shape[0] + w.shape[1]) >= w.numel():
        return None  # no saving at this rank
    root = s[:r].sqrt()
    a = root.unsqueeze(1) * vh[:r]  # [r, in]
    b = u[:, :r] * root.unsqueeze(0)  # [out, r]
    bias = None if layer.bias is None else layer.bias.detach().float()
    return LowRankLinear(a.contiguous(), b.contiguous(), bias)


def apply(model: LlamaModel, targets: tuple[str, ...], rank: int | None, energy: float | None) -> dict[str, int]:
    """Factorise the chosen layers of every block; returns the rank given to each replaced layer."""
    names = [n for t in targets for n in (TARGETS["attn"] + TARGETS["mlp"] if t == "all" else TARGETS[t])]
    ranks: dict[str, int] = {}
    for i, block in enumerate(model.layers):
        assert isinstance(block, Block)
        for name in dict.fromkeys(names):
            layer = block.get_submodule(name)
            if not isinstance(layer, nn.Linear):
                continue
            replacement = factorise(layer, rank, energy)
            if replacement is not None:
                parent, _, attr = name.rpartition(".")
                setattr(block.get_submodule(parent), attr, replacement)
                ranks[f"layers.{i}.{name}"] = replacement.rank
    return ranks
