"""Structured pruning that shrinks tensors: attention heads, MLP channels, or whole decoder layers.

Importance is measured on calibration data: a head's or channel's output energy through o_proj /
down_proj (trace of W H W^T over its input block, H = X^T X), and a layer's Block Influence (ShortGPT,
arXiv 2403.03853: one minus the mean cosine between its input and output hidden states). The least
important are removed from every layer alike, keeping the config uniform (and GQA groups equal).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from kiln.compress.blocks import InputStats
from kiln.errors import InvalidParameterError
from kiln.model.llama import Block, LlamaModel


def heads_to_remove(num_heads: int, num_kv_heads: int, sparsity: float) -> int:
    """Query heads removed from every KV group for `sparsity`, refused when that is none or all of them: the count
    was capped at one head kept, and rounded to none, without a word, so the artifact was not what was asked."""
    per_group = num_heads // num_kv_heads
    remove = round(sparsity * per_group)
    if per_group < 2:
        raise InvalidParameterError(
            f"prune heads: each of the {num_kv_heads} KV heads serves one query head, and kiln removes query heads "
            "within a KV group; prune channels or layers instead")
    if not 0 < remove < per_group:
        raise InvalidParameterError(
            f"prune heads: sparsity {sparsity} removes {remove} of the {per_group} query heads in each KV group; "
            f"pass a fraction that removes 1 to {per_group - 1} of them, e.g. {1 / per_group:.2f}")
    return remove


def layers_to_remove(num_layers: int, sparsity: float) -> int:
    """Decoder layers removed for `sparsity`, refused when none or all (the count was capped at one layer kept)."""
    count = round(sparsity * num_layers)
    if not 0 < count < num_layers:
        raise InvalidParameterError(
            f"prune layers: sparsity {sparsity} removes {count} of the {num_layers} layers; pass a fraction that "
            f"removes 1 to {num_layers - 1} of them, e.g. {1 / num_layers:.2f}")
    return count


def channels_to_keep(intermediate: int, sparsity: float) -> int:
    """MLP channels kept for `sparsity`, refused when that keeps all or none (it was raised to one kept)."""
    keep = round((1 - sparsity) * intermediate)
    if not 0 < keep < intermediate:
        raise InvalidParameterError(
            f"prune channels: sparsity {sparsity} keeps {keep} of the {intermediate} MLP channels; pass a fraction "
            f"that removes 1 to {intermediate - 1} of them")
    return keep


def head_importance(block: Block, o_stats: InputStats) -> Tensor:
    """[num_heads] output energy of each head through o_proj."""
    attn = block.attn
    w = attn.o_proj.weight.detach().float()
    h = o_stats.hessian_matrix()
    d = attn.head_dim
    return torch.stack([
        (w[:, i * d : (i + 1) * d] @ h[i * d : (i + 1) * d, i * d : (i + 1) * d] * w[:, i * d : (i + 1) * d]).sum()
        for i in range(attn.num_heads)
    ])


def channel_importance(block: Block, down_stats: InputStats) -> Tensor:
    """[intermediate] energy of each MLP channel through down_proj: ||W[:, c]||^2 * sum of act_c^2."""
    w = block.mlp.down_proj.weight.detach().float()
    return (w * w).sum(0) * down_stats.sq_sum.float()


def _keep_rows(linear: nn.Linear, rows: Tensor) -> None:
    linear.weight = nn.Parameter(linear.weight.data[rows].contiguous(), requires_grad=False)
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.data[rows].contiguous(), requires_grad=False)
    linear.out_features = int(rows.numel())


def _keep_columns(linear: nn.Linear, cols: Tensor) -> None:
    linear.weight = nn.Parameter(linear.weight.data[:, cols].contiguous(), requires_grad=False)
    linear.in_features = int(cols.numel())


def prune_heads(block: Block, importance: Tensor, remove_per_group: int) -> list[int]:
    """Drop the `remove_per_group` least important query heads of every KV group; returns the dropped
    heads' indices (as they were numbered before)."""
    attn = block.attn
    h, hkv, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    per_group = h // hkv
    keep_heads = []
    for g in range(hkv):
        heads = torch.arange(g * per_group, (g + 1) * per_group)
        ranked = heads[importance[heads].argsort(descending=True)]
        keep_heads += sorted(ranked[: per_group - remove_per_group].tolist())
    q_rows = torch.cat([torch.arange(i * d, (i + 1) * d) for i in keep_heads])
    kv_rows = torch.arange(h * d, (h + 2 * hkv) * d)
    _keep_rows(attn.qkv_proj, torch.cat([q_rows, kv_rows]))
    _keep_columns(attn.o_proj, q_rows)
    attn.num_heads = len(keep_heads)
    return sorted(set(range(h)) - set(keep_heads))


def prune_channels(block: Block, importance: Tensor, keep: int) -> None:
    mlp = block.mlp
    inter = mlp.down_proj.in_features
    channels = importance.argsort(descending=True)[:keep].sort().values
    _keep_rows(mlp.gate_up_proj, torch.cat([channels, channels + inter]))
    _keep_columns(mlp.down_proj, channels)


def block_influence(inputs: list[Tensor], outputs: list[Tensor]) -> float:
    cos = [torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).mean() for a, b in zip(inputs, outputs,
                                                                                                     strict=True)]
    return float(1 - torch.stack(cos).mean())


def remove_layers(model: LlamaModel, drop: set[int]) -> None:
    kept = [layer for i, layer in enumerate(model.layers) if i not in drop]
    for new_index, layer in enumerate(kept):
        assert isinstance(layer, Block)
        layer.attn.layer = new_index
    model.layers = nn.ModuleList(kept)
    spec = model.spec
    sliding = tuple(f for i, f in enumerate(spec.sliding_layers) if i not in drop) if spec.sliding_layers else ()
    model.spec = dataclasses.replace(spec, num_layers=len(kept), sliding_layers=sliding)


def update_spec(model: LlamaModel) -> None:
    """Write the (uniform) shapes of the pruned blocks back into the model's spec."""
    first = model.layers[0]
    assert isinstance(first, Block)
    model.spec = dataclasses.replace(model.spec, num_heads=first.attn.num_heads,
                                     intermediate_size=first.mlp.down_proj.in_features)
