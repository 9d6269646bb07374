"""Move a per-input-channel scale s from a linear layer's input into the operation that produces it.

x -> (x / s), W -> W * s leaves the output unchanged; the division is folded into what makes x:
the RMSNorm before q/k/v and gate/up, the value rows of q/k/v before o_proj (shared by the query
heads of a group under GQA), the up rows of gate/up before down_proj. Used by AWQ and SmoothQuant.
"""

from __future__ import annotations

from torch import Tensor, nn

from kiln.model.llama import Block


def _scale_columns(linear: nn.Linear, s: Tensor) -> None:
    linear.weight.data = (linear.weight.data.float() * s.unsqueeze(0)).to(linear.weight.dtype)


def _scale_rows(linear: nn.Linear, rows: slice, s: Tensor) -> None:
    w = linear.weight.data.float().clone()
    w[rows] /= s.unsqueeze(1)
    linear.weight.data = w.to(linear.weight.dtype)
    if linear.bias is not None:
        b = linear.bias.data.float().clone()
        b[rows] /= s
        linear.bias.data = b.to(linear.bias.dtype)


def group_shared(s: Tensor, num_heads: int, num_kv_heads: int, head_dim: int) -> Tensor:
    """o_proj input scales made equal across the query heads of each KV group (they read one value row)."""
    per_group = s.view(num_kv_heads, num_heads // num_kv_heads, head_dim).mean(dim=1)  # [Hkv, D]
    return per_group.repeat_interleave(num_heads // num_kv_heads, dim=0).reshape(-1)


def fold(block: Block, target: str, s: Tensor) -> None:
    """Divide the input of `target` (a linear in `block`) by s and multiply its weight columns by s."""
    attn = block.attn
    spec_heads = (attn.num_heads, attn.num_kv_heads, attn.head_dim)
    if target == "attn.qkv_proj":
        block.input_norm.weight.data /= s
    elif target == "mlp.gate_up_proj":
        block.post_attn_norm.weight.data /= s
    elif target == "attn.o_proj":  # s must be group_shared(): one value row feeds several query heads
        h, hkv, d = spec_heads
        v_start = (h + hkv) * d
        per_kv = s.view(hkv, h // hkv, d)[:, 0].reshape(-1)
        _scale_rows(attn.qkv_proj, slice(v_start, v_start + hkv * d), per_kv)
    elif target == "mlp.down_proj":
        inter = block.mlp.down_proj.in_features
        _scale_rows(block.mlp.gate_up_proj, slice(inter, 2 * inter), s)
    else:
        raise ValueError(f"no producer to fold into for {target}")
    layer = block.get_submodule(target)
    assert isinstance(layer, nn.Linear)
    _scale_columns(layer, s)

