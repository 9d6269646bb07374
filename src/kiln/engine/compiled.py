"""`--runtime torch-compiled`: the torch runtime with compiled int8 / int4 decode kernels.

Eager int8 and int4 layers widen their whole weight matrix to the activation dtype on every call, then
multiply: at decode, where a call has one row per sequence, that widening is nearly all of the work (the
default model's int4 head, 49152 x 576, takes ~97 ms a call that way). Written as a reduction over the
integers instead (each output is a sum of input x weight products, the scale applied per row or per
group), the same arithmetic reads each weight byte once, and torch.compile (inductor) turns it into one
loop per layer. Calls with more than DECODE_ROWS rows (prefill, large batches) keep the eager path,
whose matmul reads each widened weight once for all rows.

Only the fp32 compute dtype takes the kernels: a bf16 reduction would round every partial sum. Compiled
kernels are cached on disk under $KILN_CACHE/inductor (inductor's own graph and kernel caches), so a
later process loads them instead of compiling again.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kiln import settings
from kiln.compress.quantize.qlinear import Int4Linear, Int8Linear

# rows per call that take the kernel: its work grows with the rows, widen + matmul's hardly does (with
# it, batch 4 of the int8 artifact still decoded 2.3x batch 1's total tokens/s here, `kiln bench`)
DECODE_ROWS = 4
_failed: list[str] = []  # set once compiling failed: every layer then keeps its eager forward


def int8_rows(x: Tensor, qweight: Tensor, scales: Tensor) -> Tensor:
    """x [M, K] times int8 [N, K] with per-output scales [N]: [M, N]."""
    return (x.unsqueeze(-2) * qweight.to(x.dtype)).sum(-1) * scales


def int4_rows(x: Tensor, packed: Tensor, scales: Tensor, offsets: Tensor) -> Tensor:
    """x [M, K'] times int4 groups (packed [N, K' / 2], even column in the low nibble; w = q * scale +
    offset per group of K' / G inputs): [M, N]. K' is the layer's padded width: callers pad x with zeros."""
    m = x.shape[0]
    n, groups = scales.shape
    half = packed.shape[1] // groups  # packed bytes per group
    low = (packed & 15).to(x.dtype).view(n, groups, half)
    high = (packed >> 4).to(x.dtype).view(n, groups, half)
    even = x[:, 0::2].reshape(m, 1, groups, half)
    odd = x[:, 1::2].reshape(m, 1, groups, half)
    # one reduction over groups and their columns, each product scaled by its group's scale: 2-5x faster
    # here than summing each group first and scaling the [M, N, G] sums after
    scaled = ((even * low + odd * high) * scales.unsqueeze(-1)).sum((-1, -2))
    group_sums = x.reshape(m, groups, 2 * half).sum(-1)  # [M, G]: what each group's offset multiplies
    return scaled + group_sums @ offsets.t()


class _DecodeKernel:
    """Layer call: the compiled reduction for a few fp32 rows, else the layer's own forward."""

    def __init__(self, layer: Int8Linear | Int4Linear, kernel: Callable[..., Any]) -> None:
        self.layer, self.kernel = layer, kernel
        self.eager: Callable[[Tensor], Tensor] = layer.forward  # bound before it is replaced

    def __call__(self, x: Tensor) -> Tensor:
        if _failed or x.dtype != torch.float32 or x.numel() > DECODE_ROWS * x.shape[-1]:
            return self.eager(x)
        try:
            return self._kernel(x)
        except Exception as exc:  # noqa: BLE001 - a failed compile (no C++ compiler, an odd cache path) must not stop serving
            first_line = (str(exc).strip().splitlines() or [""])[0][:200]
            _failed.append(f"{type(exc).__name__}: {first_line}")
            print(f"kiln: compiling the decode kernels failed ({_failed[0]}); running the torch runtime's eager "
                  "layers instead", file=sys.stderr)
            return self.eager(x)

    def _kernel(self, x: Tensor) -> Tensor:
        layer = self.layer
        rows = x.reshape(-1, x.shape[-1])
        if isinstance(layer, Int8Linear):
            y: Tensor = self.kernel(rows, layer.qweight, layer.scales)
        else:  # padded here, not in the kernel: a pad inside made inductor's loop several times slower
            width = 2 * layer.qweight.shape[1]
            rows = F.pad(rows, (0, width - rows.shape[1])) if rows.shape[1] < width else rows
            y = self.kernel(rows, layer.qweight, layer.scales, layer.offsets)
        if layer.bias is not None:
            y = y + layer.bias
        return y.view(*x.shape[:-1], layer.out_features)


def use_disk_cache() -> None:
    """Point inductor's caches at $KILN_CACHE/inductor unless the user chose a folder (settings says why
    the variable itself cannot tell: torch sets it too); inductor reads it at each use."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(settings.inductor_cache_dir())
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")


def compile_decode(model: nn.Module) -> int:
    """Give every int8 / int4 layer of `model` a compiled decode kernel; returns how many layers."""
    use_disk_cache()
    _failed.clear()
    # dynamic shapes: the layers' shapes and row counts share a few compiled kernels, not one each
    kernels: dict[type, Callable[..., Any]] = {Int8Linear: torch.compile(int8_rows, dynamic=True),
                                               Int4Linear: torch.compile(int4_rows, dynamic=True)}
    count = 0
    for module in model.modules():
        if isinstance(module, Int8Linear | Int4Linear):
            module.forward = _DecodeKernel(module, kernels[type(module)])  # type: ignore[method-assign]
            count += 1
    return count
