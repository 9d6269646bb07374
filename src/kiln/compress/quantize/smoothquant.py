"""SmoothQuant (arXiv 2211.10438): migrate activation outliers into the weights so both quantize to int8.

Per input channel j of each linear layer: s_j = max|X_j|^alpha / max|W_j|^(1 - alpha); x / s is folded
into the producing operation (kiln.compress.fold) and W * s is quantized per output channel. The layer
then runs W8A8: activations are quantized per token at run time and multiplied in int8.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kiln.compress.blocks import LINEARS, InputStats
from kiln.compress.fold import fold, group_shared
from kiln.model.llama import Block


def smoothing_scale(layer: nn.Linear, stats: InputStats, alpha: float) -> Tensor:
    act = stats.abs_max.clamp(min=1e-5)
    weight = layer.weight.detach().float().abs().amax(dim=0).clamp(min=1e-5)
    return (act.pow(alpha) / weight.pow(1 - alpha)).clamp(min=1e-5)


@torch.no_grad()
def smooth_block(block: Block, stats: dict[str, InputStats], alpha: float) -> None:
    attn = block.attn
    for name in LINEARS:
        layer = block.get_submodule(name)
        assert isinstance(layer, nn.Linear)
        s = smoothing_scale(layer, stats[name], alpha)
        if name == "attn.o_proj":
            s = group_shared(s, attn.num_heads, attn.num_kv_heads, attn.head_dim)
        fold(block, name, s)
